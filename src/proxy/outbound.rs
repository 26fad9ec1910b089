//! Outbound: a workload's connection, captured, is carried to its destination: in an HBONE
//! tunnel when the destination is in the mesh, as plain TCP otherwise.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use super::relay::{self, TcpSide};
use super::route::{decide, Route, Transport};
use super::socket::{self, SocketFactory};
use super::ProxyContext;
use crate::hbone::client::{self, open_stream};
use crate::hbone::pool::{Lease, PoolError, PoolKey};
use crate::hbone::wire::{self, ConnectRequest};
use crate::hbone::{H2Stream, HboneError};
use crate::identity::{Identity, CERTIFICATE_WAIT};
use crate::metrics::access_log::{AccessLogEntry, Direction};
use crate::metrics::connection::ConnectionGuard;
use crate::metrics::labels::{ConnLabels, Peers, Reporter, ResponseFlags};
use crate::state::Workload;

/// The outbound side of one workload.
pub struct Outbound {
    pub ctx: Arc<ProxyContext>,
    /// The workload as it was enrolled: it stands in while the control plane does not know it
    /// (a pod handed over by the CNI layer before its first update arrives).
    pub source: Arc<Workload>,
    pub factory: Arc<dyn SocketFactory>,
}

/// The source workload's own address of the destination's family: tunnels leave from it, and
/// the far side treats it as the client address.
fn source_ip(source: &Workload, dest: SocketAddr) -> Option<IpAddr> {
    source
        .workload_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dest.is_ipv4())
}

/// Where an established outbound connection's bytes go.
enum Upstream {
    /// A CONNECT stream; the lease keeps its pooled connection's stream slot.
    Tunnel(Lease, H2Stream),
    /// Plain TCP to the original destination.
    Direct(TcpStream),
}

/// An outbound connection whose upstream is in place: all that relaying needs.
struct Established {
    client: TcpStream,
    upstream: Upstream,
    guard: ConnectionGuard,
}

impl Outbound {
    /// The enrolled workload, for a pod the control plane does not know yet. Without an
    /// address of its own from the hand-off, the pod's address is the one its connection came
    /// from (redirection keeps the source).
    fn stand_in(&self, client: SocketAddr) -> Arc<Workload> {
        if !self.source.workload_ips.is_empty() || client.ip().is_loopback() {
            return self.source.clone();
        }
        Arc::new(Workload {
            workload_ips: vec![client.ip()],
            ..(*self.source).clone()
        })
    }

    pub async fn handle(self: Arc<Self>, client: TcpStream, original_dst: SocketAddr) {
        // Setting up holds far more state than relaying (routing, the pool, the tunnel
        // handshake); boxed, that state is freed once the connection is established, so a
        // long-lived connection costs only what relaying needs.
        let Some(Established {
            client,
            upstream,
            mut guard,
        }) = Box::pin(self.establish(client, original_dst)).await
        else {
            return;
        };
        let outcome = match upstream {
            Upstream::Tunnel(lease, stream) => {
                let outcome =
                    relay::tcp_h2(client, stream, TcpSide::Client, guard.counters()).await;
                drop(lease);
                outcome
            }
            Upstream::Direct(upstream) => relay::tcp_tcp(client, upstream, guard.counters()).await,
        };
        relay::record(&mut guard, outcome);
    }

    /// Routes the connection and opens its upstream; `None` when that failed (the guard has
    /// recorded why).
    async fn establish(&self, client: TcpStream, original_dst: SocketAddr) -> Option<Established> {
        let client_addr = client.peer_addr().ok()?;
        let snap = self.ctx.state.snapshot();
        let source = match snap.workload_by_uid(&self.source.uid) {
            Some(w) => w.clone(),
            None => self.stand_in(client_addr),
        };
        let route = decide(
            &snap,
            original_dst,
            &self.ctx.own_ports(),
            self.ctx.settings.ports.hbone,
        );
        drop(snap);
        let src_identity = source.identity();
        let (mtls, dst_identity) = match &route {
            Ok(Route {
                transport: Transport::Hbone { identities, .. },
                ..
            }) => (true, identities.first()),
            _ => (false, None),
        };
        let (dst_wl, dst_svc) = match &route {
            Ok(r) => (r.destination.as_deref(), r.service.as_deref()),
            Err(_) => (None, None),
        };
        let labels = ConnLabels::new(
            Reporter::source,
            &Peers {
                source: Some(&source),
                source_identity: Some(&src_identity),
                destination: dst_wl,
                destination_identity: dst_identity,
                destination_service: dst_svc,
            },
            mtls,
        );
        let mut entry = AccessLogEntry::new(Direction::Outbound, client_addr, original_dst);
        entry.protocol = if mtls { "HBONE" } else { "TCP" };
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);

        let route = match route {
            Ok(r) => r,
            Err(e) => {
                guard.fail(ResponseFlags::Connect, e);
                return None;
            }
        };
        guard.entry_mut().upstream = Some(match &route.transport {
            Transport::Hbone { tunnel, .. } => *tunnel,
            Transport::Plain => route.target,
        });
        let upstream = match route.transport {
            Transport::Hbone { tunnel, identities } => {
                let request = ConnectRequest {
                    authority: route.target,
                    client: client_addr,
                    baggage: wire::baggage(
                        &source.cluster_id,
                        &source.namespace,
                        source.workload_name_or_name(),
                        source.app(),
                        &source.canonical_revision,
                    ),
                };
                match self
                    .open_tunnel(&source, src_identity, tunnel, identities, &request)
                    .await
                {
                    Ok((lease, stream)) => Upstream::Tunnel(lease, stream),
                    Err(e) => {
                        guard.fail(ResponseFlags::Connect, e);
                        return None;
                    }
                }
            }
            Transport::Plain => {
                match socket::connect(
                    &*self.factory,
                    route.target,
                    source_ip(&source, route.target),
                )
                .await
                {
                    Ok(s) => Upstream::Direct(s),
                    Err(e) => {
                        guard.fail(
                            ResponseFlags::Connect,
                            format!("connecting to {}: {e}", route.target),
                        );
                        return None;
                    }
                }
            }
        };
        Some(Established {
            client,
            upstream,
            guard,
        })
    }

    /// A CONNECT stream to `tunnel`, on a pooled connection. A pooled connection that fails at
    /// the HTTP/2 level (peer restarted, GOAWAY) is discarded and the request tried once more.
    async fn open_tunnel(
        &self,
        source: &Workload,
        src_identity: Identity,
        tunnel: SocketAddr,
        identities: Vec<Identity>,
        request: &ConnectRequest,
    ) -> Result<(Lease, H2Stream), PoolError> {
        let src_ip = source_ip(source, tunnel);
        let key = PoolKey {
            source: src_identity.clone(),
            source_ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            destination: identities.clone(),
            target: tunnel,
        };
        let connect = || {
            let factory = self.factory.clone();
            let tls = self.ctx.tls.clone();
            let tuning = self.ctx.settings.h2.clone();
            let (src_identity, identities) = (src_identity.clone(), identities.clone());
            async move {
                // The handshake reads the certificate from the cache; wait for it here.
                tls.cert_manager()
                    .fetch_within(&src_identity, CERTIFICATE_WAIT)
                    .await?;
                let config = tls.client_config(src_identity, identities)?;
                let tcp = socket::connect(&*factory, tunnel, src_ip)
                    .await
                    .map_err(|source| HboneError::Connect {
                        target: tunnel,
                        source,
                    })?;
                client::handshake(tcp, config, &tuning).await
            }
        };
        let mut last = None;
        for _ in 0..2 {
            let lease = self.ctx.pool.checkout(&key, &connect).await?;
            match open_stream(&lease.connection().sender, request).await {
                Ok(stream) => return Ok((lease, stream)),
                Err(HboneError::H2(e)) => {
                    debug!(%tunnel, error = %e, "pooled tunnel connection failed; retrying on a new one");
                    self.ctx.pool.discard(&lease);
                    last = Some(HboneError::H2(e));
                }
                Err(e) => return Err(PoolError(Arc::new(e))),
            }
        }
        Err(PoolError(Arc::new(last.unwrap_or(HboneError::Timeout(
            std::time::Duration::ZERO,
            "opening a stream",
        )))))
    }
}
