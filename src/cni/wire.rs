//! What weft-cni and weft say to each other on weft's CNI socket: one JSON request, one JSON
//! reply, then the connection closes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Largest request weft reads.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CaptureCommand {
    Add,
    Del,
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureRequest {
    pub command: CaptureCommand,
    pub container_id: String,
    /// The pod's network namespace path (`CNI_NETNS`); DEL may come without one.
    #[serde(default)]
    pub netns: Option<String>,
    pub pod_namespace: String,
    pub pod_name: String,
    /// `K8S_POD_UID` when the runtime passes it.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// The pod's addresses from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl CaptureRequest {
    /// The name weft knows the pod by in the hand-off: its UID, else the sandbox's ID.
    pub fn pod_key(&self) -> &str {
        self.pod_uid
            .as_deref()
            .filter(|u| !u.is_empty())
            .unwrap_or(&self.container_id)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureReply {
    /// Whether the pod is (now) captured; false for a pod that is not in the mesh.
    pub captured: bool,
    /// Why weft refused; the plugin fails with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
