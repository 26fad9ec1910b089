//! Services: virtual IPs with a port map, load-balanced over workload endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::workload::{GatewayAddress, Workload};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub hostname: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// Serialized as `namespace/hostname`, so maps keyed by services stay JSON objects.
impl Serialize for ServiceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for ServiceKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => Ok(ServiceKey {
                namespace: ns.to_string(),
                hostname: host.to_string(),
            }),
            _ => Err(format!("{s:?} is not of the form <namespace>/<hostname>")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// service port → target port (0 or absent: same as the service port).
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities a client accepts from any endpoint of this service.
    pub subject_alt_names: Vec<String>,
    /// The waypoint traffic to this service's VIPs passes through.
    pub waypoint: Option<GatewayAddress>,
    /// A connection to a VIP goes to the address the client dialled, not to an endpoint (the
    /// control plane's PASSTHROUGH load balancing: a ServiceEntry with `resolution: NONE`).
    pub passthrough: bool,
    /// Who may resolve the service and send to its VIPs.
    pub visibility: Visibility,
}

/// The control plane's scoping of a service (istiod's `serviceEntryVisibility`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Visibility {
    /// Every client.
    #[default]
    Public,
    /// Clients in the service's own namespace only; to others it is as if it did not exist.
    Namespace,
}

impl Service {
    /// Whether a client in `namespace` may resolve this service and be routed by its VIPs.
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.visibility == Visibility::Public || self.namespace == namespace
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
        }
    }
}

/// One workload behind a service, with its own port map (which overrides the service's).
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    #[serde(serialize_with = "uid_only")]
    pub workload: Arc<Workload>,
    pub ports: BTreeMap<u16, u16>,
}

fn uid_only<S: serde::Serializer>(w: &Arc<Workload>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&w.uid)
}

impl Endpoint {
    /// The workload port for a service port: the endpoint's mapping, else the service's, else
    /// the same number.
    pub fn target_port(&self, service: &Service, port: u16) -> u16 {
        let mapped = |m: &BTreeMap<u16, u16>| m.get(&port).copied().filter(|p| *p != 0);
        mapped(&self.ports)
            .or_else(|| mapped(&service.ports))
            .unwrap_or(port)
    }
}
