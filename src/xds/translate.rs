//! istiod's `Address` resources (a Workload or a Service) turned into weft's state types.
//!
//! Every field weft can act on is mapped; the waypoint and network-gateway fields are kept in
//! the state for the work that will route through them. A resource that cannot be represented
//! faithfully is refused whole, with the field that made it so: the client NACKs it and applies
//! the rest of the response.

use std::collections::BTreeMap;

use crate::authz::xds_form::ip_from_bytes;
use crate::proto::workload as pb;
use crate::state::{
    EndpointPorts, GatewayAddress, GatewayDestination, HealthStatus, Locality, Protocol, Service,
    ServiceKey, Visibility, Workload,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {reason}")]
pub struct TranslateError {
    /// Which object and field: `workload <uid>: addresses[1]`.
    pub what: String,
    pub reason: String,
}

fn err(what: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    TranslateError {
        what: what.into(),
        reason: reason.into(),
    }
}

/// What one `Address` resource says.
#[derive(Debug)]
pub enum Translated {
    Workload(Box<Workload>, EndpointPorts),
    Service(Service),
}

/// Cluster-wide facts istiod may leave out of a resource.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub trust_domain: String,
    pub cluster_id: String,
}

pub fn address(a: pb::Address, defaults: &Defaults) -> Result<Translated, TranslateError> {
    match a.r#type {
        Some(pb::address::Type::Workload(w)) => {
            workload(w, defaults).map(|(w, e)| Translated::Workload(Box::new(w), e))
        }
        Some(pb::address::Type::Service(s)) => service(s).map(Translated::Service),
        None => Err(err("address", "neither a workload nor a service")),
    }
}

fn port(v: u32, what: &str) -> Result<u16, TranslateError> {
    u16::try_from(v).map_err(|_| err(what, format!("port {v} is out of range 0-65535")))
}

fn port_map(ports: &[pb::Port], what: &str) -> Result<BTreeMap<u16, u16>, TranslateError> {
    ports
        .iter()
        .map(|p| Ok((port(p.service_port, what)?, port(p.target_port, what)?)))
        .collect()
}

fn gateway(
    g: Option<pb::GatewayAddress>,
    what: &str,
) -> Result<Option<GatewayAddress>, TranslateError> {
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination {
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace,
            hostname: h.hostname,
        },
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            address: ip_from_bytes(&a.address)
                .ok_or_else(|| err(what, "gateway address is not 4 or 16 bytes"))?,
            network: a.network,
        },
        None => return Err(err(what, "gateway with neither hostname nor address")),
    };
    let hbone = port(g.hbone_mtls_port, what)?;
    Ok(Some(GatewayAddress::new(destination, hbone)))
}

fn workload(w: pb::Workload, d: &Defaults) -> Result<(Workload, EndpointPorts), TranslateError> {
    if w.uid.is_empty() {
        return Err(err(
            format!("workload {}/{}", w.namespace, w.name),
            "no uid",
        ));
    }
    let what = |field: &str| format!("workload {}: {field}", w.uid);
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => Protocol::TCP,
        Ok(pb::TunnelProtocol::Hbone) => Protocol::HBONE,
        // Sidecar mTLS is Envoy's own protocol; a node proxy sending plain TCP instead would
        // break the workload's traffic, so it is refused (ztunnel refuses it too).
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            return Err(err(
                what("tunnelProtocol"),
                "LEGACY_ISTIO_MTLS is not supported",
            ))
        }
        Err(_) => {
            return Err(err(
                what("tunnelProtocol"),
                format!("unknown value {}", w.tunnel_protocol),
            ))
        }
    };
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| {
            ip_from_bytes(b).ok_or_else(|| {
                err(
                    what(&format!("addresses[{i}]")),
                    format!("{} bytes; an address is 4 or 16", b.len()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let status = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        _ => HealthStatus::Healthy,
    };
    let mut endpoints = EndpointPorts::new();
    for (key, list) in &w.services {
        let svc: ServiceKey = key
            .parse()
            .map_err(|e: String| err(what(&format!("services[{key:?}]")), e))?;
        endpoints.insert(
            svc,
            port_map(&list.ports, &what(&format!("services[{key:?}]")))?,
        );
    }
    let waypoint = gateway(w.waypoint, &what("waypoint"))?;
    let network_gateway = gateway(w.network_gateway, &what("networkGateway"))?;
    let or = |v: String, default: &str| if v.is_empty() { default.to_string() } else { v };
    // An unknown number (a newer API) reads as the default, as prost reads it.
    let workload_type = pb::WorkloadType::try_from(w.workload_type)
        .unwrap_or_default()
        .as_str_name()
        .to_ascii_lowercase();
    let locality = w
        .locality
        .map(|l| Locality {
            region: l.region,
            zone: l.zone,
        })
        .unwrap_or_default();
    let workload = Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or(w.service_account, "default"),
        trust_domain: or(w.trust_domain, &d.trust_domain),
        workload_ips,
        protocol,
        node: w.node,
        network: w.network,
        hostname: w.hostname,
        cluster_id: or(w.cluster_id, &d.cluster_id),
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        workload_type,
        locality,
        labels: BTreeMap::new(),
        status,
        authorization_policies: w.authorization_policies,
        waypoint,
        network_gateway,
        netns: None,
        // Not in the workload API: istio-cni reads the annotation and redirects (or not).
        dns_capture: None,
    };
    Ok((workload, endpoints))
}

fn service(s: pb::Service) -> Result<Service, TranslateError> {
    let what = |field: &str| format!("service {}/{}: {field}", s.namespace, s.hostname);
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err(err(
            what("hostname"),
            "a service needs a namespace and a hostname",
        ));
    }
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            ip_from_bytes(&a.address).ok_or_else(|| {
                err(
                    what(&format!("addresses[{i}]")),
                    format!("{} bytes; an address is 4 or 16", a.address.len()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        ports: port_map(&s.ports, &what("ports"))?,
        waypoint: gateway(s.waypoint.clone(), &what("waypoint"))?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        subject_alt_names: s.subject_alt_names,
        visibility: if s.visibility == pb::service::Visibility::Namespace as i32 {
            Visibility::Namespace
        } else {
            Visibility::Public
        },
        passthrough: s
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.mode == pb::load_balancing::Mode::Passthrough as i32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        }
    }

    fn pod() -> pb::Workload {
        pb::Workload {
            uid: "Kubernetes//Pod/shop/a1".into(),
            name: "a1".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 250, 1, 2]],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: "client".into(),
            node: "node-a".into(),
            services: [(
                "shop/web.shop.svc.cluster.local".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Hostname(
                    pb::NamespacedHostname {
                        namespace: "shop".into(),
                        hostname: "waypoint.shop.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_becomes_a_workload_with_its_endpoints() {
        let a = pb::Address {
            r#type: Some(pb::address::Type::Workload(pod())),
        };
        let Translated::Workload(w, eps) = address(a, &defaults()).expect("valid") else {
            panic!("not a workload");
        };
        assert_eq!(w.uid, "Kubernetes//Pod/shop/a1");
        assert_eq!(
            w.workload_ips,
            vec!["10.250.1.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(w.protocol, Protocol::HBONE);
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert_eq!(w.waypoint.as_ref().map(|g| g.hbone_mtls_port), Some(15008));
        let key: ServiceKey = "shop/web.shop.svc.cluster.local".parse().unwrap();
        assert_eq!(eps[&key], BTreeMap::from([(80, 8080)]));
    }

    #[test]
    fn network_and_network_gateway_are_kept_for_routing() {
        let mut p = pod();
        p.network = "west".into();
        p.network_gateway = Some(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: "west".into(),
                    address: vec![10, 250, 2, 3],
                    length: None,
                },
            )),
            hbone_mtls_port: 15009,
        });
        let (w, _) = workload(p, &defaults()).expect("valid");
        assert_eq!(w.network, "west");
        let gw = w.network_gateway.expect("a gateway");
        assert_eq!(
            gw.destination,
            GatewayDestination::Address {
                network: "west".into(),
                address: "10.250.2.3".parse().unwrap(),
            }
        );
        assert_eq!(gw.hbone_mtls_port, 15009);
        // A gateway address that is no address is refused by field.
        let mut bad = pod();
        bad.network_gateway = Some(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: "west".into(),
                    address: vec![10, 250],
                    length: None,
                },
            )),
            hbone_mtls_port: 15008,
        });
        let e = workload(bad, &defaults()).unwrap_err();
        assert!(e.to_string().contains("networkGateway"), "{e}");
    }

    #[test]
    fn workload_type_and_locality_are_kept_for_the_baggage() {
        let a = |w: pb::Workload| pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        let mut p = pod();
        p.workload_name = "web".into();
        p.workload_type = pb::WorkloadType::Pod as i32;
        p.locality = Some(pb::Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            subzone: String::new(),
        });
        let Translated::Workload(w, _) = address(a(p), &defaults()).unwrap() else {
            panic!("a workload");
        };
        assert_eq!(
            w.baggage().header(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web,\
             cloud.region=eu,cloud.availability_zone=eu-1"
        );
        // Unset (the API's default) is a deployment; a number this weft does not know too.
        let mut p = pod();
        p.workload_type = 99;
        let Translated::Workload(w, _) = address(a(p), &defaults()).unwrap() else {
            panic!("a workload");
        };
        assert_eq!(w.workload_type, "deployment");
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        let mut legacy = pod();
        legacy.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32;
        let e = workload(legacy, &defaults()).unwrap_err();
        assert!(e.to_string().contains("LEGACY_ISTIO_MTLS"), "{e}");

        let mut short = pod();
        short.addresses = vec![vec![10, 250, 1]];
        let e = workload(short, &defaults()).unwrap_err();
        assert_eq!(e.what, "workload Kubernetes//Pod/shop/a1: addresses[0]");

        let mut bad_key = pod();
        bad_key.services = [("noslash".to_string(), pb::PortList::default())].into();
        assert!(workload(bad_key, &defaults()).is_err());

        let svc = pb::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 99_999,
                app_protocol: 0,
            }],
            ..Default::default()
        };
        assert!(service(svc).unwrap_err().reason.contains("99999"));
    }

    #[test]
    fn a_service_keeps_vips_ports_and_sans() {
        let s = service(pb::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 250, 128, 10],
                length: None,
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            }],
            subject_alt_names: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            s.vips,
            vec!["10.250.128.10".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(s.ports, BTreeMap::from([(80, 0)]));
        assert_eq!(s.subject_alt_names.len(), 1);
        assert!(!s.passthrough);
    }

    #[test]
    fn passthrough_load_balancing_marks_the_service() {
        let s = service(pb::Service {
            name: "legacy".into(),
            namespace: "shop".into(),
            hostname: "legacy.example.com".into(),
            load_balancing: Some(pb::LoadBalancing {
                mode: pb::load_balancing::Mode::Passthrough as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("valid");
        assert!(s.passthrough);
        assert_eq!(s.visibility, Visibility::Public);
    }

    #[test]
    fn namespace_visibility_is_kept() {
        let s = service(pb::Service {
            name: "db".into(),
            namespace: "shop".into(),
            hostname: "db.example.com".into(),
            visibility: pb::service::Visibility::Namespace as i32,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(s.visibility, Visibility::Namespace);
        assert!(s.visible_to("shop") && !s.visible_to("other"));
    }
}
