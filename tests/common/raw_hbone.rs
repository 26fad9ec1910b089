//! A raw HBONE client (plain `h2` + `rustls`, independent of weft's client) for tests that
//! judge weft's server: it presents whatever certificate a test chooses and trusts any server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use weft::identity::{CertificateAuthority, Identity};

use super::ca_dir;

/// The test client trusts any server: what is under test is the server's judgement of clients.
#[derive(Debug)]
pub struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A raw client config presenting a certificate for `id` from `signer` (or none).
pub fn raw_config(cert: Option<(&CertificateAuthority, Identity)>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut cfg = match cert {
        Some((signer, id)) => {
            let c = signer.issue(&id, Duration::from_secs(3600)).unwrap();
            b.with_client_auth_cert(c.chain, c.key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

pub fn mesh_ca() -> CertificateAuthority {
    CertificateAuthority::load(&ca_dir()).unwrap()
}

pub fn client_id() -> Identity {
    Identity::new("cluster.local", "shop", "client-sa")
}

/// TLS + HTTP/2 to `addr`; the error is whatever broke first.
pub async fn raw_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    raw_connect_from(None, addr, cfg).await
}

/// As [`raw_connect`], from the source address `src` when given.
pub async fn raw_connect_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = match src {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            s.bind(SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
            s.connect(addr).await
        }
    }
    .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // With TLS 1.3 a refused client certificate shows up on first use, so make one round trip.
    let mut ready = send.clone().ready().await.map_err(|e| e.to_string())?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(addr.to_string())
        .body(())
        .unwrap();
    let (resp, _s) = ready.send_request(req, true).map_err(|e| e.to_string())?;
    resp.await.map_err(|e| e.to_string())?;
    Ok(send)
}

pub async fn request(
    send: &h2::client::SendRequest<Bytes>,
    req: Request<()>,
) -> (StatusCode, Option<(h2::SendStream<Bytes>, h2::RecvStream)>) {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, stream) = ready.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    (
        status,
        (status == StatusCode::OK).then(|| (stream, resp.into_body())),
    )
}

pub fn connect_req(authority: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .header("forwarded", "for=\"10.9.9.9:1234\"")
        .body(())
        .unwrap()
}

pub async fn echo_through(
    send: &h2::client::SendRequest<Bytes>,
    echo: SocketAddr,
    msg: &'static [u8],
) {
    let (status, stream) = request(send, connect_req(echo)).await;
    assert_eq!(status, StatusCode::OK);
    let (mut tx, mut rx) = stream.unwrap();
    assert_eq!(finish_and_read(&mut tx, &mut rx, msg).await, msg);
}

/// Sends `msg` as a stream's last data, then reads the stream to its end (returning window as
/// it goes); what came back.
pub async fn finish_and_read(
    tx: &mut h2::SendStream<Bytes>,
    rx: &mut h2::RecvStream,
    msg: &'static [u8],
) -> Vec<u8> {
    tx.send_data(Bytes::from_static(msg), true).unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        rx.flow_control().release_capacity(chunk.len()).unwrap();
        got.extend_from_slice(&chunk);
    }
    got
}

/// A byte stream that stops reading when told to: the peer that grants window and then never
/// reads its socket.
pub struct StallingIo<T> {
    inner: T,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallingIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stalled.load(std::sync::atomic::Ordering::Acquire) {
            // Never woken: this peer reads nothing more.
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallingIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TLS + HTTP/2 to `addr` granting `window` bytes per stream (and 64 times that for the
/// connection); storing `true` in the flag makes the client stop reading its socket. Aborting
/// the task closes the connection.
pub async fn stalling_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = StallingIo {
        inner: tcp,
        stalled: stalled.clone(),
    };
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(addr.ip().into()), io)
        .await
        .unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window.saturating_mul(64))
        .handshake(tls)
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, stalled, task)
}
