//! Process-wide settings: ports, mark, trust and tuning. Built by the CLI (flags and `WEFT_*`
//! environment variables); every default is Istio's so a weft node and a ztunnel node agree.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// The ports weft listens on inside each captured pod, and on the node.
#[derive(Clone, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
            admin: 15000,
            metrics: 15020,
            readiness: 15021,
        }
    }
}

/// HTTP/2 tuning. Large windows are what let one tunnelled stream run at link speed.
#[derive(Clone, Debug)]
pub struct H2Tuning {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Most streams one pooled connection carries before another is opened.
    pub max_streams_per_connection: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// An unused pooled connection is closed after this long.
    pub pool_idle_timeout: Duration,
}

impl Default for H2Tuning {
    fn default() -> Self {
        H2Tuning {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_streams_per_connection: 100,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            pool_idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub ports: Ports,
    /// `SO_MARK` on every socket weft opens, so the capture rules never redirect weft itself.
    pub mark: u32,
    pub node_name: String,
    pub trust_domain: String,
    pub cluster_id: String,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
    pub ca_dir: PathBuf,
    pub cert_ttl: Duration,
    pub h2: H2Tuning,
    /// Address the node-level servers (metrics, readiness) bind; admin is always loopback.
    pub node_bind: IpAddr,
    /// Connect to apps with the client's own source IP (needs IP_TRANSPARENT / CAP_NET_ADMIN).
    pub preserve_source_ip: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ports: Ports::default(),
            mark: 0x539,
            node_name: String::new(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            root_namespace: "istio-system".into(),
            ca_dir: PathBuf::from("/etc/weft/ca"),
            cert_ttl: Duration::from_secs(24 * 3600),
            h2: H2Tuning::default(),
            node_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            preserve_source_ip: true,
        }
    }
}
