//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutual TLS.

pub mod client;
pub mod header_limit;
pub mod pool;
pub mod server;
pub mod stream_io;
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
    #[error("connecting to {target}: no answer within {after:?}")]
    ConnectTimeout {
        target: std::net::SocketAddr,
        after: std::time::Duration,
    },
    #[error("the TLS + HTTP/2 handshake did not complete within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("the socket's addresses: {0}")]
    Socket(std::io::Error),
    #[error("every pooled connection filled up before a stream could be opened on it")]
    NoFreeStream,
    #[error("through the network gateway: {0}")]
    Gateway(std::sync::Arc<HboneError>),
}

/// One tunnelled connection: the two halves of an HTTP/2 stream, and the budget of what its
/// connection may hold on its way to the peer.
pub struct H2Stream {
    pub send: h2::SendStream<bytes::Bytes>,
    pub recv: h2::RecvStream,
    pub buffers: std::sync::Arc<crate::proxy::buffers::ConnectionBuffers>,
}
