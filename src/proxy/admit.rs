//! Admission of inbound connections, HBONE and plaintext alike: the own-port guard, the
//! destination lookup, authorization, the pod's connect budget and the connect to the app, in
//! that order. Every refusal is a [`Refusal`], which carries the HTTP status an HBONE peer is
//! answered with and the response flags of the metrics and the access log.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::warn;

use super::authorize::{self, Denial};
use super::limits::{ConnectBudget, Limit};
use super::socket::{self, SocketFactory};
use super::tracker::{AdmittedConnection, TrackedConnection};
use super::ProxyContext;
use crate::hbone::wire;
use crate::identity::Identity;
use crate::metrics::access_log::{AccessLogEntry, Direction};
use crate::metrics::connection::ConnectionGuard;
use crate::metrics::labels::{ConnLabels, Peers, Reporter, ResponseFlags};

/// Why an inbound connection was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is one of weft's own ports")]
    OwnPort(SocketAddr),
    #[error("no workload has address {0}")]
    UnknownDestination(IpAddr),
    #[error("{authority} names no service that workload {workload} serves on that port")]
    NoSuchService { authority: String, workload: String },
    #[error(transparent)]
    Denied(Denial),
    #[error("limit {0} reached")]
    Limit(Limit),
    #[error("connecting to {dest}: no answer within {after:?}")]
    ConnectTimeout { dest: SocketAddr, after: Duration },
    #[error("connecting to {dest}: {source}")]
    Connect { dest: SocketAddr, source: io::Error },
}

impl Refusal {
    /// The answer to an HBONE peer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::OwnPort(_) | Refusal::NoSuchService { .. } => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::UnknownDestination(_)
            | Refusal::Limit(_)
            | Refusal::ConnectTimeout { .. }
            | Refusal::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn flags(&self) -> ResponseFlags {
        match self {
            Refusal::Denied(_) => ResponseFlags::Deny,
            _ => ResponseFlags::Connect,
        }
    }
}

/// Who is asking to reach what.
pub struct Caller<'a> {
    /// The transport peer: the address policy sees, and the one logged.
    pub peer: SocketAddr,
    /// What an HBONE peer says the original client was (`forwarded`): logged, never trusted.
    pub claimed: Option<SocketAddr>,
    /// Proven by mTLS; none for plaintext.
    pub identity: Option<&'a Identity>,
    /// Where the connection is headed: an app's address and port, or (double HBONE) a
    /// service hostname and port, which the pod that has `arrived_on` serves.
    pub dest: wire::Authority,
    pub arrived_on: IpAddr,
    /// The network the client says it is on (double HBONE's inner request). When it is not
    /// the destination's, the transport peer is that network's gateway, not the client: the
    /// source workload is not looked up by the peer's address.
    pub origin_network: Option<&'a str>,
    /// The source's metadata as the client sent it (`baggage`): names the source in metrics
    /// when it came through a gateway.
    pub baggage: Option<&'a str>,
}

impl Caller<'_> {
    /// A plaintext or HBONE caller asking for an address.
    pub fn to_addr(peer: SocketAddr, dest: SocketAddr) -> Self {
        Caller {
            peer,
            claimed: None,
            identity: None,
            dest: wire::Authority::Addr(dest),
            arrived_on: dest.ip(),
            origin_network: None,
            baggage: None,
        }
    }
}

/// The app address a request for `authority` goes to in `dst`: the address as asked, or for a
/// service hostname the pod's port for that service port (its endpoint's mapping, else the
/// service's). A hostname of a service the pod is no endpoint of is refused.
fn app_address(
    snap: &crate::state::Snapshot,
    dst: Option<&crate::state::Workload>,
    authority: &wire::Authority,
    arrived_on: IpAddr,
) -> Result<SocketAddr, Refusal> {
    let (host, port) = match authority {
        wire::Authority::Addr(a) => return Ok(*a),
        wire::Authority::Service { host, port } => (host, *port),
    };
    let dst = dst.ok_or(Refusal::UnknownDestination(arrived_on))?;
    let refused = || Refusal::NoSuchService {
        authority: authority.to_string(),
        workload: dst.uid.clone(),
    };
    let mut services: Vec<_> = snap.services_by_hostname(host).collect();
    // The pod's own namespace first, as a name resolves there first.
    services.sort_by_key(|s| s.namespace != dst.namespace);
    services
        .into_iter()
        .filter(|s| s.ports.contains_key(&port))
        .find_map(|s| {
            snap.healthy_endpoints(&s.key())
                .find(|e| e.workload.uid == dst.uid)
                .map(|e| SocketAddr::new(arrived_on, e.target_port(s, port)))
        })
        .ok_or_else(refused)
}

/// An admitted connection: the app is connected and the connection is tracked for policy.
pub struct Admitted {
    pub upstream: TcpStream,
    pub tracked: TrackedConnection,
    /// The pod the connection was admitted to.
    pub destination: Arc<crate::state::Workload>,
}

/// Whether a request came through a network's gateway: it names an origin network, and that is
/// not the local one (compared as ztunnel does, ignoring ASCII case). With no local network
/// known (an unknown destination), any named origin counts as another network.
fn through_gateway(origin: Option<&str>, local: Option<&str>) -> bool {
    origin.is_some_and(|o| local.is_none_or(|l| !o.eq_ignore_ascii_case(l)))
}

/// The inbound door of one pod (its HBONE and plaintext listeners share it).
pub struct InboundDoor {
    pub ctx: Arc<ProxyContext>,
    pub factory: Arc<dyn SocketFactory>,
    pub budget: ConnectBudget,
}

impl InboundDoor {
    /// Admits `caller` or says why not; the guard has the connection's labels and its access
    /// log entry either way (on refusal, with the reason recorded).
    pub async fn admit(&self, caller: Caller<'_>) -> (ConnectionGuard, Result<Admitted, Refusal>) {
        let client_ip = wire::canonical(caller.peer.ip());
        let snap = self.ctx.state.snapshot();
        let dst = snap.workload_by_ip(caller.arrived_on).cloned();
        let settings = &self.ctx.settings;
        let local_network = dst
            .as_ref()
            .map(|d| settings.local_network(&d.network))
            .or(settings.network.as_deref());
        let via_gateway = through_gateway(caller.origin_network, local_network);
        // A client that is not behind a gateway is on the destination's network; one behind a
        // gateway is known only by what its baggage says (as ztunnel does).
        let src = match (&dst, via_gateway) {
            (_, true) => caller
                .baggage
                .zip(caller.origin_network)
                .map(|(b, network)| {
                    Arc::new(crate::state::Workload::described_by(
                        &wire::Baggage::parse(b),
                        network,
                    ))
                }),
            (Some(d), false) => snap.workload_on(&d.network, client_ip).cloned(),
            (None, false) => snap.workload_by_ip(client_ip).cloned(),
        };
        let app = app_address(&snap, dst.as_deref(), &caller.dest, caller.arrived_on);
        let dest = *app
            .as_ref()
            .unwrap_or(&SocketAddr::new(caller.arrived_on, caller.dest.port()));
        let dst_identity = dst.as_ref().map(|d| d.identity());
        let dst_svc = dst
            .as_ref()
            .and_then(|d| snap.services_of(&d.uid).next().cloned());
        let labels = ConnLabels::new(
            Reporter::destination,
            &Peers {
                source: src.as_deref(),
                source_identity: caller.identity,
                destination: dst.as_deref(),
                destination_identity: dst_identity.as_ref(),
                destination_service: dst_svc.as_deref(),
            },
            caller.identity.is_some(),
        );
        let mut entry = AccessLogEntry::new(Direction::Inbound, caller.peer, dest);
        entry.claimed_src = caller.claimed.filter(|c| *c != caller.peer);
        if caller.identity.is_some() {
            entry.protocol = "HBONE";
        }
        entry.upstream = Some(dest);
        let mut guard = ConnectionGuard::open(self.ctx.metrics.clone(), labels, entry);

        let decided = (|| {
            let dest = app?;
            if self.ctx.settings.ports.is_own(dest.port()) {
                return Err(Refusal::OwnPort(dest));
            }
            let dst = dst.ok_or(Refusal::UnknownDestination(dest.ip()))?;
            let admitted = AdmittedConnection {
                destination_uid: dst.uid.clone(),
                source_ip: client_ip,
                source_identity: caller.identity.cloned(),
                destination_ip: dest.ip(),
                destination_port: dest.port(),
            };
            authorize::check(&snap, &dst, &admitted).map_err(Refusal::Denied)?;
            Ok((admitted, dst))
        })();
        let decided_on = snap.generation;
        drop(snap);
        let result = match decided {
            Ok((admitted, destination)) => match self.connect(dest, client_ip).await {
                Ok(upstream) => self.track(admitted, decided_on).map(|tracked| Admitted {
                    upstream,
                    tracked,
                    destination,
                }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            guard.fail(e.flags(), e);
        }
        (guard, result)
    }

    /// Tracks a connection decided on the state of `generation`. The state may have changed
    /// while the app was being connected, before the tracker could see the connection: then it
    /// is decided again on the state now, so no change escapes it.
    fn track(
        &self,
        admitted: AdmittedConnection,
        generation: u64,
    ) -> Result<TrackedConnection, Refusal> {
        let tracked = self.ctx.tracker.track(admitted, generation);
        let now = self.ctx.state.snapshot();
        if now.generation == generation {
            return Ok(tracked);
        }
        let facts = tracked.facts();
        let dst = now
            .workload_by_uid(&facts.destination_uid)
            .ok_or(Refusal::UnknownDestination(facts.destination_ip))?;
        authorize::check(&now, dst, facts).map_err(Refusal::Denied)?;
        Ok(tracked)
    }

    /// Connects to the app within the pod's connect budget and the connect timeout, from the
    /// client's own address when preserving source addresses. A client address that cannot
    /// be bound here (no privilege) falls back to weft's own, which is logged.
    async fn connect(&self, dest: SocketAddr, client_ip: IpAddr) -> Result<TcpStream, Refusal> {
        let _permit = self.budget.start().map_err(Refusal::Limit)?;
        let after = self.budget.timeout;
        let attempt = |src: Option<IpAddr>| async move {
            match tokio::time::timeout(after, socket::connect(&*self.factory, dest, src)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(source)) => Err(Refusal::Connect { dest, source }),
                Err(_) => {
                    self.budget.timed_out();
                    Err(Refusal::ConnectTimeout { dest, after })
                }
            }
        };
        if !self.ctx.settings.preserve_source_ip
            || client_ip.is_ipv4() != dest.is_ipv4()
            || !self.factory.returns_replies_to(client_ip)
        {
            return attempt(None).await;
        }
        match attempt(Some(client_ip)).await {
            Err(Refusal::Connect { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                warn!(%client_ip, %dest, error = %source, "cannot connect from the client's address; using weft's own");
                attempt(None).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::through_gateway;
    use crate::config::Settings;

    #[test]
    fn only_a_named_other_network_means_a_gateway() {
        assert!(
            !through_gateway(None, Some("west")),
            "no header: same network"
        );
        assert!(!through_gateway(Some("west"), Some("west")));
        assert!(
            !through_gateway(Some("WEST"), Some("west")),
            "case is ignored"
        );
        assert!(through_gateway(Some("east"), Some("west")));
        assert!(through_gateway(Some("east"), None), "unknown destination");
        assert!(!through_gateway(None, None));
    }

    #[test]
    fn the_nodes_network_wins_over_the_pods() {
        let mut s = Settings::default();
        assert_eq!(s.local_network("west"), "west");
        s.network = Some("east".into());
        assert_eq!(s.local_network("west"), "east");
    }
}
