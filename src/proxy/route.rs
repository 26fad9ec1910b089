//! The routing decision, made in one place and returned as a plain value that the transport
//! then carries out.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::config::Ports;
use crate::hbone::wire::Authority;
use crate::identity::Identity;
use crate::state::{
    GatewayAddress, GatewayDestination, Protocol, Service, ServiceKey, Snapshot, Workload,
};

/// How the bytes travel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// In an HBONE tunnel to `tunnel` (the destination pod's HBONE port), accepting any of
    /// `identities` as the server.
    Hbone {
        tunnel: SocketAddr,
        identities: Vec<Identity>,
    },
    /// Double HBONE, to a service endpoint on another network: an outer tunnel to that
    /// network's gateway (which must present one of `gateway_identities`) with `authority`
    /// (the service hostname and port) as its CONNECT authority; inside it, a second TLS +
    /// HTTP/2 CONNECT with the same authority to whichever endpoint the gateway picks, which
    /// must present one of `identities`.
    ViaGateway {
        gateway: SocketAddr,
        gateway_identities: Vec<Identity>,
        identities: Vec<Identity>,
        authority: Authority,
    },
    /// Plain TCP: the destination is not in the mesh (or unknown).
    Plain,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub transport: Transport,
    /// The final `ip:port`: the CONNECT authority for HBONE, the address dialled for plain TCP.
    pub target: SocketAddr,
    pub destination: Option<Arc<Workload>>,
    pub service: Option<Arc<Service>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("{0} is one of weft's own ports; refusing to loop")]
    OwnPort(SocketAddr),
    #[error("waypoint {0} has no healthy instance")]
    NoWaypoint(String),
    #[error("network gateway {0} is unknown or has no healthy instance")]
    NoGateway(String),
    #[error("endpoint {hostname} of service {service} did not resolve: {reason}")]
    Unresolved {
        hostname: String,
        service: String,
        reason: String,
    },
}

/// What routing decided: a route, or a route that still needs its endpoint's address.
#[derive(Debug)]
pub enum Decision {
    Ready(Route),
    /// The chosen endpoint is known by name only (a ServiceEntry with `resolution: DNS`):
    /// look `hostname` up, then [`Unresolved::at`] gives the route.
    Resolve(Unresolved),
}

#[derive(Debug)]
pub struct Unresolved {
    pub hostname: String,
    /// Whether the client dialled IPv4: an answer of that family is preferred.
    pub prefer_v4: bool,
    endpoint: Arc<Workload>,
    service: Arc<Service>,
    port: u16,
}

impl Unresolved {
    /// The route once the endpoint's name resolved to `ip`.
    pub fn at(self, ip: IpAddr, ports: &Ports) -> Result<Route, RouteError> {
        service_route(
            &self.service,
            &self.endpoint,
            SocketAddr::new(ip, self.port),
            ports,
        )
    }

    pub fn failed(&self, reason: impl std::fmt::Display) -> RouteError {
        RouteError::Unresolved {
            hostname: self.hostname.clone(),
            service: self.service.key().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Decides how a connection from `source` to `original_dst` is carried.
///
/// - a service VIP of a service with a waypoint: in HBONE to the waypoint, the VIP as the
///   authority;
/// - a service VIP: pick a healthy endpoint at random, then as for that workload (an endpoint
///   known only by a hostname is resolved by the caller); a passthrough service's VIP goes to
///   the address dialled, as if no service had it;
/// - an endpoint on another network than the client's: double HBONE through that network's
///   gateway (endpoints of other networks without a gateway are not candidates);
/// - a workload with a waypoint, addressed directly: in HBONE to the waypoint;
/// - a workload speaking HBONE: tunnel to its HBONE port (`ports.hbone`);
/// - a workload speaking TCP, or an address weft does not know: plain TCP passthrough.
///
/// Traffic from a waypoint itself never goes back to it.
pub fn decide(
    snap: &Snapshot,
    source: &Workload,
    original_dst: SocketAddr,
    ports: &Ports,
) -> Result<Decision, RouteError> {
    // A service the client may not see is, to it, no service: its VIP is just an address.
    let service = snap
        .service_by_vip(original_dst.ip())
        .filter(|s| s.visible_to(&source.namespace));
    if let Some(service) = service {
        if let Some(waypoint) = &service.waypoint {
            let route = via_waypoint(snap, waypoint, Some(service), source, original_dst, ports)?;
            if let Some(route) = route {
                return Ok(Decision::Ready(Route {
                    service: Some(service.clone()),
                    ..route
                }));
            }
        }
        if service.passthrough {
            let mut route = to_address(snap, source, original_dst, ports)?;
            route.service = Some(service.clone());
            return Ok(Decision::Ready(route));
        }
        let key = service.key();
        let endpoints: Vec<_> = snap
            .healthy_endpoints(&key)
            .filter(|e| reachable_from(&e.workload, source))
            .collect();
        if endpoints.is_empty() {
            return Err(RouteError::NoHealthyEndpoint(key.to_string()));
        }
        let ep = endpoints[rand::rng().random_range(0..endpoints.len())];
        // Another network's endpoint is a candidate only with a gateway (`reachable_from`).
        let remote_gateway = (ep.workload.network != source.network)
            .then_some(ep.workload.network_gateway.as_ref())
            .flatten();
        if let Some(gateway) = remote_gateway {
            let identities = identities_on(snap, service, &ep.workload.network);
            return through_gateway(snap, gateway, identities, service, original_dst)
                .map(Decision::Ready);
        }
        let port = ep.target_port(service, original_dst.port());
        let Some(ip) = address_for(&ep.workload, original_dst) else {
            if ep.workload.hostname.is_empty() {
                return Err(RouteError::NoHealthyEndpoint(key.to_string()));
            }
            return Ok(Decision::Resolve(Unresolved {
                hostname: ep.workload.hostname.clone(),
                prefer_v4: original_dst.is_ipv4(),
                endpoint: ep.workload.clone(),
                service: service.clone(),
                port,
            }));
        };
        let target = SocketAddr::new(ip, port);
        return service_route(service, &ep.workload, target, ports).map(Decision::Ready);
    }
    to_address(snap, source, original_dst, ports).map(Decision::Ready)
}

/// A workload's address of the family the client used, else its first.
fn address_for(w: &Workload, dst: SocketAddr) -> Option<IpAddr> {
    let ips = &w.workload_ips;
    ips.iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or(ips.first())
        .copied()
}

/// Whether `source` can reach endpoint `w`: on its own network, directly, by an address or
/// a hostname; on another, only through that network's gateway.
fn reachable_from(w: &Workload, source: &Workload) -> bool {
    if w.network == source.network {
        !w.workload_ips.is_empty() || !w.hostname.is_empty()
    } else {
        w.network_gateway.is_some()
    }
}

/// One healthy instance of a waypoint or network gateway, as its [`GatewayAddress`] names
/// it: a service (by hostname: one of its healthy endpoints; by VIP: likewise) or a workload
/// with that address. Its HBONE port, and the identities it may present: its workload's and
/// its service's SANs.
struct Hop {
    addr: SocketAddr,
    identities: Vec<Identity>,
    instance: Arc<Workload>,
}

/// The instances a [`GatewayAddress`] names, with the service they belong to (if any).
struct HopInstances<'s> {
    service: Option<&'s Arc<Service>>,
    instances: Vec<&'s Arc<Workload>>,
}

impl<'s> HopInstances<'s> {
    /// `None` when `gateway` names a service by a hostname that is not known.
    fn of(snap: &'s Snapshot, gateway: &GatewayAddress) -> Option<Self> {
        let service = match &gateway.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => Some(snap.service(&ServiceKey {
                namespace: namespace.clone(),
                hostname: hostname.clone(),
            })?),
            GatewayDestination::Address { address, .. } => snap.service_by_vip(*address),
        };
        let instances = match (service, &gateway.destination) {
            (Some(s), _) => snap
                .healthy_endpoints(&s.key())
                .map(|e| &e.workload)
                .collect(),
            (None, GatewayDestination::Address { network, address }) => snap
                .workload_on(network, *address)
                .or_else(|| snap.workload_by_ip(*address))
                .into_iter()
                .collect(),
            (None, GatewayDestination::Hostname { .. }) => Vec::new(),
        };
        Some(HopInstances { service, instances })
    }

    /// Picks one instance and addresses it (the family of `dst` preferred) on the gateway's
    /// HBONE port.
    fn pick(&self, gateway: &GatewayAddress, dst: SocketAddr) -> Option<Hop> {
        if self.instances.is_empty() {
            return None;
        }
        let instance = self.instances[rand::rng().random_range(0..self.instances.len())];
        let ip = address_for(instance, dst)?;
        let mut identities = vec![instance.identity()];
        identities.extend(self.service.into_iter().flat_map(|s| sans(s)));
        Some(Hop {
            addr: SocketAddr::new(ip, gateway.hbone_mtls_port),
            identities,
            instance: instance.clone(),
        })
    }
}

fn sans(service: &Service) -> impl Iterator<Item = Identity> + '_ {
    service
        .subject_alt_names
        .iter()
        .filter_map(|s| s.parse::<Identity>().ok())
}

/// The route through `waypoint` to `original_dst` (the CONNECT authority stays the address
/// the client dialled); `None` when `source` is that waypoint. The waypoint is always reached
/// in HBONE, on its HBONE port, and must present its workload's identity or one of its
/// service's.
fn via_waypoint(
    snap: &Snapshot,
    waypoint: &GatewayAddress,
    addressed: Option<&Arc<Service>>,
    source: &Workload,
    original_dst: SocketAddr,
    ports: &Ports,
) -> Result<Option<Route>, RouteError> {
    let unknown = || RouteError::NoWaypoint(waypoint_name(waypoint));
    let mut hops = HopInstances::of(snap, waypoint).ok_or_else(unknown)?;
    if hops.instances.iter().any(|w| w.uid == source.uid) {
        return Ok(None);
    }
    if ports.is_own(original_dst.port()) {
        return Err(RouteError::OwnPort(original_dst));
    }
    hops.instances.retain(|w| reachable_from(w, source));
    let hop = hops.pick(waypoint, original_dst).ok_or_else(unknown)?;
    if hop.instance.network != source.network {
        // A waypoint on another network is reached as a service there is: through that
        // network's gateway, by the addressed service's name (only service-addressed traffic
        // crosses networks, as in ztunnel). Any of its instances there may take it.
        let (Some(addressed), Some(gateway)) = (addressed, &hop.instance.network_gateway) else {
            return Err(unknown());
        };
        let mut identities = Vec::new();
        if let Some(wp_service) = hops.service {
            identities = identities_on(snap, wp_service, &hop.instance.network);
        }
        if identities.is_empty() {
            identities = hop.identities;
        }
        let route = through_gateway(snap, gateway, identities, addressed, original_dst)?;
        return Ok(Some(route));
    }
    Ok(Some(Route {
        transport: Transport::Hbone {
            tunnel: hop.addr,
            identities: hop.identities,
        },
        target: original_dst,
        destination: Some(hop.instance),
        service: None,
    }))
}

/// The identities the healthy endpoints of `service` on `network` present, and the service's
/// SANs: what an inner tunnel accepts when a gateway picks among them.
fn identities_on(snap: &Snapshot, service: &Service, network: &str) -> Vec<Identity> {
    let mut identities: Vec<Identity> = Vec::new();
    let remote = snap
        .healthy_endpoints(&service.key())
        .filter(|e| e.workload.network == network)
        .map(|e| e.workload.identity());
    for id in remote.chain(sans(service)) {
        if !identities.contains(&id) {
            identities.push(id);
        }
    }
    identities
}

/// The route to `service` through `gateway` (of the network the chosen endpoint or waypoint
/// is on). The gateway picks the endpoint, so the inner tunnel accepts any of `identities`,
/// and the client's view of the destination is the service only.
fn through_gateway(
    snap: &Snapshot,
    gateway: &GatewayAddress,
    identities: Vec<Identity>,
    service: &Arc<Service>,
    original_dst: SocketAddr,
) -> Result<Route, RouteError> {
    let unknown = || RouteError::NoGateway(waypoint_name(gateway));
    let hop = HopInstances::of(snap, gateway)
        .and_then(|hops| hops.pick(gateway, original_dst))
        .ok_or_else(unknown)?;
    Ok(Route {
        transport: Transport::ViaGateway {
            gateway: hop.addr,
            gateway_identities: hop.identities,
            identities,
            authority: Authority::Service {
                host: service.hostname.clone(),
                port: original_dst.port(),
            },
        },
        target: original_dst,
        destination: None,
        service: Some(service.clone()),
    })
}

fn waypoint_name(w: &GatewayAddress) -> String {
    match &w.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address { network, address } => format!("{network}/{address}"),
    }
}

/// The route to an endpoint of `service`: as to the workload, also accepting the service's
/// own identities.
fn service_route(
    service: &Arc<Service>,
    endpoint: &Arc<Workload>,
    target: SocketAddr,
    ports: &Ports,
) -> Result<Route, RouteError> {
    let mut route = to_workload(endpoint, target, ports)?;
    if let Transport::Hbone { identities, .. } = &mut route.transport {
        identities.extend(sans(service));
    }
    route.service = Some(service.clone());
    Ok(route)
}

/// The route to an address as dialled: the workload that has it (through its waypoint when
/// it names one), else plain TCP. A workload of another network is not reachable by its
/// address (only through a service, by the gateway): to the client it is an unknown address.
fn to_address(
    snap: &Snapshot,
    source: &Workload,
    dst: SocketAddr,
    ports: &Ports,
) -> Result<Route, RouteError> {
    let local = snap.workload_on(&source.network, dst.ip());
    if let Some(w) = local {
        if let Some(waypoint) = &w.waypoint {
            if let Some(route) = via_waypoint(snap, waypoint, None, source, dst, ports)? {
                return Ok(route);
            }
        }
        let mut route = to_workload(w, dst, ports)?;
        route.service = snap.services_of(&w.uid).next().cloned();
        return Ok(route);
    }
    Ok(Route {
        transport: Transport::Plain,
        target: dst,
        destination: None,
        service: None,
    })
}

fn to_workload(w: &Arc<Workload>, target: SocketAddr, ports: &Ports) -> Result<Route, RouteError> {
    let transport = match w.protocol {
        Protocol::HBONE => {
            if ports.is_own(target.port()) {
                return Err(RouteError::OwnPort(target));
            }
            Transport::Hbone {
                tunnel: SocketAddr::new(target.ip(), ports.hbone),
                identities: vec![w.identity()],
            }
        }
        Protocol::TCP => Transport::Plain,
    };
    Ok(Route {
        transport,
        target,
        destination: Some(w.clone()),
        service: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::state::local::{parse, Defaults};
    use crate::state::{SourceData, StateStore};

    fn snapshot_data(yaml: &str) -> SourceData {
        let d = Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        };
        parse(yaml, std::path::Path::new("t.yaml"), &d)
            .unwrap()
            .data
    }

    fn snapshot(yaml: &str) -> Arc<Snapshot> {
        let store = StateStore::new("istio-system");
        store.replace_source("t", snapshot_data(yaml));
        store.snapshot()
    }

    const CONFIG: &str = r#"
workloads:
- name: server
  namespace: shop
  serviceAccount: server-sa
  workloadIps: ["10.250.2.2"]
  protocol: HBONE
  services:
    shop/server.shop.svc.cluster.local: {80: 8080}
- name: legacy
  namespace: shop
  workloadIps: ["10.250.2.3"]
  protocol: TCP
services:
- name: server
  namespace: shop
  hostname: server.shop.svc.cluster.local
  vips: ["/10.250.128.10"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/shop/sa/extra"]
"#;

    fn own() -> Ports {
        Ports::default()
    }

    fn in_namespace(ns: &str) -> Workload {
        Workload {
            uid: format!("client-in-{ns}"),
            namespace: ns.into(),
            ..Workload::default()
        }
    }

    fn client() -> Workload {
        in_namespace("shop")
    }

    fn ready(d: Result<Decision, RouteError>) -> Route {
        match d {
            Ok(Decision::Ready(r)) => r,
            other => panic!("expected a ready route, got {other:?}"),
        }
    }

    /// A service with one endpoint known by name only, and a passthrough service over an
    /// address that is b's.
    fn named_and_passthrough() -> Arc<Snapshot> {
        let service = |name: &str, vip: &str, passthrough| Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.example.com"),
            vips: vec![vip.parse().unwrap()],
            ports: BTreeMap::from([(80, 8080)]),
            subject_alt_names: vec![],
            waypoint: None,
            passthrough,
            visibility: Default::default(),
        };
        let named = Workload {
            uid: "db-endpoint".into(),
            name: "db".into(),
            namespace: "shop".into(),
            hostname: "db.example.com".into(),
            ..Workload::default()
        };
        let b = Workload {
            uid: "b".into(),
            name: "b".into(),
            namespace: "shop".into(),
            service_account: "b".into(),
            trust_domain: "cluster.local".into(),
            workload_ips: vec!["10.250.2.2".parse().unwrap()],
            protocol: Protocol::HBONE,
            ..Workload::default()
        };
        let db = service("db", "240.240.0.7", false);
        let store = StateStore::new("istio-system");
        store.replace_source(
            "t",
            SourceData {
                endpoints: vec![(db.key(), "db-endpoint".into(), BTreeMap::new())],
                workloads: vec![named, b],
                services: vec![db, service("legacy", "10.250.2.2", true)],
                policies: vec![],
            },
        );
        store.snapshot()
    }

    #[test]
    fn an_endpoint_known_by_name_is_resolved_then_routed() {
        let snap = named_and_passthrough();
        let d = decide(&snap, &client(), "240.240.0.7:80".parse().unwrap(), &own()).unwrap();
        let Decision::Resolve(u) = d else {
            panic!("expected a name to resolve, got {d:?}")
        };
        assert_eq!((u.hostname.as_str(), u.prefer_v4), ("db.example.com", true));
        let r = u.at("10.250.2.3".parse().unwrap(), &own()).unwrap();
        assert_eq!(r.transport, Transport::Plain);
        assert_eq!(
            r.target,
            "10.250.2.3:8080".parse().unwrap(),
            "target port kept"
        );
        assert_eq!(r.service.unwrap().name, "db");
        assert_eq!(r.destination.unwrap().uid, "db-endpoint");
    }

    #[test]
    fn a_passthrough_vip_goes_where_it_was_dialled() {
        let snap = named_and_passthrough();
        // The VIP is b's own address: the connection goes to b (HBONE), on the port dialled,
        // not to an endpoint (the service has none).
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.2.2:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.target, "10.250.2.2:80".parse().unwrap());
        assert!(matches!(r.transport, Transport::Hbone { .. }));
        assert_eq!(r.service.unwrap().name, "legacy");
    }

    #[test]
    fn hbone_workload_is_tunnelled() {
        let snap = snapshot(CONFIG);
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.2.2:8080".parse().unwrap(),
            &own(),
        ));
        assert_eq!(
            r.transport,
            Transport::Hbone {
                tunnel: "10.250.2.2:15008".parse().unwrap(),
                identities: vec!["spiffe://cluster.local/ns/shop/sa/server-sa"
                    .parse()
                    .unwrap()],
            }
        );
        assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        assert_eq!(r.service.unwrap().name, "server");
    }

    #[test]
    fn tcp_workload_and_unknown_pass_through() {
        let snap = snapshot(CONFIG);
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.2.3:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.transport, Transport::Plain);
        assert_eq!(r.destination.unwrap().name, "legacy");
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.9.9:443".parse().unwrap(),
            &own(),
        ));
        assert_eq!(
            (r.transport, r.target),
            (Transport::Plain, "10.250.9.9:443".parse().unwrap())
        );
    }

    #[test]
    fn vip_picks_endpoint_and_maps_port() {
        let snap = snapshot(CONFIG);
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.128.10:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        let Transport::Hbone { identities, .. } = r.transport else {
            panic!("expected HBONE")
        };
        assert_eq!(
            identities.len(),
            2,
            "workload identity plus the service SAN"
        );
    }

    #[test]
    fn a_namespace_scoped_service_routes_only_its_own_namespace() {
        let store = StateStore::new("istio-system");
        let mut data = snapshot_data(CONFIG);
        for s in &mut data.services {
            s.visibility = crate::state::Visibility::Namespace;
        }
        store.replace_source("t", data);
        let snap = store.snapshot();
        let vip: SocketAddr = "10.250.128.10:80".parse().unwrap();
        let r = ready(decide(&snap, &client(), vip, &own()));
        assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        // From elsewhere the VIP is only an address weft does not know.
        let r = ready(decide(&snap, &in_namespace("elsewhere"), vip, &own()));
        assert_eq!((r.transport, r.target), (Transport::Plain, vip));
        assert!(r.service.is_none());
    }

    /// An HBONE workload (uid = name) with service account `sa`, on `network`, at `ip` or
    /// known by no address.
    fn mesh_workload(name: &str, ns: &str, sa: &str, ip: Option<&str>, network: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            trust_domain: "cluster.local".into(),
            workload_ips: ip.into_iter().map(|ip| ip.parse().unwrap()).collect(),
            protocol: Protocol::HBONE,
            network: network.into(),
            ..Workload::default()
        }
    }

    /// Service `<name>.<ns>.svc.cluster.local` at `vip`, on the HBONE port (a waypoint's or a
    /// gateway's).
    fn hbone_service(name: &str, ns: &str, vip: &str) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            vips: vec![vip.parse().unwrap()],
            ports: BTreeMap::from([(15008, 15008)]),
            subject_alt_names: vec![],
            waypoint: None,
            passthrough: false,
            visibility: Default::default(),
        }
    }

    /// CONFIG, with a waypoint (a service of one instance, 10.250.1.9, in namespace `infra`)
    /// named by `server`'s service (by hostname) and by `legacy` (by address).
    fn with_waypoint() -> Arc<Snapshot> {
        let mut data = snapshot_data(CONFIG);
        let waypoint = mesh_workload("waypoint-1", "infra", "waypoint", Some("10.250.1.9"), "");
        let wp_service = hbone_service("waypoint", "infra", "10.250.128.99");
        data.endpoints
            .push((wp_service.key(), "waypoint-1".into(), BTreeMap::new()));
        for s in &mut data.services {
            s.waypoint = Some(GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "infra".into(),
                    hostname: "waypoint.infra.svc.cluster.local".into(),
                },
                hbone_mtls_port: 15008,
            });
        }
        for w in &mut data.workloads {
            if w.name == "legacy" {
                w.waypoint = Some(GatewayAddress {
                    destination: GatewayDestination::Address {
                        network: String::new(),
                        address: "10.250.128.99".parse().unwrap(),
                    },
                    hbone_mtls_port: 15008,
                });
            }
        }
        data.workloads.push(waypoint);
        data.services.push(wp_service);
        let store = StateStore::new("istio-system");
        store.replace_source("t", data);
        store.snapshot()
    }

    fn waypoint_identity() -> Identity {
        "spiffe://cluster.local/ns/infra/sa/waypoint"
            .parse()
            .unwrap()
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_it_with_the_vip_as_authority() {
        let snap = with_waypoint();
        let vip: SocketAddr = "10.250.128.10:80".parse().unwrap();
        let r = ready(decide(&snap, &client(), vip, &own()));
        assert_eq!(
            r.transport,
            Transport::Hbone {
                tunnel: "10.250.1.9:15008".parse().unwrap(),
                identities: vec![waypoint_identity()],
            }
        );
        assert_eq!(r.target, vip, "the authority is what the client dialled");
        assert_eq!(r.destination.unwrap().uid, "waypoint-1");
        assert_eq!(r.service.unwrap().name, "server");
        // Addressed directly, a workload without its own waypoint is reached directly.
        let r = ready(decide(
            &snap,
            &client(),
            "10.250.2.2:8080".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        assert!(
            matches!(r.transport, Transport::Hbone { tunnel, .. } if tunnel.ip() == r.target.ip())
        );
    }

    #[test]
    fn a_workload_with_a_waypoint_by_address_is_reached_through_it() {
        let snap = with_waypoint();
        let dst: SocketAddr = "10.250.2.3:80".parse().unwrap();
        let r = ready(decide(&snap, &client(), dst, &own()));
        assert_eq!(
            (r.transport, r.target),
            (
                Transport::Hbone {
                    tunnel: "10.250.1.9:15008".parse().unwrap(),
                    identities: vec![waypoint_identity()],
                },
                dst
            )
        );
    }

    #[test]
    fn the_waypoint_itself_goes_direct_and_a_missing_one_is_an_error() {
        let snap = with_waypoint();
        let waypoint = snap.workload_by_uid("waypoint-1").unwrap().clone();
        let r = ready(decide(
            &snap,
            &waypoint,
            "10.250.128.10:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(
            r.target,
            "10.250.2.2:8080".parse().unwrap(),
            "to the endpoint"
        );

        let mut data = snapshot_data(CONFIG);
        data.services[0].waypoint = Some(GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "infra".into(),
                hostname: "gone.infra.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        });
        let store = StateStore::new("istio-system");
        store.replace_source("t", data);
        let e = decide(
            &store.snapshot(),
            &client(),
            "10.250.128.10:80".parse().unwrap(),
            &own(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            RouteError::NoWaypoint("infra/gone.infra.svc.cluster.local".into())
        );
    }

    /// CONFIG with `server` on network `west`, whose gateway is the service at VIP
    /// 10.250.3.100 (one instance, 10.250.3.9, identity `istio-system/sa/eastwest`), and a
    /// second endpoint `server-2` on `west` with another identity.
    fn two_networks() -> Arc<Snapshot> {
        let store = StateStore::new("istio-system");
        store.replace_source("t", two_networks_data());
        store.snapshot()
    }

    fn west_gateway() -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Address {
                network: "west".into(),
                address: "10.250.3.100".parse().unwrap(),
            },
            hbone_mtls_port: 15008,
        }
    }

    fn two_networks_data() -> SourceData {
        let mut data = snapshot_data(CONFIG);
        let gateway = west_gateway();
        for w in &mut data.workloads {
            w.network = "west".into();
            w.network_gateway = Some(gateway.clone());
        }
        // Known by no address: reachable only through the gateway.
        let server2 = Workload {
            network_gateway: Some(gateway),
            ..mesh_workload("server-2", "shop", "server-2", None, "west")
        };
        let gw = mesh_workload(
            "eastwest-1",
            "istio-system",
            "eastwest",
            Some("10.250.3.9"),
            "west",
        );
        let gw_service = hbone_service("eastwest", "istio-system", "10.250.3.100");
        let server_key = data.services[0].key();
        data.endpoints
            .push((server_key, "server-2".into(), BTreeMap::new()));
        data.endpoints
            .push((gw_service.key(), "eastwest-1".into(), BTreeMap::new()));
        data.workloads.extend([server2, gw]);
        data.services.push(gw_service);
        data
    }

    fn on_network(network: &str) -> Workload {
        Workload {
            network: network.into(),
            ..client()
        }
    }

    #[test]
    fn an_endpoint_on_another_network_is_reached_through_its_gateway() {
        let snap = two_networks();
        let vip: SocketAddr = "10.250.128.10:80".parse().unwrap();
        let id = |s: &str| s.parse::<Identity>().unwrap();
        for _ in 0..20 {
            let r = ready(decide(&snap, &on_network("east"), vip, &own()));
            assert_eq!(
                r.transport,
                Transport::ViaGateway {
                    gateway: "10.250.3.9:15008".parse().unwrap(),
                    gateway_identities: vec![id(
                        "spiffe://cluster.local/ns/istio-system/sa/eastwest"
                    )],
                    // Whichever endpoint the gateway picks, and the service's own SAN.
                    identities: vec![
                        id("spiffe://cluster.local/ns/shop/sa/server-sa"),
                        id("spiffe://cluster.local/ns/shop/sa/server-2"),
                        id("spiffe://cluster.local/ns/shop/sa/extra"),
                    ],
                    authority: Authority::Service {
                        host: "server.shop.svc.cluster.local".into(),
                        port: 80
                    },
                }
            );
            assert!(r.destination.is_none(), "the gateway picks the endpoint");
            assert_eq!(r.service.unwrap().name, "server");
        }
        // On the endpoints' own network: direct, and only to the endpoint with an address.
        for _ in 0..20 {
            let r = ready(decide(&snap, &on_network("west"), vip, &own()));
            assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        }
        // A workload of another network is not reachable by its address.
        let r = ready(decide(
            &snap,
            &on_network("east"),
            "10.250.2.2:8080".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.transport, Transport::Plain);
        assert!(r.destination.is_none());
    }

    #[test]
    fn a_waypoint_on_another_network_is_reached_through_its_gateway() {
        // two_networks(), and `server`'s service names a waypoint whose one instance is on west.
        let mut data = two_networks_data();
        let waypoint = Workload {
            network_gateway: Some(west_gateway()),
            ..mesh_workload(
                "waypoint-west",
                "shop",
                "waypoint",
                Some("10.250.2.9"),
                "west",
            )
        };
        let wp_service = hbone_service("waypoint", "shop", "10.250.128.98");
        data.services[0].waypoint = Some(GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        });
        data.endpoints
            .push((wp_service.key(), "waypoint-west".into(), BTreeMap::new()));
        data.services.push(wp_service);
        data.workloads.push(waypoint);
        let store = StateStore::new("istio-system");
        store.replace_source("t", data);
        let snap = store.snapshot();
        let r = ready(decide(
            &snap,
            &on_network("east"),
            "10.250.128.10:80".parse().unwrap(),
            &own(),
        ));
        let id = |s: &str| s.parse::<Identity>().unwrap();
        assert_eq!(
            r.transport,
            Transport::ViaGateway {
                gateway: "10.250.3.9:15008".parse().unwrap(),
                gateway_identities: vec![id("spiffe://cluster.local/ns/istio-system/sa/eastwest")],
                identities: vec![id("spiffe://cluster.local/ns/shop/sa/waypoint")],
                authority: Authority::Service {
                    host: "server.shop.svc.cluster.local".into(),
                    port: 80
                },
            }
        );
        assert_eq!(r.service.unwrap().name, "server");
        // On the waypoint's own network it is reached directly, by the VIP.
        let r = ready(decide(
            &snap,
            &on_network("west"),
            "10.250.128.10:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(
            r.transport,
            Transport::Hbone {
                tunnel: "10.250.2.9:15008".parse().unwrap(),
                identities: vec![id("spiffe://cluster.local/ns/shop/sa/waypoint")],
            }
        );
    }

    #[test]
    fn without_a_gateway_another_networks_endpoints_are_no_candidates() {
        // CONFIG's workloads all on west, behind `gateway`; a client on east asks for the VIP.
        let from_east = |gateway: Option<GatewayAddress>| {
            let mut data = snapshot_data(CONFIG);
            for w in &mut data.workloads {
                w.network = "west".into();
                w.network_gateway = gateway.clone();
            }
            let store = StateStore::new("istio-system");
            store.replace_source("t", data);
            decide(
                &store.snapshot(),
                &on_network("east"),
                "10.250.128.10:80".parse().unwrap(),
                &own(),
            )
            .unwrap_err()
        };
        assert_eq!(
            from_east(None),
            RouteError::NoHealthyEndpoint("shop/server.shop.svc.cluster.local".into())
        );
        // A gateway that names nothing known is an error, not a guess.
        let unknown = GatewayAddress {
            destination: GatewayDestination::Address {
                network: "west".into(),
                address: "10.250.3.77".parse().unwrap(),
            },
            hbone_mtls_port: 15008,
        };
        assert_eq!(
            from_east(Some(unknown)),
            RouteError::NoGateway("west/10.250.3.77".into())
        );
    }

    #[test]
    fn own_ports_are_refused() {
        let snap = snapshot(CONFIG);
        let e = decide(
            &snap,
            &client(),
            "10.250.2.2:15008".parse().unwrap(),
            &own(),
        )
        .unwrap_err();
        assert!(matches!(e, RouteError::OwnPort(_)));
    }
}
