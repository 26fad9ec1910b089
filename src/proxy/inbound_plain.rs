//! Inbound plaintext: a client outside the mesh connects to a captured pod; authorization sees
//! only its IP (no identity), then the connection goes to the app.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::authorize;
use super::inbound::{connect_upstream, relay_admitted};
use super::relay;
use super::socket::SocketFactory;
use super::tracker::{AdmittedConnection, TrackedConnection};
use super::ProxyContext;
use crate::hbone::wire;
use crate::metrics::access_log::{AccessLogEntry, Direction};
use crate::metrics::connection::ConnectionGuard;
use crate::metrics::labels::{ConnLabels, Peers, Reporter, ResponseFlags};

pub struct InboundPlain {
    pub ctx: Arc<ProxyContext>,
    pub factory: Arc<dyn SocketFactory>,
}

impl InboundPlain {
    pub async fn handle(self: Arc<Self>, client: TcpStream, original_dst: SocketAddr) {
        // Boxed for the reason given in `Outbound::handle`: only relaying state stays.
        let Some((upstream, mut guard, tracked)) =
            Box::pin(self.admit(&client, original_dst)).await
        else {
            return;
        };
        let counters = guard.counters().clone();
        let relay = pin!(relay::tcp_tcp(client, upstream, &counters));
        relay_admitted(&self.ctx, &mut guard, &tracked, relay).await;
    }

    /// Authorizes the client by its address and connects to the app; `None` when either
    /// failed (the guard has recorded why).
    async fn admit(
        &self,
        client: &TcpStream,
        original_dst: SocketAddr,
    ) -> Option<(TcpStream, ConnectionGuard, TrackedConnection)> {
        let client_addr = client.peer_addr().ok()?;
        let client_ip = wire::canonical(client_addr.ip());
        let snap = self.ctx.state.snapshot();
        let dst = snap.workload_by_ip(original_dst.ip()).cloned();
        let src = snap.workload_by_ip(client_ip).cloned();
        let dst_identity = dst.as_ref().map(|d| d.identity());
        let dst_svc = dst
            .as_ref()
            .and_then(|d| snap.services_of(&d.uid).next().cloned());
        let labels = ConnLabels::new(
            Reporter::destination,
            &Peers {
                source: src.as_deref(),
                source_identity: None,
                destination: dst.as_deref(),
                destination_identity: dst_identity.as_ref(),
                destination_service: dst_svc.as_deref(),
            },
            false,
        );
        let mut entry = AccessLogEntry::new(Direction::Inbound, client_addr, original_dst);
        entry.upstream = Some(original_dst);
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);
        if self.ctx.own_ports().contains(&original_dst.port()) {
            guard.fail(
                ResponseFlags::Connect,
                format!("{original_dst} is one of weft's own ports"),
            );
            return None;
        }
        let Some(dst) = dst else {
            guard.fail(
                ResponseFlags::Connect,
                format!("no workload has address {}", original_dst.ip()),
            );
            return None;
        };
        let admitted = AdmittedConnection {
            destination_uid: dst.uid.clone(),
            source_ip: client_ip,
            source_identity: None,
            destination_ip: original_dst.ip(),
            destination_port: original_dst.port(),
        };
        if let Err(reason) = authorize::check(&snap, &dst, &admitted) {
            guard.fail(ResponseFlags::Deny, reason);
            return None;
        }
        drop(snap);
        match connect_upstream(&self.ctx, &*self.factory, original_dst, client_ip).await {
            Ok(upstream) => Some((upstream, guard, self.ctx.tracker.track(admitted))),
            Err(e) => {
                guard.fail(
                    ResponseFlags::Connect,
                    format!("connecting to {original_dst}: {e}"),
                );
                None
            }
        }
    }
}
