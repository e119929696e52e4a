//! TLS for client listeners (wss, and raw TCP when `tcp_tls` is on), with rustls.
//!
//! Owns loading the certificate chain and key once at start-up into a shared server
//! configuration; each connection's handshake then runs on its shard like any other
//! read and write. A TLS session cannot take pushes straight into its socket (records
//! are written by rustls in the connection task), so its pushes always go through the
//! session's queue.

use std::path::Path;
use std::sync::Arc;

use futures_rustls::TlsAcceptor;
use futures_rustls::rustls::ServerConfig;
use futures_rustls::rustls::crypto::ring;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Accepts TLS connections with the node's certificate.
pub(crate) type Acceptor = TlsAcceptor;

/// Why the certificate or key could not be used; names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("config key `{key}`: cannot read {path}: {reason}")]
    Unreadable {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("config key `wss_cert_pem`: {0} holds no certificate")]
    NoCertificate(String),
    #[error("config keys `wss_cert_pem`/`wss_key_pem`: {0}")]
    Mismatch(String),
}

/// Builds the acceptor from PEM files (a full chain, and a PKCS#8, PKCS#1 or SEC1 key).
pub(crate) fn acceptor(cert_pem: &Path, key_pem: &Path) -> Result<Acceptor, TlsError> {
    let unreadable = |key, path: &Path, reason: String| TlsError::Unreadable {
        key,
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable("wss_cert_pem", cert_pem, e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_pem.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| unreadable("wss_key_pem", key_pem, e.to_string()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
