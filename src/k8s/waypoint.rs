//! Istio's `istio.io/use-waypoint` labels → the waypoint a service or a workload names, for
//! the Kubernetes-direct mode (under istiod they arrive resolved, in the Address resources).
//!
//! The label names the waypoint; it lives in the labelled object's namespace unless
//! `istio.io/use-waypoint-namespace` says another. weft does not read Gateways: the waypoint
//! is the Service of that name (the Service Istio's waypoint deployment creates for its
//! Gateway), reached on its HBONE port 15008. A service takes its own label, else its
//! namespace's; a pod only its own (workload-addressed traffic is what a pod's label asks
//! for). `none` on the object opts it out of its namespace's waypoint.

use std::collections::BTreeMap;

use super::translate::ClusterFacts;
use crate::state::{GatewayAddress, GatewayDestination};

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// The HBONE port waypoints listen on.
const WAYPOINT_HBONE_PORT: u16 = 15008;

type Labels = BTreeMap<String, String>;

/// The waypoint of a service (a Kubernetes Service or a ServiceEntry host) in `namespace`,
/// whose own hostname is `own_hostname` (a waypoint's own service never goes through itself).
pub fn for_service(
    own: Option<&Labels>,
    namespace_labels: Option<&Labels>,
    namespace: &str,
    own_hostname: &str,
    facts: &ClusterFacts,
) -> Option<GatewayAddress> {
    let named = match own.and_then(|l| named(l, namespace, facts)) {
        Some(choice) => choice,
        None => namespace_labels.and_then(|l| named(l, namespace, facts))?,
    };
    let waypoint = named?;
    match &waypoint.destination {
        GatewayDestination::Hostname { hostname, .. } if hostname == own_hostname => None,
        _ => Some(waypoint),
    }
}

/// The waypoint of a pod, for traffic addressed to it directly: its own label only.
pub fn for_workload(
    own: Option<&Labels>,
    namespace: &str,
    facts: &ClusterFacts,
) -> Option<GatewayAddress> {
    own.and_then(|l| named(l, namespace, facts)).flatten()
}

/// What `labels` say: nothing (`None`), an opt-out (`Some(None)`), or a waypoint.
fn named(labels: &Labels, namespace: &str, facts: &ClusterFacts) -> Option<Option<GatewayAddress>> {
    let name = labels.get(USE_WAYPOINT)?.trim();
    if name.is_empty() || name == "none" {
        return Some(None);
    }
    let ns = labels
        .get(USE_WAYPOINT_NAMESPACE)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(namespace);
    Some(Some(GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: ns.to_string(),
            hostname: format!("{name}.{ns}.svc.{}", facts.domain_suffix),
        },
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ClusterFacts {
        ClusterFacts::for_tests()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn host(w: Option<GatewayAddress>) -> Option<String> {
        w.map(|w| match w.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => format!("{namespace}/{hostname}"),
            GatewayDestination::Address { address, .. } => address.to_string(),
        })
    }

    #[test]
    fn a_service_takes_its_own_label_else_its_namespaces() {
        let ns = labels(&[(USE_WAYPOINT, "ns-wp")]);
        let f = facts();
        let svc = |own: &[(&str, &str)]| {
            host(for_service(
                Some(&labels(own)),
                Some(&ns),
                "shop",
                "web.shop.svc.cluster.local",
                &f,
            ))
        };
        assert_eq!(
            svc(&[]).as_deref(),
            Some("shop/ns-wp.shop.svc.cluster.local")
        );
        assert_eq!(
            svc(&[(USE_WAYPOINT, "own"), (USE_WAYPOINT_NAMESPACE, "infra")]).as_deref(),
            Some("infra/own.infra.svc.cluster.local")
        );
        assert_eq!(svc(&[(USE_WAYPOINT, "none")]), None, "opted out");
        // The waypoint's own service is not sent through itself.
        assert_eq!(
            host(for_service(
                None,
                Some(&ns),
                "shop",
                "ns-wp.shop.svc.cluster.local",
                &f
            )),
            None
        );
    }

    #[test]
    fn a_pod_takes_only_its_own_label() {
        let f = facts();
        assert_eq!(host(for_workload(Some(&labels(&[])), "shop", &f)), None);
        assert_eq!(
            host(for_workload(
                Some(&labels(&[(USE_WAYPOINT, "wp")])),
                "shop",
                &f
            ))
            .as_deref(),
            Some("shop/wp.shop.svc.cluster.local")
        );
    }
}
