//! The client side of HBONE: TLS + HTTP/2 handshake on a connected socket, keepalive, and
//! opening CONNECT streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::wire::{self, ConnectRequest};
use super::{H2Stream, HboneError};
use crate::config::{H2Tuning, Limits};
use crate::proxy::buffers::{ConnectionBuffers, SendBuffers};

/// A live HTTP/2 connection to a peer's HBONE port.
pub struct TunnelConnection {
    pub sender: SendRequest<Bytes>,
    /// Set when the connection's driver has finished: no new streams can use it.
    pub closed: Arc<AtomicBool>,
    /// What its streams may hold on their way to the peer.
    pub buffers: Arc<ConnectionBuffers>,
}

impl TunnelConnection {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// TLS then HTTP/2 over `tcp` (within the handshake limit, so a silent peer cannot hold a pool
/// slot), then a driver task (with PING keepalive) owns the connection.
pub async fn handshake(
    tcp: TcpStream,
    tls: Arc<ClientConfig>,
    tuning: &H2Tuning,
    limits: &Limits,
    buffers: &Arc<SendBuffers>,
) -> Result<TunnelConnection, HboneError> {
    let peer: SocketAddr = tcp.peer_addr().map_err(HboneError::Socket)?;
    handshake_over(tcp, peer, tls, tuning, limits, buffers).await
}

/// The same over any byte stream: a socket, or an outer CONNECT stream to a network's gateway
/// (double HBONE). `peer` names the far end in logs and as the TLS server name (weft checks
/// SPIFFE identities, never the name).
pub async fn handshake_over<IO>(
    io: IO,
    peer: SocketAddr,
    tls: Arc<ClientConfig>,
    tuning: &H2Tuning,
    limits: &Limits,
    buffers: &Arc<SendBuffers>,
) -> Result<TunnelConnection, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fut = async {
        let tls_stream = TlsConnector::from(tls)
            .connect(ServerName::IpAddress(peer.ip().into()), io)
            .await
            .map_err(|source| HboneError::Handshake { peer, source })?;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(tuning.stream_window)
            .initial_connection_window_size(tuning.connection_window)
            .max_frame_size(tuning.max_frame_size)
            .max_send_buffer_size(limits.stream_send_buffer)
            .max_header_list_size(limits.header_list_bytes)
            .enable_push(false)
            .handshake::<_, Bytes>(tls_stream)
            .await?;
        Ok::<_, HboneError>((sender, conn))
    };
    let (sender, mut conn) = tokio::time::timeout(limits.handshake_timeout, fut)
        .await
        .map_err(|_| HboneError::HandshakeTimeout(limits.handshake_timeout))??;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let ping = conn.ping_pong();
    let (interval, timeout) = (tuning.keepalive_interval, tuning.keepalive_timeout);
    tokio::spawn(async move {
        let keepalive = async move {
            let Some(mut ping) = ping else {
                return std::future::pending::<()>().await;
            };
            loop {
                tokio::time::sleep(interval).await;
                match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "keepalive ping failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "keepalive ping timed out; closing the tunnel connection");
                        return;
                    }
                }
            }
        };
        tokio::select! {
            r = &mut conn => if let Err(e) = r { debug!(%peer, error = %e, "tunnel connection ended") },
            () = keepalive => {}
        }
        done.store(true, Ordering::Release);
    });
    Ok(TunnelConnection {
        sender,
        closed,
        buffers: buffers.for_connection(peer),
    })
}

/// A CONNECT stream the peer accepted.
pub struct OpenedStream {
    pub stream: H2Stream,
    /// The answer's `baggage`: the far end's description of the workload the stream reached
    /// (a shared handle on the received header, not a copy).
    pub baggage: Option<HeaderValue>,
}

/// Sends CONNECT and waits for the answer; anything but 200 is an error.
pub async fn open_stream(
    conn: &TunnelConnection,
    req: &ConnectRequest,
) -> Result<OpenedStream, HboneError> {
    let mut ready = conn.sender.clone().ready().await?;
    let (response, send) = ready.send_request(wire::connect_request(req), false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused(response.status()));
    }
    let baggage = response.headers().get(wire::BAGGAGE_HEADER).cloned();
    Ok(OpenedStream {
        stream: H2Stream {
            send,
            recv: response.into_body(),
            buffers: conn.buffers.clone(),
        },
        baggage,
    })
}
