//! Istio's multi-network topology in the Kubernetes-direct mode (under istiod it arrives
//! resolved, in each workload's `network` and `network_gateway`).
//!
//! A pod's network is its `topology.istio.io/network` label, else its namespace's, else that
//! of Istio's system namespace (where Istio's multi-network setup labels the cluster's
//! network), else the unnamed default network. A network's east-west gateway is a Service
//! carrying the same label with an HBONE port (15008, or a port named `tls-hbone`) and an
//! address other networks can reach: its load balancer's ingress IPs, else its external IPs.
//! Those addresses are added to the Service's VIPs, so the gateway's identity is found from
//! its endpoints like any service's.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as K8sService;

use crate::state::workload::DEFAULT_HBONE_PORT;
use crate::state::{GatewayAddress, GatewayDestination};

pub const NETWORK_LABEL: &str = "topology.istio.io/network";
const HBONE_PORT_NAME: &str = "tls-hbone";

type Labels = BTreeMap<String, String>;

/// The network of a pod, from its labels and its namespace's, with the system namespace's
/// as the cluster's default.
pub fn of_pod(pod: Option<&Labels>, namespace: Option<&Labels>, system: Option<&Labels>) -> String {
    [pod, namespace, system]
        .into_iter()
        .flatten()
        .find_map(|l| {
            l.get(NETWORK_LABEL)
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_default()
        .to_string()
}

/// The east-west gateway of each network that has one.
#[derive(Debug, Default)]
pub struct Gateways {
    by_network: HashMap<String, Gateway>,
}

#[derive(Clone, Debug)]
struct Gateway {
    /// `namespace/name` of the Service, for choosing among several and for logs.
    service: String,
    addresses: Vec<IpAddr>,
    port: u16,
}

impl Gateways {
    /// Finds the gateway Services. Several for one network: the first by `namespace/name`
    /// wins, so every weft picks the same one.
    pub fn from_services(services: &[std::sync::Arc<K8sService>]) -> Gateways {
        let mut by_network: HashMap<String, Gateway> = HashMap::new();
        for svc in services {
            let Some(g) = gateway_of(svc) else { continue };
            let network = svc
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(NETWORK_LABEL));
            let Some(network) = network.map(|n| n.trim()).filter(|n| !n.is_empty()) else {
                continue;
            };
            match by_network.get(network) {
                Some(have) if have.service <= g.service => {}
                _ => {
                    by_network.insert(network.to_string(), g);
                }
            }
        }
        Gateways { by_network }
    }

    /// Where workloads of `network` are reached from other networks.
    pub fn for_network(&self, network: &str) -> Option<GatewayAddress> {
        let g = self.by_network.get(network)?;
        let address = *g.addresses.first()?;
        Some(GatewayAddress {
            destination: GatewayDestination::Address {
                network: network.to_string(),
                address,
            },
            hbone_mtls_port: g.port,
        })
    }

    /// The reachable addresses of a Service that is a network's gateway (none otherwise).
    pub fn addresses_of(&self, namespace: &str, name: &str) -> Vec<IpAddr> {
        let key = format!("{namespace}/{name}");
        self.by_network
            .values()
            .filter(|g| g.service == key)
            .flat_map(|g| g.addresses.iter().copied())
            .collect()
    }
}

fn gateway_of(svc: &K8sService) -> Option<Gateway> {
    let spec = svc.spec.as_ref()?;
    let port = spec.ports.iter().flatten().find_map(|p| {
        let named = p.name.as_deref() == Some(HBONE_PORT_NAME);
        (p.port == i32::from(DEFAULT_HBONE_PORT) || named)
            .then(|| u16::try_from(p.port).ok())
            .flatten()
    })?;
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok());
    let mut addresses: Vec<IpAddr> = ingress.collect();
    if addresses.is_empty() {
        addresses = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
    }
    if addresses.is_empty() {
        return None;
    }
    Some(Gateway {
        service: format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref()?
        ),
        addresses,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn labels(network: &str) -> Labels {
        Labels::from([(NETWORK_LABEL.to_string(), network.to_string())])
    }

    fn service(v: serde_json::Value) -> Arc<K8sService> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn a_pods_network_is_its_own_then_its_namespaces_then_the_clusters() {
        let (pod, ns, sys) = (labels("p"), labels("n"), labels("s"));
        assert_eq!(of_pod(Some(&pod), Some(&ns), Some(&sys)), "p");
        assert_eq!(of_pod(None, Some(&ns), Some(&sys)), "n");
        assert_eq!(of_pod(Some(&Labels::new()), None, Some(&sys)), "s");
        assert_eq!(of_pod(Some(&labels(" ")), None, None), "");
    }

    #[test]
    fn a_labelled_service_with_an_hbone_port_and_an_address_is_its_networks_gateway() {
        let gw = |name: &str, network: &str, extra: serde_json::Value| {
            let mut v = json!({
                "metadata": {"name": name, "namespace": "istio-system",
                             "labels": {NETWORK_LABEL: network}},
                "spec": {"ports": [{"port": 15008}, {"port": 15012}]},
            });
            json_merge(&mut v, extra);
            service(v)
        };
        let services = vec![
            gw(
                "eastwest",
                "west",
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}},
                                          "spec": {"externalIPs": ["192.0.2.99"]}}),
            ),
            // A later name for the same network loses.
            gw(
                "zz-second",
                "west",
                json!({"spec": {"externalIPs": ["192.0.2.8"]}}),
            ),
            gw(
                "by-external-ip",
                "north",
                json!({"spec": {"externalIPs": ["192.0.2.9"]}}),
            ),
            // No address other networks can reach: no gateway.
            gw("internal", "south", json!({})),
            // No HBONE port: no gateway.
            service(
                json!({"metadata": {"name": "web", "namespace": "x", "labels": {NETWORK_LABEL: "east"}},
                           "spec": {"ports": [{"port": 80}], "externalIPs": ["192.0.2.10"]}}),
            ),
        ];
        let g = Gateways::from_services(&services);
        assert_eq!(
            g.for_network("west"),
            Some(GatewayAddress {
                destination: GatewayDestination::Address {
                    network: "west".into(),
                    address: "192.0.2.7".parse().unwrap()
                },
                hbone_mtls_port: 15008
            })
        );
        assert!(g.for_network("north").is_some());
        assert_eq!(g.for_network("south"), None);
        assert_eq!(g.for_network("east"), None);
        assert_eq!(
            g.addresses_of("istio-system", "eastwest"),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert!(g.addresses_of("istio-system", "zz-second").is_empty());
    }

    fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }
}
