//! gRPC channels to the control plane (istiod's xDS and CA, `weft ca serve`): TLS 1.3 or 1.2
//! verified against the mesh root, HTTP/2 by tonic, and the bearer token of the node agent.
//!
//! One place builds these channels so that the xDS client and the CA client agree on how the
//! control plane is trusted: the root bundle from a file (Istio's `XDS_ROOT_CA` / `CA_ROOT_CA`),
//! and the name its certificate must carry, which is the address's host unless an alternative
//! is given (Istio's `ALT_XDS_HOSTNAME` / `ALT_CA_HOSTNAME`, for when the address is an IP).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one TCP + TLS connect to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive on control-plane streams: a silently dead istiod is noticed in seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("control-plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("reading the control-plane root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("reading the token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token in {path} is not a valid header value")]
    TokenValue { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where a control-plane service is and how to trust it.
#[derive(Clone, Debug)]
pub struct GrpcTarget {
    /// `https://host:port`, or `host:port`.
    pub address: String,
    /// PEM bundle of the roots the server's certificate must chain to.
    pub root_cert: PathBuf,
    /// The name the server's certificate must carry, when not the address's host.
    pub server_name: Option<String>,
}

impl GrpcTarget {
    fn authority(&self) -> Result<(String, u16), GrpcError> {
        let bad = |reason: &str| GrpcError::Address {
            address: self.address.clone(),
            reason: reason.to_string(),
        };
        let rest = self
            .address
            .strip_prefix("https://")
            .unwrap_or(&self.address);
        let rest = rest.trim_end_matches('/');
        let uri: Uri = format!("https://{rest}")
            .parse()
            .map_err(|_| bad("not a host:port"))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok((host.to_string(), uri.port_u16().unwrap_or(443)))
    }
}

/// Reads a PEM bundle of certificates.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, GrpcError> {
    let err = |reason: String| GrpcError::Root {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// A channel to `target`. It connects lazily and reconnects by itself; the root bundle is read
/// now, so a missing or broken file is reported at once.
pub fn channel(target: &GrpcTarget) -> Result<Channel, GrpcError> {
    let (host, port) = target.authority()?;
    let name = target.server_name.clone().unwrap_or_else(|| host.clone());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| GrpcError::Address {
        address: target.address.clone(),
        reason: format!("{name:?} is not a valid TLS server name"),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for der in read_roots(&target.root_cert)? {
        roots.add(der).map_err(GrpcError::Tls)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    // The URI is only what tonic puts in `:authority`; the connector below decides where to go.
    let endpoint = Endpoint::from_shared(format!("https://{name}:{port}"))
        .map_err(|e| GrpcError::Address {
            address: target.address.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let dial = tower::service_fn(move |_: Uri| {
        let (host, connector, server_name) = (host.clone(), connector.clone(), server_name.clone());
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(dial))
}

/// A bearer token read from a file on every use: projected service-account tokens are rotated
/// by the kubelet, so a cached copy would expire.
#[derive(Clone, Debug)]
pub struct TokenFile {
    pub path: PathBuf,
}

impl TokenFile {
    /// `Bearer <token>`, ready for the `authorization` metadata.
    ///
    /// Reads a small file synchronously: called once per control-plane request (a stream open,
    /// a certificate request), never on the data path.
    pub fn bearer(&self) -> Result<MetadataValue<Ascii>, GrpcError> {
        let token = std::fs::read_to_string(&self.path).map_err(|source| GrpcError::Token {
            path: self.path.clone(),
            source,
        })?;
        format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| GrpcError::TokenValue {
                path: self.path.clone(),
            })
    }
}

/// One accepted TLS connection, in the form tonic's server takes.
pub struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// How long a client may take over its TLS handshake before it is dropped.
const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC server's TLS: this certificate chain and key, TLS 1.3 only, ALPN `h2`, no client
/// certificates (callers authenticate with bearer tokens).
pub fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// The TLS connections accepted on `listener`, for `tonic::transport::Server::
/// serve_with_incoming`. Each handshake runs in its own task, so a slow or silent client
/// never holds up the others; a failed one is logged and dropped.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // One small request, one small answer: without this the reply waits for the
            // client's delayed ACK (tens of milliseconds per sequential call).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "gRPC server: TCP_NODELAY");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConnection(tls))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "gRPC server: TLS handshake failed")
                    }
                    Err(_) => tracing::info!(%peer, "gRPC server: TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(address: &str) -> GrpcTarget {
        GrpcTarget {
            address: address.into(),
            root_cert: PathBuf::from("/nonexistent"),
            server_name: None,
        }
    }

    #[test]
    fn authority_from_istio_style_addresses() {
        assert_eq!(
            target("https://istiod.istio-system.svc:15012")
                .authority()
                .unwrap(),
            ("istiod.istio-system.svc".into(), 15012)
        );
        assert_eq!(
            target("127.0.0.1:4000").authority().unwrap(),
            ("127.0.0.1".into(), 4000)
        );
        assert_eq!(
            target("https://[::1]:15012").authority().unwrap(),
            ("::1".into(), 15012)
        );
        assert!(target("https://").authority().is_err());
    }

    #[test]
    fn a_missing_root_is_named() {
        let e = channel(&target("127.0.0.1:1")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent"), "{e}");
    }
}
