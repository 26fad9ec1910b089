//! Inbound HBONE: a CONNECT stream from a peer weft (or ztunnel) is authorized and connected to
//! the app, from the client's own source IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::authorize;
use super::relay::{self, TcpSide};
use super::socket::{self, SocketFactory};
use super::tracker::AdmittedConnection;
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

impl StreamHandler for Inbound {
    async fn handle(
        self: Arc<Self>,
        peer: Arc<TunnelPeer>,
        dest: SocketAddr,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
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
        if let Some(s) = &src {
            entry.src_workload = s.workload_name_or_name().to_string();
            entry.src_namespace = s.namespace.clone();
        }
        if let Some(id) = &src_identity {
            entry.src_identity = id.to_string();
        }
        if let Some(d) = &dst {
            entry.dst_workload = d.workload_name_or_name().to_string();
            entry.dst_namespace = d.namespace.clone();
        }
        if let Some(id) = &dst_identity {
            entry.dst_identity = id.to_string();
        }
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);

        if self.ctx.own_ports().contains(&dest.port()) {
            reply(&mut respond, StatusCode::BAD_REQUEST);
            guard.fail(
                ResponseFlags::Connect,
                format!("{dest} is one of weft's own ports"),
            );
            return;
        }
        let Some(dst) = dst else {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            guard.fail(
                ResponseFlags::Connect,
                format!("no workload has address {}", dest.ip()),
            );
            return;
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
            return;
        }
        drop(snap);
        let upstream = match connect_upstream(&self.ctx, &*self.factory, dest, client_ip).await {
            Ok(s) => s,
            Err(e) => {
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                guard.fail(ResponseFlags::Connect, format!("connecting to {dest}: {e}"));
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client went away before the tunnel opened");
                guard.fail(ResponseFlags::Connect, e);
                return;
            }
        };
        let tracked = self.ctx.tracker.track(admitted);
        let stream = H2Stream {
            send,
            recv: req.into_body(),
        };
        tokio::select! {
            (t, result) = relay::tcp_h2(upstream, stream, TcpSide::Server, guard.counters()) => {
                guard.set_bytes(t.to_server, t.to_client);
                if let Err(e) = result {
                    guard.note_error(e);
                }
            }
            () = tracked.revoked() => {
                self.ctx.metrics.connections_closed_by_policy.inc();
                guard.fail(ResponseFlags::Deny, "closed: a policy change no longer allows it");
            }
        }
    }
}
