//! istiod as a configuration source: delta ADS over gRPC, as ztunnel speaks it.
//!
//! weft asks for the two resource types istiod serves a node proxy:
//! `istio.workload.Address` (workloads and services) and `istio.security.Authorization`
//! (L4 policies). istiod picks what to serve from the node id and metadata, so weft introduces
//! itself the way ztunnel does (see [`NodeIdentity`]).
//!
//! - [`client`]: the stream: connect, subscribe, ACK/NACK, reconnect with what weft holds.
//! - [`translate`]: resources → state types, one refusal per bad resource.

pub mod client;
pub mod translate;

use std::collections::BTreeMap;

use crate::grpc::{GrpcTarget, TokenFile};

/// The name this source has in the state store.
pub const SOURCE: &str = "xds";
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// Who weft says it is to istiod. The id has ztunnel's shape
/// (`ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`): istiod serves the workload
/// API to proxies of type `ztunnel`, and a weft in ztunnel's place must get exactly that.
#[derive(Clone, Debug, Default)]
pub struct NodeIdentity {
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_ip: String,
    pub node_name: String,
    pub cluster_id: String,
    /// `ISTIO_META_*` variables (prefix removed) and other metadata, sent as they are.
    pub metadata: BTreeMap<String, String>,
}

impl NodeIdentity {
    pub fn node_id(&self) -> String {
        let ns = &self.pod_namespace;
        format!(
            "ztunnel~{}~{}.{ns}~{ns}.svc.cluster.local",
            self.pod_ip, self.pod_name
        )
    }
}

/// Everything the xDS client needs.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    pub target: GrpcTarget,
    /// The node agent's service-account token (audience `istio-ca`); None sends no credential.
    pub token: Option<TokenFile>,
    pub node: NodeIdentity,
    /// Defaults for fields istiod leaves empty.
    pub defaults: translate::Defaults,
    /// Workloads of this node that speak HBONE are captured by this weft.
    pub node_name: String,
    /// Look for local pods' network namespaces in `/proc`. Off when the CNI layer (istio-cni
    /// over ZDS) hands them over: then a pod is captured only once it is handed.
    pub find_netns: bool,
}
