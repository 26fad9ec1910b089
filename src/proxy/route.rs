//! The routing decision, made in one place and returned as a plain value that the transport
//! then carries out.

use std::net::SocketAddr;
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
}

/// Decides how a connection to `original_dst` is carried.
///
/// - a service VIP: pick a healthy endpoint at random, then as for that workload;
/// - a workload speaking HBONE: tunnel to its HBONE port (`ports.hbone`);
/// - a workload speaking TCP, or an address weft does not know: plain TCP passthrough.
pub fn decide(
    snap: &Snapshot,
    original_dst: SocketAddr,
    ports: &Ports,
) -> Result<Route, RouteError> {
    if let Some(service) = snap.service_by_vip(original_dst.ip()) {
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
            return Err(RouteError::NoHealthyEndpoint(key.to_string()));
        };
        let target = SocketAddr::new(*ip, port);
        let mut route = to_workload(&ep.workload, target, ports)?;
        if let Transport::Hbone { identities, .. } = &mut route.transport {
            identities.extend(
                service
                    .subject_alt_names
                    .iter()
                    .filter_map(|s| s.parse::<Identity>().ok()),
            );
        }
        route.service = Some(service.clone());
        return Ok(route);
    }
    if let Some(w) = snap.workload_by_ip(original_dst.ip()) {
        let mut route = to_workload(w, original_dst, ports)?;
        route.service = snap.services_of(&w.uid).next().cloned();
        return Ok(route);
    }
    Ok(Route {
        transport: Transport::Plain,
        target: original_dst,
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
    use crate::state::local::{parse, Defaults};
    use crate::state::StateStore;

    fn snapshot(yaml: &str) -> Arc<Snapshot> {
        let d = Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        };
        let data = parse(yaml, std::path::Path::new("t.yaml"), &d)
            .unwrap()
            .data;
        let store = StateStore::new("istio-system");
        store.replace_source("t", data);
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

    #[test]
    fn hbone_workload_is_tunnelled() {
        let snap = snapshot(CONFIG);
        let r = decide(&snap, "10.250.2.2:8080".parse().unwrap(), &own()).unwrap();
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
        let r = decide(&snap, "10.250.2.3:80".parse().unwrap(), &own()).unwrap();
        assert_eq!(r.transport, Transport::Plain);
        assert_eq!(r.destination.unwrap().name, "legacy");
        let r = decide(&snap, "10.250.9.9:443".parse().unwrap(), &own()).unwrap();
        assert_eq!(
            (r.transport, r.target),
            (Transport::Plain, "10.250.9.9:443".parse().unwrap())
        );
    }

    #[test]
    fn vip_picks_endpoint_and_maps_port() {
        let snap = snapshot(CONFIG);
        let r = decide(&snap, "10.250.128.10:80".parse().unwrap(), &own()).unwrap();
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
    fn own_ports_are_refused() {
        let snap = snapshot(CONFIG);
        let e = decide(&snap, "10.250.2.2:15008".parse().unwrap(), &own()).unwrap_err();
        assert!(matches!(e, RouteError::OwnPort(_)));
    }
}
