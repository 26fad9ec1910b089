//! The server side of HBONE: TLS (client certificate required), HTTP/2, and one task per
//! CONNECT stream. Requests that are malformed are answered 400 here; what a valid request leads
//! to (policy, upstream) is the [`StreamHandler`]'s business.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::tls::peer_identities;
use super::wire;
use super::HboneError;
use crate::config::{H2Tuning, Limits};
use crate::identity::Identity;
use crate::proxy::limits::{Limit, LimitReports};

/// How an HBONE server connection is run: HTTP/2 tuning, the limits, and where reached limits
/// are reported.
#[derive(Clone)]
pub struct ServeOptions {
    pub tuning: H2Tuning,
    pub limits: Limits,
    pub reports: Arc<LimitReports>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub buffers: Arc<crate::proxy::buffers::SendBuffers>,
}

/// The streams in flight on one connection, and since when it has had none.
struct StreamCount {
    active: AtomicUsize,
    born: Instant,
    /// Milliseconds after `born` when the last stream ended.
    idle_since: AtomicU64,
}

impl StreamCount {
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        Some(self.born.elapsed().saturating_sub(since))
    }
}

/// Counts one stream for as long as its handler runs.
struct StreamSlot(Arc<StreamCount>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since
            .store(c.born.elapsed().as_millis() as u64, Ordering::Release);
        c.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The authenticated peer of a tunnel connection.
#[derive(Debug)]
pub struct TunnelPeer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    /// Proven by the client certificate; the first is the one used for policy.
    pub identities: Vec<Identity>,
    /// What the connection's streams may hold on their way to this peer.
    pub buffers: Arc<crate::proxy::buffers::ConnectionBuffers>,
}

impl TunnelPeer {
    pub fn identity(&self) -> Option<&Identity> {
        self.identities.first()
    }
}

/// Handles one validated CONNECT stream. `dest` is what the client asked for: an `ip:port`
/// on the address the tunnel arrived on, or a service hostname and port.
pub trait StreamHandler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        peer: Arc<TunnelPeer>,
        dest: wire::Authority,
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

/// Serves one accepted TCP connection until the client goes away, the connection has carried
/// no stream for the idle limit, or `drain` fires; the last two end it with GOAWAY, and streams
/// in flight run to their end.
pub async fn serve<H: StreamHandler>(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    options: &ServeOptions,
    handler: Arc<H>,
    drain: impl Future<Output = ()>,
) -> Result<(), HboneError> {
    let addr = tcp.peer_addr().map_err(HboneError::Socket)?;
    let local = tcp.local_addr().map_err(HboneError::Socket)?;
    let (tuning, limits) = (&options.tuning, &options.limits);
    let handshake = async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|source| HboneError::Handshake { peer: addr, source })?;
        options.metrics.handshake_completed("inbound");
        let identities = peer_identities(tls.get_ref().1.peer_certificates());
        let conn = h2::server::Builder::new()
            .initial_window_size(tuning.stream_window)
            .initial_connection_window_size(tuning.connection_window)
            .max_frame_size(tuning.max_frame_size)
            .max_send_buffer_size(limits.stream_send_buffer)
            .max_concurrent_streams(limits.streams_per_connection)
            .max_header_list_size(limits.header_list_bytes)
            .handshake::<_, Bytes>(tls)
            .await?;
        Ok::<_, HboneError>((conn, identities))
    };
    let (mut conn, identities) =
        match tokio::time::timeout(limits.handshake_timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(peer = %addr, %local, error = %e, "HBONE connection refused");
                return Err(e);
            }
            Err(_) => {
                options.reports.reached(
                    Limit::HandshakeTimeout,
                    addr,
                    "HBONE handshake did not complete; connection closed",
                );
                return Err(HboneError::HandshakeTimeout(limits.handshake_timeout));
            }
        };
    let peer = Arc::new(TunnelPeer {
        addr,
        local,
        identities,
        buffers: options.buffers.for_connection(addr),
    });
    let arrived_on: IpAddr = local.ip();
    let streams = Arc::new(StreamCount {
        active: AtomicUsize::new(0),
        born: Instant::now(),
        idle_since: AtomicU64::new(0),
    });
    let mut stream_limit_reported = false;
    let mut closing = false;
    let mut idle_check =
        tokio::time::interval((limits.idle_connection / 4).max(Duration::from_millis(50)));
    let mut drain = std::pin::pin!(drain);
    loop {
        let next = tokio::select! {
            next = super::header_limit::accept(&mut conn, addr, &options.reports) => next,
            _ = idle_check.tick(), if !closing => {
                if streams.idle_for().is_some_and(|d| d >= limits.idle_connection) {
                    options.reports.reached(Limit::IdleConnection, addr, "HBONE connection without streams closed (GOAWAY)");
                    conn.graceful_shutdown();
                    closing = true;
                }
                continue;
            }
            () = &mut drain, if !closing => {
                debug!(peer = %addr, "draining: GOAWAY sent");
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
        };
        let Some(next) = next else { break };
        let (req, mut respond) = match next {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = %addr, error = %e, "HBONE connection ended");
                return Err(e.into());
            }
        };
        match wire::validate(&req, arrived_on) {
            Ok(dest) => {
                let now = streams.active.fetch_add(1, Ordering::AcqRel) + 1;
                if now >= limits.streams_per_connection as usize && !stream_limit_reported {
                    stream_limit_reported = true;
                    options.reports.reached(
                        Limit::StreamsPerConnection,
                        addr,
                        "HBONE peer holds the most concurrent streams; HTTP/2 refuses more until some end",
                    );
                }
                let slot = StreamSlot(streams.clone());
                // `map` keeps the handler's future once; an async block awaiting it would
                // hold it twice (its capture and its awaitee), doubling every stream's task.
                let stream = handler.clone().handle(peer.clone(), dest, req, respond);
                tokio::spawn(stream.map(move |()| drop(slot)));
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
