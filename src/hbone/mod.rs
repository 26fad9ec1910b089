//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutual TLS.

pub mod client;
pub mod pool;
pub mod server;
pub mod tls;
pub mod verified;
pub mod wire;

use http::StatusCode;

/// Why a tunnel could not be opened or carried on.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {target}: {source}")]
    Connect {
        target: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        peer: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    TlsSetup(#[from] tls::TlsSetupError),
    #[error("no certificate to present: {0}")]
    Certificate(#[from] crate::identity::CertManagerError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("tunnel refused with status {0}")]
    Refused(StatusCode),
    #[error("timed out after {0:?} {1}")]
    Timeout(std::time::Duration, &'static str),
}

/// One tunnelled connection: the two halves of an HTTP/2 stream.
pub struct H2Stream {
    pub send: h2::SendStream<bytes::Bytes>,
    pub recv: h2::RecvStream,
}
