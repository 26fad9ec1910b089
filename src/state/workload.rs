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
    pub cluster_id: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub labels: BTreeMap<String, String>,
    pub status: HealthStatus,
    /// Names (`ns/name`) of policies that select this workload explicitly, as ztunnel's local
    /// config lists them.
    pub authorization_policies: Vec<String>,
    /// Set for workloads this weft captures.
    pub netns: Option<Netns>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
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
}
