//! Raw TCP and TLS clients for the protocol tests: a line client (JSON-lines), a RESP
//! client with a small reply parser, and a TLS connector trusting a certificate made
//! at test time.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

/// Anything a test client can talk through: a plain socket or TLS over one.
pub trait Wire: Read + Write {}
impl<T: Read + Write> Wire for T {}

/// A self-signed certificate for `localhost` written as PEM files.
pub struct TestCert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    der: CertificateDer<'static>,
}

impl TestCert {
    /// Generates the certificate and key into `dir`.
    pub fn generate(dir: &Path) -> TestCert {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_pem = dir.join("cert.pem");
        let key_pem = dir.join("key.pem");
        std::fs::write(&cert_pem, generated.cert.pem()).unwrap();
        std::fs::write(&key_pem, generated.key_pair.serialize_pem()).unwrap();
        TestCert {
            cert_pem,
            key_pem,
            der: generated.cert.der().clone(),
        }
    }

    /// INI lines pointing a node at this certificate.
    pub fn ini(&self) -> String {
        format!(
            "wss_cert_pem={}\nwss_key_pem={}\n",
            self.cert_pem.display(),
            self.key_pem.display()
        )
    }

    /// A TLS connection to `port` on loopback that trusts only this certificate.
    pub fn connect(&self, port: u16) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        rustls::StreamOwned::new(connection, plain(port))
    }
}

/// A plain loopback connection with a 5 s read timeout.
pub fn plain(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads bytes off a stream on demand, keeping what was read past the last answer.
pub struct Reader<S: Wire> {
    pub stream: S,
    buffered: Vec<u8>,
}

impl<S: Wire> Reader<S> {
    pub fn new(stream: S) -> Reader<S> {
        Reader {
            stream,
            buffered: Vec::new(),
        }
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next `\n`-terminated line (without it); `None` at EOF or timeout.
    pub fn line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffered.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=end).collect();
                return Some(
                    String::from_utf8_lossy(&line[..end])
                        .trim_end_matches('\r')
                        .to_owned(),
                );
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// The next JSON line.
    pub fn json(&mut self) -> Option<serde_json::Value> {
        self.line()
            .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
    }

    /// The next JSON line whose `type` is not `ping`.
    pub fn json_skipping_pings(&mut self) -> Option<serde_json::Value> {
        loop {
            let value = self.json()?;
            if value["type"] != "ping" {
                return Some(value);
            }
        }
    }

    fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buffered.len() < n {
            if !self.fill() {
                return None;
            }
        }
        Some(self.buffered.drain(..n).collect())
    }

    /// The next RESP reply.
    pub fn resp(&mut self) -> Option<Resp> {
        let head = self.line()?;
        let (marker, rest) = head.split_at(1);
        Some(match marker {
            "+" => Resp::Simple(rest.to_owned()),
            "-" => Resp::Error(rest.to_owned()),
            ":" => Resp::Int(rest.parse().unwrap()),
            "_" => Resp::Nil,
            "$" => {
                let len: i64 = rest.parse().unwrap();
                if len < 0 {
                    Resp::Nil
                } else {
                    let bytes = self.exact(len as usize + 2)?;
                    Resp::Bulk(String::from_utf8_lossy(&bytes[..len as usize]).into_owned())
                }
            }
            "*" | ">" | "%" => {
                let mut len: usize = rest.parse().unwrap();
                if marker == "%" {
                    len *= 2;
                }
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.resp()?);
                }
                if marker == ">" {
                    Resp::Push(items)
                } else {
                    Resp::Array(items)
                }
            }
            other => panic!("unexpected RESP marker {other:?} in {head:?}"),
        })
    }
}

/// A RESP reply, as far as these tests need to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(String),
    Nil,
    Array(Vec<Resp>),
    Push(Vec<Resp>),
}

impl Resp {
    /// Bulk strings of an array or push reply, for easy comparison.
    pub fn words(&self) -> Vec<String> {
        match self {
            Resp::Array(items) | Resp::Push(items) => items
                .iter()
                .map(|item| match item {
                    Resp::Bulk(s) | Resp::Simple(s) => s.clone(),
                    Resp::Int(n) => n.to_string(),
                    other => format!("{other:?}"),
                })
                .collect(),
            other => panic!("not an aggregate: {other:?}"),
        }
    }
}

/// A RESP command as a multibulk array.
pub fn command(words: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        out.extend(format!("${}\r\n{word}\r\n", word.len()).into_bytes());
    }
    out
}

/// The `Sec-WebSocket-Key` of hand-written upgrade requests (RFC 6455's own example).
pub const UPGRADE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A hand-written WebSocket upgrade request on `path` carrying `token` (the `t` object),
/// with `extra` header lines (each ending in CRLF) before the blank line.
pub fn upgrade_request(path: &str, token: &serde_json::Value, extra: &str) -> String {
    let t = super::url_encode(&token.to_string());
    format!(
        "GET {path}?t={t} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {UPGRADE_KEY}\r\n{extra}\r\n"
    )
}

/// The masking key of hand-built client frames.
pub const FRAME_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame: `first` is FIN/RSV/opcode, the length in its shortest form.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&FRAME_MASK);
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ FRAME_MASK[i & 3]),
    );
    out
}
