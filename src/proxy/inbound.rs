//! Inbound HBONE: a CONNECT stream from a peer weft (or ztunnel) goes through the pod's
//! [`InboundDoor`] and, once admitted, is relayed to the app.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::Request;
use tokio::net::TcpStream;
use tracing::debug;

use super::admit::{Admitted, Caller, InboundDoor};
use super::relay::{self, TcpSide, Transferred};
use super::tracker::TrackedConnection;
use super::ProxyContext;
use crate::hbone::server::{reply, StreamHandler, TunnelPeer};
use crate::hbone::{wire, H2Stream};
use crate::metrics::connection::ConnectionGuard;
use crate::metrics::labels::ResponseFlags;

/// The inbound side of one workload's HBONE listener.
pub struct Inbound {
    pub door: Arc<InboundDoor>,
}

/// An inbound stream that passed admission and whose peer has its 200.
struct Opened {
    upstream: TcpStream,
    stream: H2Stream,
    guard: ConnectionGuard,
    tracked: TrackedConnection,
}

impl StreamHandler for Inbound {
    async fn handle(
        self: Arc<Self>,
        peer: Arc<TunnelPeer>,
        dest: wire::Authority,
        req: Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        // Boxed for the reason given in `Outbound::handle`: only relaying state stays.
        let Some(Opened {
            upstream,
            stream,
            mut guard,
            tracked,
        }) = Box::pin(self.open(peer, dest, req, respond)).await
        else {
            return;
        };
        let counters = guard.counters().clone();
        let relay = pin!(relay::tcp_h2(upstream, stream, TcpSide::Server, &counters));
        relay_admitted(&self.door.ctx, &mut guard, &tracked, relay).await;
    }
}

impl Inbound {
    /// Admits the stream and answers the peer: 200 once the app is connected, else the
    /// refusal's status and `None` (the guard has recorded why).
    async fn open(
        &self,
        peer: Arc<TunnelPeer>,
        dest: wire::Authority,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Opened> {
        let caller = Caller {
            peer: peer.addr,
            claimed: wire::forwarded_for(&req),
            identity: peer.identity(),
            dest,
            arrived_on: wire::canonical(peer.local.ip()),
            origin_network: wire::origin_network(&req),
            baggage: wire::baggage(&req),
        };
        let (mut guard, admitted) = self.door.admit(caller).await;
        let Admitted {
            upstream,
            tracked,
            destination,
        } = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                reply(&mut respond, refusal.status());
                return None;
            }
        };
        let send = match respond.send_response(
            wire::connect_response(&destination.baggage().header()),
            false,
        ) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client went away before the tunnel opened");
                guard.fail(ResponseFlags::Connect, e);
                return None;
            }
        };
        Some(Opened {
            upstream,
            stream: H2Stream {
                send,
                recv: req.into_body(),
                buffers: peer.buffers.clone(),
            },
            guard,
            tracked,
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
