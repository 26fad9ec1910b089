//! Inbound HBONE: a CONNECT stream from a peer weft (or ztunnel) is authorized and connected to
//! the app, from the client's own source IP.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::authorize;
use super::relay::{self, TcpSide, Transferred};
use super::socket::{self, SocketFactory};
use super::tracker::{AdmittedConnection, TrackedConnection};
use super::ProxyContext;
use crate::hbone::server::{reply, StreamHandler, TunnelPeer};
use crate::hbone::{wire, H2Stream};
use crate::metrics::access_log::{AccessLogEntry, Direction};
use crate::metrics::connection::ConnectionGuard;
use crate::metrics::labels::{ConnLabels, Peers, Reporter, ResponseFlags};

/// Bounds the connect to the app; past it the client gets 503.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The inbound side of one workload's HBONE listener.
pub struct Inbound {
    pub ctx: Arc<ProxyContext>,
    pub factory: Arc<dyn SocketFactory>,
}

/// Connects to the app, from `client_ip` when preserving source addresses. A client address
/// that cannot be bound here (no privilege) falls back to weft's own, which is logged.
pub async fn connect_upstream(
    ctx: &ProxyContext,
    factory: &dyn SocketFactory,
    dest: SocketAddr,
    client_ip: IpAddr,
) -> std::io::Result<TcpStream> {
    let attempt = |src: Option<IpAddr>| {
        tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            socket::connect(factory, dest, src),
        )
    };
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    if !ctx.settings.preserve_source_ip || client_ip.is_ipv4() != dest.is_ipv4() {
        return attempt(None).await.map_err(|_| timed_out())?;
    }
    match attempt(Some(client_ip)).await.map_err(|_| timed_out())? {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EADDRNOTAVAIL)
            ) =>
        {
            warn!(%client_ip, %dest, error = %e, "cannot connect from the client's address; using weft's own");
            attempt(None).await.map_err(|_| timed_out())?
        }
        other => other,
    }
}

/// An inbound connection that passed authorization and reached the app.
struct Admitted {
    upstream: TcpStream,
    stream: H2Stream,
    guard: ConnectionGuard,
    tracked: TrackedConnection,
}

impl StreamHandler for Inbound {
    async fn handle(
        self: Arc<Self>,
        peer: Arc<TunnelPeer>,
        dest: SocketAddr,
        req: Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        // Boxed for the reason given in `Outbound::handle`: only relaying state stays.
        let Some(Admitted {
            upstream,
            stream,
            mut guard,
            tracked,
        }) = Box::pin(self.admit(peer, dest, req, respond)).await
        else {
            return;
        };
        let counters = guard.counters().clone();
        let relay = pin!(relay::tcp_h2(upstream, stream, TcpSide::Server, &counters));
        relay_admitted(&self.ctx, &mut guard, &tracked, relay).await;
    }
}

impl Inbound {
    /// Authorizes the stream and connects to the app, answering the peer: 200 once both
    /// succeeded, else 400/401/503 and `None` (the guard has recorded why).
    async fn admit(
        &self,
        peer: Arc<TunnelPeer>,
        dest: SocketAddr,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Admitted> {
        let snap = self.ctx.state.snapshot();
        let dst = snap.workload_by_ip(dest.ip()).cloned();
        let client_ip = wire::canonical(peer.addr.ip());
        let src = snap.workload_by_ip(client_ip).cloned();
        let src_identity = peer.identity().cloned();
        let dst_identity = dst.as_ref().map(|d| d.identity());
        let dst_svc = dst
            .as_ref()
            .and_then(|d| snap.services_of(&d.uid).next().cloned());
        let labels = ConnLabels::new(
            Reporter::destination,
            &Peers {
                source: src.as_deref(),
                source_identity: src_identity.as_ref(),
                destination: dst.as_deref(),
                destination_identity: dst_identity.as_ref(),
                destination_service: dst_svc.as_deref(),
            },
            true,
        );
        let client_addr = wire::forwarded_for(&req).unwrap_or(peer.addr);
        let mut entry = AccessLogEntry::new(Direction::Inbound, client_addr, dest);
        entry.protocol = "HBONE";
        entry.upstream = Some(dest);
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);

        if self.ctx.own_ports().contains(&dest.port()) {
            reply(&mut respond, StatusCode::BAD_REQUEST);
            guard.fail(
                ResponseFlags::Connect,
                format!("{dest} is one of weft's own ports"),
            );
            return None;
        }
        let Some(dst) = dst else {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            guard.fail(
                ResponseFlags::Connect,
                format!("no workload has address {}", dest.ip()),
            );
            return None;
        };
        let admitted = AdmittedConnection {
            destination_uid: dst.uid.clone(),
            source_ip: client_ip,
            source_identity: src_identity,
            destination_ip: dest.ip(),
            destination_port: dest.port(),
        };
        if let Err(reason) = authorize::check(&snap, &dst, &admitted) {
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            guard.fail(ResponseFlags::Deny, reason);
            return None;
        }
        drop(snap);
        let upstream = match connect_upstream(&self.ctx, &*self.factory, dest, client_ip).await {
            Ok(s) => s,
            Err(e) => {
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                guard.fail(ResponseFlags::Connect, format!("connecting to {dest}: {e}"));
                return None;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client went away before the tunnel opened");
                guard.fail(ResponseFlags::Connect, e);
                return None;
            }
        };
        Some(Admitted {
            upstream,
            stream: H2Stream {
                send,
                recv: req.into_body(),
            },
            guard,
            tracked: self.ctx.tracker.track(admitted),
        })
    }
}

/// Relays an admitted connection until it ends, or until a policy change no longer allows it.
/// The relay is pinned by the caller (see `relay::both` for why).
pub(super) async fn relay_admitted(
    ctx: &ProxyContext,
    guard: &mut ConnectionGuard,
    tracked: &TrackedConnection,
    relay: Pin<&mut impl Future<Output = (Transferred, std::io::Result<()>)>>,
) {
    tokio::select! {
        outcome = relay => relay::record(guard, outcome),
        () = tracked.revoked() => {
            ctx.metrics.connections_closed_by_policy.inc();
            guard.fail(ResponseFlags::Deny, "closed: a policy change no longer allows it");
        }
    }
}
