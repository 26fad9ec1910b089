//! Outbound: a workload's connection, captured, is carried to its destination: in an HBONE
//! tunnel when the destination is in the mesh, as plain TCP otherwise.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use super::limits::ConnectBudget;
use super::relay::{self, TcpSide};
use super::route::{decide, Decision, Route, RouteError, Transport, Unresolved};
use super::socket::{self, SocketFactory};
use super::ProxyContext;
use crate::hbone::client::{self, open_stream, OpenedStream, TunnelConnection};
use crate::hbone::pool::{Lease, Pool, PoolError, PoolKey, TunnelTarget};
use crate::hbone::stream_io::StreamIo;
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
    /// The pod's budget of connects in progress (shared with its inbound side).
    pub budget: ConnectBudget,
}

/// The source's own address (of `ips`) of the destination's family: tunnels leave from it,
/// and the far side treats it as the client address.
fn source_ip(ips: &[IpAddr], dest: SocketAddr) -> Option<IpAddr> {
    ips.iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dest.is_ipv4())
}

/// The address pooled connections leave from toward `dest` (see [`PoolKey`]); unspecified
/// when the source has none of that family.
fn pool_source_ip(ips: &[IpAddr], dest: SocketAddr) -> IpAddr {
    source_ip(ips, dest).unwrap_or(IpAddr::from([0, 0, 0, 0]))
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
        let decision = decide(&snap, &source, original_dst, &self.ctx.settings.ports);
        drop(snap);
        let route = match decision {
            Ok(Decision::Ready(route)) => Ok(route),
            Ok(Decision::Resolve(pending)) => self.resolve(&source, pending).await,
            Err(e) => Err(e),
        };
        let src_identity = source.identity();
        let (mtls, dst_identity) = match &route {
            Ok(Route {
                transport: Transport::Hbone { identities, .. },
                ..
            }) => (true, identities.first()),
            // The gateway picks the endpoint: its identity is known only when there is one.
            Ok(Route {
                transport: Transport::ViaGateway { identities, .. },
                ..
            }) => (true, identities.first().filter(|_| identities.len() == 1)),
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
        // Through a gateway the destination is named by the inner answer (the gateway picks the
        // endpoint): the connection is counted opened once that answer is in.
        let via_gateway = matches!(
            &route,
            Ok(Route {
                transport: Transport::ViaGateway { .. },
                ..
            })
        );
        let mut guard = if via_gateway {
            ConnectionGuard::pending(self.ctx.metrics.clone(), labels, entry)
        } else {
            ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry)
        };

        let route = match route {
            Ok(r) => r,
            Err(e) => {
                guard.fail(ResponseFlags::Connect, e);
                return None;
            }
        };
        guard.entry_mut().upstream = Some(match &route.transport {
            Transport::Hbone { tunnel, .. } => *tunnel,
            Transport::ViaGateway { gateway, .. } => *gateway,
            Transport::Plain => route.target,
        });
        let _permit = match self.budget.start() {
            Ok(p) => p,
            Err(limit) => {
                guard.fail(ResponseFlags::Connect, format!("limit {limit} reached"));
                return None;
            }
        };
        let request = ConnectRequest {
            authority: route.target.into(),
            client: client_addr,
            baggage: source.baggage().header(),
            service_host: route.service.as_ref().map(|s| s.hostname.clone()),
            origin_network: None,
        };
        let upstream = match route.transport {
            Transport::Hbone { tunnel, identities } => {
                let key = PoolKey {
                    source: src_identity.clone(),
                    source_ip: pool_source_ip(&source.workload_ips, tunnel),
                    destination: identities.clone(),
                    target: TunnelTarget::Direct(tunnel),
                };
                let dial = self.dialer(&source, src_identity);
                let connect = || dial.clone().direct(tunnel, identities.clone());
                match stream_on(&self.ctx.pool, &key, connect, &request).await {
                    Ok((lease, opened)) => Upstream::Tunnel(lease, opened.stream),
                    Err(e) => {
                        guard.fail(ResponseFlags::Connect, e);
                        return None;
                    }
                }
            }
            Transport::ViaGateway {
                gateway,
                gateway_identities,
                identities,
                authority,
            } => {
                let outer = ConnectRequest {
                    authority,
                    ..request
                };
                // The inner request tells the destination which network it came from, so it
                // knows its transport peer is the gateway, not the client.
                let inner = ConnectRequest {
                    origin_network: Some(
                        self.ctx.settings.local_network(&source.network).to_owned(),
                    ),
                    ..outer.clone()
                };
                let hop = GatewayHop {
                    gateway,
                    identities: gateway_identities,
                    request: outer,
                };
                match self
                    .through_gateway(&source, src_identity, hop, identities, &inner)
                    .await
                {
                    Ok((lease, opened)) => {
                        if let Some(dst) = opened
                            .baggage
                            .as_ref()
                            .and_then(|b| b.to_str().ok())
                            .map(|b| Workload::described_by(&wire::Baggage::parse(b), ""))
                        {
                            let labels = guard.labels().with_destination(&dst);
                            guard.relabel(labels);
                        }
                        guard.confirm();
                        Upstream::Tunnel(lease, opened.stream)
                    }
                    Err(e) => {
                        guard.fail(ResponseFlags::Connect, e);
                        return None;
                    }
                }
            }
            Transport::Plain => {
                let src_ip = source_ip(&source.workload_ips, route.target);
                match connect_within(&*self.factory, route.target, src_ip, self.budget.timeout)
                    .await
                {
                    Ok(s) => Upstream::Direct(s),
                    Err(e) => {
                        if matches!(e, HboneError::ConnectTimeout { .. }) {
                            self.budget.timed_out();
                        }
                        guard.fail(ResponseFlags::Connect, e);
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

    /// The route to an endpoint known only by its hostname, once weft's own resolvers have
    /// answered (within the connect timeout). A lookup is part of connecting: it takes room in
    /// the pod's connect budget while it runs, so a flood of them is bounded like connects.
    async fn resolve(&self, source: &Workload, pending: Unresolved) -> Result<Route, RouteError> {
        let _permit = self
            .budget
            .start()
            .map_err(|limit| pending.failed(format!("limit {limit} reached")))?;
        self.ctx
            .metrics
            .dns
            .on_demand_lookup(source, &pending.hostname);
        let lookup = self.ctx.hosts.lookup(&pending.hostname, pending.prefer_v4);
        match tokio::time::timeout(self.budget.timeout, lookup).await {
            Ok(Ok(ip)) => pending.at(ip, &self.ctx.settings.ports),
            Ok(Err(why)) => Err(pending.failed(why)),
            Err(_) => Err(pending.failed(format!("no answer within {:?}", self.budget.timeout))),
        }
    }

    /// What opening tunnel connections for `source` needs.
    fn dialer(&self, source: &Workload, identity: Identity) -> Dialer {
        Dialer {
            ctx: self.ctx.clone(),
            factory: self.factory.clone(),
            source: identity,
            source_ips: source.workload_ips.clone(),
        }
    }

    /// A stream of double HBONE: on a pooled inner connection to the destination for this
    /// source, gateway and authority; a new inner connection is made inside a CONNECT stream
    /// on a pooled outer connection to the gateway.
    async fn through_gateway(
        &self,
        source: &Workload,
        src_identity: Identity,
        hop: GatewayHop,
        identities: Vec<Identity>,
        inner: &ConnectRequest,
    ) -> Result<(Lease, OpenedStream), PoolError> {
        let key = PoolKey {
            source: src_identity.clone(),
            source_ip: pool_source_ip(&source.workload_ips, hop.gateway),
            destination: identities.clone(),
            target: TunnelTarget::ViaGateway {
                gateway: hop.gateway,
                gateway_identities: hop.identities.clone(),
                authority: hop.request.authority.clone(),
            },
        };
        let dial = self.dialer(source, src_identity);
        let connect = || dial.clone().inner(hop.clone(), identities.clone());
        if !self.ctx.settings.pool_cross_network {
            // Unpooled (ztunnel's way): a fresh inner connection per client connection, so the
            // gateway balances each one; it lives as long as its one stream.
            let conn = connect().await.map_err(|e| PoolError(Arc::new(e)))?;
            let opened = open_stream(&conn, inner)
                .await
                .map_err(|e| PoolError(Arc::new(e)))?;
            return Ok((Lease::unpooled(conn), opened));
        }
        stream_on(&self.ctx.pool, &key, connect, inner).await
    }
}

/// The outer leg of double HBONE: the gateway, what it must present, and the CONNECT it gets.
#[derive(Clone)]
struct GatewayHop {
    gateway: SocketAddr,
    identities: Vec<Identity>,
    request: ConnectRequest,
}

/// What opening a tunnel connection for one source needs, owned, so that the pool's connect
/// future (which outlives any one caller) can carry it.
#[derive(Clone)]
struct Dialer {
    ctx: Arc<ProxyContext>,
    factory: Arc<dyn SocketFactory>,
    source: Identity,
    source_ips: Vec<IpAddr>,
}

impl Dialer {
    /// A connection to a peer's HBONE port: TCP, then TLS + HTTP/2.
    async fn direct(
        self,
        tunnel: SocketAddr,
        identities: Vec<Identity>,
    ) -> Result<TunnelConnection, HboneError> {
        let tls = &self.ctx.tls;
        // The handshake reads the certificate from the cache; wait for it here.
        tls.cert_manager()
            .fetch_within(&self.source, CERTIFICATE_WAIT)
            .await?;
        let config = tls.client_config(self.source.clone(), identities)?;
        let limits = &self.ctx.settings.limits;
        let src_ip = source_ip(&self.source_ips, tunnel);
        let tcp = connect_within(&*self.factory, tunnel, src_ip, limits.connect_timeout).await?;
        let conn = client::handshake(
            tcp,
            config,
            &self.ctx.settings.h2,
            limits,
            &self.ctx.send_buffers,
        )
        .await?;
        self.ctx.metrics.handshake_completed("outbound");
        Ok(conn)
    }

    /// The inner connection of double HBONE: a CONNECT stream to the gateway (on a pooled
    /// outer connection), then TLS + HTTP/2 with the destination inside that stream, which the
    /// inner connection holds for as long as it lives.
    async fn inner(
        self,
        hop: GatewayHop,
        identities: Vec<Identity>,
    ) -> Result<TunnelConnection, HboneError> {
        let outer_key = PoolKey {
            source: self.source.clone(),
            source_ip: pool_source_ip(&self.source_ips, hop.gateway),
            destination: hop.identities.clone(),
            target: TunnelTarget::Direct(hop.gateway),
        };
        let outer_connect = || self.clone().direct(hop.gateway, hop.identities.clone());
        let (lease, outer) = stream_on(&self.ctx.pool, &outer_key, outer_connect, &hop.request)
            .await
            .map_err(|e| HboneError::Gateway(e.0))?;
        let config = self
            .ctx
            .tls
            .client_config(self.source.clone(), identities)?;
        let io = StreamIo::new(outer.stream, Some(lease));
        let limits = &self.ctx.settings.limits;
        let conn = client::handshake_over(
            io,
            hop.gateway,
            config,
            &self.ctx.settings.h2,
            limits,
            &self.ctx.send_buffers,
        )
        .await?;
        self.ctx.metrics.handshake_completed("outbound");
        Ok(conn)
    }
}

/// A CONNECT stream for `request` on a pooled connection for `key`, made with `connect` when
/// none has room. A pooled connection that fails at the HTTP/2 level (peer restarted, GOAWAY)
/// is discarded and the request tried once more.
async fn stream_on<F, Fut>(
    pool: &Arc<Pool>,
    key: &PoolKey,
    connect: F,
    request: &ConnectRequest,
) -> Result<(Lease, OpenedStream), PoolError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<TunnelConnection, HboneError>> + Send + 'static,
{
    let lease = pool.checkout(key, &connect).await?;
    match open_stream(lease.connection(), request).await {
        Ok(opened) => return Ok((lease, opened)),
        Err(HboneError::H2(e)) => {
            debug!(target = ?key.target, error = %e, "pooled tunnel connection failed; retrying on a new one");
            pool.discard(&lease);
        }
        Err(e) => return Err(PoolError(Arc::new(e))),
    }
    let lease = pool.checkout(key, &connect).await?;
    let opened = open_stream(lease.connection(), request)
        .await
        .map_err(|e| PoolError(Arc::new(e)))?;
    Ok((lease, opened))
}

/// A TCP connect that gives up after `after`.
async fn connect_within(
    factory: &dyn SocketFactory,
    target: SocketAddr,
    src_ip: Option<IpAddr>,
    after: std::time::Duration,
) -> Result<TcpStream, HboneError> {
    match tokio::time::timeout(after, socket::connect(factory, target, src_ip)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(HboneError::Connect { target, source }),
        Err(_) => Err(HboneError::ConnectTimeout { target, after }),
    }
}
