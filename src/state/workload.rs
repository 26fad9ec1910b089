//! Workloads (pods, VMs) as weft needs them: addresses, identity, tunnel protocol, where they run.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// How a workload accepts mesh traffic: HBONE means "send to its port 15008 in a tunnel", TCP
/// means it is not in the mesh and gets plain TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    TCP,
    HBONE,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// A waypoint or a network gateway a workload or service names: where traffic for it goes
/// instead of straight to it. Waypoints are routed through (`proxy::route`); network gateways
/// are kept in the state, not routed through yet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// The gateway's HBONE port (15008 when the control plane says 0).
    pub hbone_mtls_port: u16,
}

/// The HBONE port a gateway or waypoint listens on when its configuration names none.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

impl GatewayAddress {
    /// `hbone_mtls_port` 0 (unset) is [`DEFAULT_HBONE_PORT`].
    pub fn new(destination: GatewayDestination, hbone_mtls_port: u16) -> Self {
        GatewayAddress {
            destination,
            hbone_mtls_port: if hbone_mtls_port == 0 {
                DEFAULT_HBONE_PORT
            } else {
                hbone_mtls_port
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    /// A service, by `namespace` and `hostname`.
    Hostname { namespace: String, hostname: String },
    /// An address on a network.
    Address { network: String, address: IpAddr },
}

/// Where a workload runs, as the control plane knows it (region and zone of its node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty()
    }
}

/// Where a local workload's sockets live. `Pod` is a captured pod; `Here` is weft's own network
/// namespace (sidecar-like use, and in-process tests).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Netns {
    Here,
    Pod(PathBuf),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub workload_ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub node: String,
    /// The network the workload's addresses belong to (empty: the local network).
    pub network: String,
    /// A DNS name standing for the workload when it has no address.
    pub hostname: String,
    pub cluster_id: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// What kind of controller runs it, as the workload API names it (`deployment`, `cronjob`,
    /// `pod`, `job`); empty is the API's default, `deployment`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workload_type: String,
    #[serde(skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub status: HealthStatus,
    /// Names (`ns/name`) of policies that select this workload explicitly, as ztunnel's local
    /// config lists them.
    pub authorization_policies: Vec<String>,
    /// The waypoint traffic to this workload must pass through.
    pub waypoint: Option<GatewayAddress>,
    /// The gateway through which this workload is reached from other networks.
    pub network_gateway: Option<GatewayAddress>,
    /// Set for workloads this weft captures.
    pub netns: Option<Netns>,
    /// The pod's own say on DNS capture (Istio's `ambient.istio.io/dns-capture` annotation);
    /// None leaves it to the node's setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_capture: Option<bool>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// A workload as its HBONE baggage describes it, on `network`: what the destination knows
    /// of a source that reached it through a gateway (and so cannot be looked up by address).
    /// For metrics and logs only; it proves nothing.
    pub fn described_by(b: &crate::hbone::wire::Baggage<'_>, network: &str) -> Workload {
        Workload {
            namespace: b.namespace.to_owned(),
            network: network.to_owned(),
            cluster_id: b.cluster.to_owned(),
            canonical_name: b.service.to_owned(),
            canonical_revision: b.version.to_owned(),
            workload_name: b.workload.to_owned(),
            workload_type: b.workload_type.to_owned(),
            locality: Locality {
                region: b.region.to_owned(),
                zone: b.zone.to_owned(),
            },
            ..Workload::default()
        }
    }

    /// The `app` of Istio's metrics labels: canonical name, else the workload name.
    pub fn app(&self) -> &str {
        if !self.canonical_name.is_empty() {
            &self.canonical_name
        } else {
            self.workload_name_or_name()
        }
    }

    pub fn workload_name_or_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    pub fn is_captured(&self) -> bool {
        self.netns.is_some()
    }

    /// The W3C baggage HBONE requests carry about this workload as their source.
    pub fn baggage(&self) -> crate::hbone::wire::Baggage<'_> {
        crate::hbone::wire::Baggage {
            cluster: &self.cluster_id,
            namespace: &self.namespace,
            workload_type: if self.workload_type.is_empty() {
                "deployment"
            } else {
                &self.workload_type
            },
            workload: &self.workload_name,
            service: &self.canonical_name,
            version: &self.canonical_revision,
            region: &self.locality.region,
            zone: &self.locality.zone,
        }
    }
}
