//! The routing decision, made in one place and returned as a plain value that the transport
//! then carries out.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::config::Ports;
use crate::identity::Identity;
use crate::state::{Protocol, Service, Snapshot, Workload};

/// How the bytes travel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// In an HBONE tunnel to `tunnel` (the destination pod's HBONE port), accepting any of
    /// `identities` as the server.
    Hbone {
        tunnel: SocketAddr,
        identities: Vec<Identity>,
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

/// Decides how a connection from a workload in `source_namespace` to `original_dst` is
/// carried.
///
/// - a service VIP: pick a healthy endpoint at random, then as for that workload (an endpoint
///   known only by a hostname is resolved by the caller); a passthrough service's VIP goes to
///   the address dialled, as if no service had it;
/// - a workload speaking HBONE: tunnel to its HBONE port (`ports.hbone`);
/// - a workload speaking TCP, or an address weft does not know: plain TCP passthrough.
pub fn decide(
    snap: &Snapshot,
    source_namespace: &str,
    original_dst: SocketAddr,
    ports: &Ports,
) -> Result<Decision, RouteError> {
    // A service the client may not see is, to it, no service: its VIP is just an address.
    let service = snap
        .service_by_vip(original_dst.ip())
        .filter(|s| s.visible_to(source_namespace));
    if let Some(service) = service {
        if service.passthrough {
            let mut route = to_address(snap, original_dst, ports)?;
            route.service = Some(service.clone());
            return Ok(Decision::Ready(route));
        }
        let key = service.key();
        let endpoints: Vec<_> = snap.healthy_endpoints(&key).collect();
        if endpoints.is_empty() {
            return Err(RouteError::NoHealthyEndpoint(key.to_string()));
        }
        let ep = endpoints[rand::rng().random_range(0..endpoints.len())];
        let port = ep.target_port(service, original_dst.port());
        // Prefer an address of the family the client used.
        let ips = &ep.workload.workload_ips;
        let Some(ip) = ips
            .iter()
            .find(|ip| ip.is_ipv4() == original_dst.is_ipv4())
            .or(ips.first())
        else {
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
        let target = SocketAddr::new(*ip, port);
        return service_route(service, &ep.workload, target, ports).map(Decision::Ready);
    }
    to_address(snap, original_dst, ports).map(Decision::Ready)
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
        identities.extend(
            service
                .subject_alt_names
                .iter()
                .filter_map(|s| s.parse::<Identity>().ok()),
        );
    }
    route.service = Some(service.clone());
    Ok(route)
}

/// The route to an address as dialled: the workload that has it, else plain TCP.
fn to_address(snap: &Snapshot, dst: SocketAddr, ports: &Ports) -> Result<Route, RouteError> {
    if let Some(w) = snap.workload_by_ip(dst.ip()) {
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
        let d = decide(&snap, "shop", "240.240.0.7:80".parse().unwrap(), &own()).unwrap();
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
            "shop",
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
            "shop",
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
            "shop",
            "10.250.2.3:80".parse().unwrap(),
            &own(),
        ));
        assert_eq!(r.transport, Transport::Plain);
        assert_eq!(r.destination.unwrap().name, "legacy");
        let r = ready(decide(
            &snap,
            "shop",
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
            "shop",
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
        let r = ready(decide(&snap, "shop", vip, &own()));
        assert_eq!(r.target, "10.250.2.2:8080".parse().unwrap());
        // From elsewhere the VIP is only an address weft does not know.
        let r = ready(decide(&snap, "elsewhere", vip, &own()));
        assert_eq!((r.transport, r.target), (Transport::Plain, vip));
        assert!(r.service.is_none());
    }

    #[test]
    fn own_ports_are_refused() {
        let snap = snapshot(CONFIG);
        let e = decide(&snap, "shop", "10.250.2.2:15008".parse().unwrap(), &own()).unwrap_err();
        assert!(matches!(e, RouteError::OwnPort(_)));
    }
}
