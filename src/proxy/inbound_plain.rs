//! Inbound plaintext: a client outside the mesh connects to a captured pod; authorization sees
//! only its IP (no identity), then the connection goes to the app.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::authorize;
use super::inbound::connect_upstream;
use super::relay;
use super::socket::{self, SocketFactory};
use super::tracker::AdmittedConnection;
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
        let Ok(client_addr) = client.peer_addr() else {
            return;
        };
        socket::tune(&client);
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
        if let Some(s) = &src {
            entry.src_workload = s.workload_name_or_name().to_string();
            entry.src_namespace = s.namespace.clone();
        }
        if let Some(d) = &dst {
            entry.dst_workload = d.workload_name_or_name().to_string();
            entry.dst_namespace = d.namespace.clone();
            entry.dst_identity = d.identity().to_string();
        }
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);
        if self.ctx.own_ports().contains(&original_dst.port()) {
            guard.fail(
                ResponseFlags::Connect,
                format!("{original_dst} is one of weft's own ports"),
            );
            return;
        }
        let Some(dst) = dst else {
            guard.fail(
                ResponseFlags::Connect,
                format!("no workload has address {}", original_dst.ip()),
            );
            return;
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
            return;
        }
        drop(snap);
        let upstream =
            match connect_upstream(&self.ctx, &*self.factory, original_dst, client_ip).await {
                Ok(s) => s,
                Err(e) => {
                    guard.fail(
                        ResponseFlags::Connect,
                        format!("connecting to {original_dst}: {e}"),
                    );
                    return;
                }
            };
        let tracked = self.ctx.tracker.track(admitted);
        tokio::select! {
            (t, result) = relay::tcp_tcp(client, upstream, guard.counters()) => {
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
