//! The server side of HBONE: TLS (client certificate required), HTTP/2, and one task per
//! CONNECT stream. Requests that are malformed are answered 400 here; what a valid request leads
//! to (policy, upstream) is the [`StreamHandler`]'s business.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::tls::peer_identities;
use super::wire;
use super::HboneError;
use crate::config::H2Tuning;
use crate::identity::Identity;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The authenticated peer of a tunnel connection.
#[derive(Debug)]
pub struct TunnelPeer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    /// Proven by the client certificate; the first is the one used for policy.
    pub identities: Vec<Identity>,
}

impl TunnelPeer {
    pub fn identity(&self) -> Option<&Identity> {
        self.identities.first()
    }
}

/// Handles one validated CONNECT stream. `dest` is the `ip:port` the client asked for.
pub trait StreamHandler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        peer: Arc<TunnelPeer>,
        dest: SocketAddr,
        req: Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send;
}

/// Answers a stream with a bare status and ends it.
pub fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if let Err(e) = respond.send_response(resp, true) {
        debug!(error = %e, %status, "could not send response");
    }
}

/// Serves one accepted TCP connection until the client goes away.
pub async fn serve<H: StreamHandler>(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    tuning: H2Tuning,
    handler: Arc<H>,
) -> Result<(), HboneError> {
    let addr = tcp.peer_addr().map_err(|source| HboneError::Connect {
        target: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let local = tcp.local_addr().map_err(|source| HboneError::Connect {
        target: addr,
        source,
    })?;
    let handshake = async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|source| HboneError::Handshake { peer: addr, source })?;
        let identities = peer_identities(tls.get_ref().1.peer_certificates());
        let conn = h2::server::Builder::new()
            .initial_window_size(tuning.stream_window)
            .initial_connection_window_size(tuning.connection_window)
            .max_frame_size(tuning.max_frame_size)
            .max_send_buffer_size(tuning.stream_window as usize)
            .handshake::<_, Bytes>(tls)
            .await?;
        Ok::<_, HboneError>((conn, identities))
    };
    let (mut conn, identities) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(peer = %addr, %local, error = %e, "HBONE connection refused");
            return Err(e);
        }
        Err(_) => {
            warn!(peer = %addr, %local, "HBONE handshake timed out");
            return Err(HboneError::Timeout(
                HANDSHAKE_TIMEOUT,
                "for the HBONE handshake",
            ));
        }
    };
    let peer = Arc::new(TunnelPeer {
        addr,
        local,
        identities,
    });
    let arrived_on: IpAddr = local.ip();
    while let Some(next) = conn.accept().await {
        let (req, mut respond) = match next {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = %addr, error = %e, "HBONE connection ended");
                return Err(e.into());
            }
        };
        match wire::validate(&req, arrived_on) {
            Ok(dest) => {
                tokio::spawn(handler.clone().handle(peer.clone(), dest, req, respond));
            }
            Err(refusal) => {
                warn!(peer = %addr, %local, identity = ?peer.identity().map(ToString::to_string),
                    reason = %refusal.reason, status = refusal.status.as_u16(), "HBONE request refused");
                reply(&mut respond, refusal.status);
            }
        }
    }
    Ok(())
}
