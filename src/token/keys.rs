//! The public keys of signed client tokens (RS256, ES256, EdDSA), read from the file named
//! by `token_public_keys`: PEM blocks or a JWKS document. Owns the key set and its reload;
//! never touches the network and never verifies a token itself.
//!
//! Shards read the current set with one lock-free `ArcSwap` load per handshake; a reload
//! (control thread, SIGHUP or SIGUSR2) parses the whole file first and publishes a new
//! `Arc` only when every key in it is usable, so a broken file keeps the old keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// The largest key file read: a JWKS of a few dozen RSA-4096 keys fits many times over.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// The most keys one file may hold.
const MAX_KEYS: usize = 64;

/// Why a key file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path:?}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path:?} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("key {index} of {path:?}: {reason}")]
    Key {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path:?}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The type of a public key; it alone decides the one algorithm the key verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    P256,
    Ed25519,
}

impl KeyType {
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyType::Rsa => Algorithm::RS256,
            KeyType::P256 => Algorithm::ES256,
            KeyType::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The key type a token's `alg` needs; `None` for anything but RS256, ES256, EdDSA.
    pub fn for_alg(alg: &str) -> Option<KeyType> {
        match alg {
            "RS256" => Some(KeyType::Rsa),
            "ES256" => Some(KeyType::P256),
            "EdDSA" => Some(KeyType::Ed25519),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::P256 => "EC P-256",
            KeyType::Ed25519 => "Ed25519",
        }
    }
}

/// One usable public key.
pub struct PublicKey {
    /// `kid` (JWKS `kid`, or a PEM block's `kid: NAME` line); `None`: unnamed.
    pub kid: Option<String>,
    pub key_type: KeyType,
    pub decoding: DecodingKey,
}

/// Every key of one file, as loaded.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
}

/// Why no key was picked for a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    UnknownKid,
    /// No kid, and not exactly one key of the type: the count found.
    Ambiguous(usize),
}

impl KeySet {
    /// The key for a token's `kid` and algorithm type. A kid names its key (an unnamed
    /// set of one key serves any kid). Without a kid the token needs the only key of its
    /// type: trying several would cost a shard one signature check per key per token.
    pub fn pick(&self, kid: Option<&str>, wanted: KeyType) -> Result<&PublicKey, Pick> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .or(match &self.keys[..] {
                    [only] if only.kid.is_none() => Some(only),
                    _ => None,
                })
                .ok_or(Pick::UnknownKid),
            None => {
                let mut of_type = self.keys.iter().filter(|key| key.key_type == wanted);
                match (of_type.next(), of_type.count()) {
                    (Some(key), 0) => Ok(key),
                    (None, _) => Err(Pick::Ambiguous(0)),
                    (Some(_), more) => Err(Pick::Ambiguous(1 + more)),
                }
            }
        }
    }
}

/// The reloadable key set of `token_public_keys`.
pub struct KeyStore {
    path: PathBuf,
    current: ArcSwap<KeySet>,
}

impl KeyStore {
    /// Loads `path`; a broken file is an error (at start-up, a start-up error).
    pub fn open(path: &Path) -> Result<KeyStore, KeyError> {
        let set = load(path)?;
        Ok(KeyStore {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(set),
        })
    }

    /// The key set now: one lock-free load, for one handshake.
    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Reads the file again and publishes its keys; on error the old keys stay.
    /// Returns how many keys are loaded now.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let set = load(&self.path)?;
        let count = set.keys.len();
        self.current.store(Arc::new(set));
        Ok(count)
    }

    /// The file the keys come from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses a key file: a JWKS document when it starts with `{`, PEM blocks otherwise.
pub fn load(path: &Path) -> Result<KeySet, KeyError> {
    let read = |reason: std::io::Error| KeyError::Read {
        path: path.to_owned(),
        reason: reason.to_string(),
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_FILE_BYTES {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let file_error = |reason: String| KeyError::File {
        path: path.to_owned(),
        reason,
    };
    let keys = if text.trim_start().starts_with('{') {
        parse_jwks(&text).map_err(|(index, reason)| KeyError::Key {
            path: path.to_owned(),
            index,
            reason,
        })?
    } else {
        parse_pem(&text).map_err(|(index, reason)| KeyError::Key {
            path: path.to_owned(),
            index,
            reason,
        })?
    };
    if keys.is_empty() {
        return Err(file_error("no public key in the file".into()));
    }
    if keys.len() > MAX_KEYS {
        return Err(file_error(format!("more than {MAX_KEYS} keys")));
    }
    for (i, key) in keys.iter().enumerate() {
        if let Some(kid) = &key.kid
            && keys[..i].iter().any(|k| k.kid.as_ref() == Some(kid))
        {
            return Err(file_error(format!("kid {kid:?} is used twice")));
        }
    }
    Ok(KeySet { keys })
}

type Parsed = Result<Vec<PublicKey>, (usize, String)>;

/// PEM blocks (`PUBLIC KEY`, `RSA PUBLIC KEY`), each optionally named by a `kid: NAME`
/// line before it (text outside the boundaries is allowed by RFC 7468).
pub fn parse_pem(text: &str) -> Parsed {
    let mut keys = Vec::new();
    let mut kid = None;
    let mut block: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        match &mut block {
            None if line.starts_with("-----BEGIN ") => block = Some(format!("{line}\n")),
            None => {
                if let Some(name) = line.strip_prefix("kid:") {
                    kid = Some(name.trim().to_owned());
                }
            }
            Some(pem) => {
                pem.push_str(line);
                pem.push('\n');
                if line.starts_with("-----END ") {
                    let index = keys.len();
                    let key = pem_key(pem).map_err(|reason| (index, reason))?;
                    keys.push(PublicKey {
                        kid: kid.take().filter(|k| !k.is_empty()),
                        ..key
                    });
                    block = None;
                }
            }
        }
    }
    if block.is_some() {
        return Err((keys.len(), "a PEM block without its END line".into()));
    }
    Ok(keys)
}

fn pem_key(pem: &str) -> Result<PublicKey, String> {
    if pem.lines().next().is_some_and(|l| l.contains("PRIVATE")) {
        return Err("a private key: give only the public key".into());
    }
    let bytes = pem.as_bytes();
    let (key_type, decoding) = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        (KeyType::Rsa, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        (KeyType::Ed25519, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        // An uncompressed P-256 point is 65 bytes (P-384's is 97: ES384 is not served).
        if key.try_get_as_bytes().map(<[u8]>::len) != Ok(65) {
            return Err("an EC key that is not P-256".into());
        }
        (KeyType::P256, key)
    } else {
        return Err("not an RSA, EC P-256 or Ed25519 public key".into());
    };
    usable(PublicKey {
        kid: None,
        key_type,
        decoding,
    })
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    d: Option<serde_json::Value>,
}

/// A JWKS document (RFC 7517): `{"keys":[...]}` of RSA, EC P-256 and OKP Ed25519 keys.
pub fn parse_jwks(text: &str) -> Parsed {
    let jwks: Jwks = serde_json::from_str(text).map_err(|err| (0, format!("not a JWKS: {err}")))?;
    jwks.keys
        .iter()
        .enumerate()
        .map(|(index, jwk)| jwk_key(jwk).map_err(|reason| (index, reason)))
        .collect()
}

fn jwk_key(jwk: &Jwk) -> Result<PublicKey, String> {
    if jwk.d.is_some() {
        return Err("a private key (it has \"d\"): give only the public key".into());
    }
    if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
        return Err(format!("use {:?} is not \"sig\"", jwk.key_use));
    }
    fn field<'a>(jwk: &Jwk, value: &'a Option<String>, name: &str) -> Result<&'a str, String> {
        value
            .as_deref()
            .ok_or_else(|| format!("{} key without {name:?}", jwk.kty))
    }
    let bad = |err: jsonwebtoken::errors::Error| format!("{} key: {err}", jwk.kty);
    let (key_type, decoding) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => (
            KeyType::Rsa,
            DecodingKey::from_rsa_components(field(jwk, &jwk.n, "n")?, field(jwk, &jwk.e, "e")?)
                .map_err(bad)?,
        ),
        ("EC", Some("P-256")) => (
            KeyType::P256,
            DecodingKey::from_ec_components(field(jwk, &jwk.x, "x")?, field(jwk, &jwk.y, "y")?)
                .map_err(bad)?,
        ),
        ("OKP", Some("Ed25519")) => (
            KeyType::Ed25519,
            DecodingKey::from_ed_components(field(jwk, &jwk.x, "x")?).map_err(bad)?,
        ),
        (kty, crv) => return Err(format!("unsupported key type {kty:?} (curve {crv:?})")),
    };
    if let Some(alg) = &jwk.alg
        && alg != key_type.algorithm_name()
    {
        return Err(format!(
            "alg {alg:?} does not fit a {} key",
            key_type.name()
        ));
    }
    usable(PublicKey {
        kid: jwk.kid.clone(),
        key_type,
        decoding,
    })
}

impl KeyType {
    pub fn algorithm_name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RS256",
            KeyType::P256 => "ES256",
            KeyType::Ed25519 => "EdDSA",
        }
    }
}

/// Proves at load time that the backend accepts the key, so that a bad key is a load
/// error and not a refusal of every client: a check against a dummy signature parses it.
fn usable(key: PublicKey) -> Result<PublicKey, String> {
    match jsonwebtoken::crypto::verify("AAAA", b"probe", &key.decoding, key.key_type.algorithm()) {
        Ok(_) => Ok(key),
        Err(err) => Err(format!("{} key rejected: {err}", key.key_type.name())),
    }
}
