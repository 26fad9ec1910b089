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
    /// The DNS proxy (UDP and TCP, on the pod's loopback, where the capture redirects DNS).
    pub dns: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Ports {
    /// Whether `port` is one of weft's in-pod listeners: never the destination of a proxied
    /// connection, since forwarding there would loop. The one own-port guard.
    pub fn is_own(&self, port: u16) -> bool {
        [self.outbound, self.inbound_plaintext, self.hbone, self.dns].contains(&port)
    }
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
            dns: 15053,
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
    /// An unused pooled connection is closed after this long: the first unused one of each
    /// destination, kept warm for the next connection.
    pub pool_idle_timeout: Duration,
    /// The other unused pooled connections of a destination (those a peak opened) are closed
    /// after this long, and with them the HTTP/2 and TLS state they grew to.
    pub pool_spare_idle_timeout: Duration,
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
            pool_spare_idle_timeout: Duration::from_secs(5),
        }
    }
}

/// What one peer, one pod or the whole process may hold at once. Each limit has a flag, a
/// `weft_limit_reached_total{limit}` series and a log line naming who reached it; the defaults
/// are at least as strict as ztunnel's where it has one.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Concurrent CONNECT streams on one HBONE connection, advertised in SETTINGS (ztunnel: 200).
    pub streams_per_connection: u32,
    /// Largest request header list an HBONE peer may send, advertised in SETTINGS; larger
    /// requests are answered 431 by the HTTP/2 layer (ztunnel: 64 KiB).
    pub header_list_bytes: u32,
    /// Bytes one stream may queue in HTTP/2 waiting for its connection's socket. A peer that
    /// grants window but does not read can hold at most this per stream, so at most
    /// `streams_per_connection` times this per connection.
    pub stream_send_buffer: usize,
    /// Bytes read from apps and not yet written to TLS, per HBONE connection and in total: when
    /// a budget is full, the relays stop reading from apps until HTTP/2 has written what is
    /// queued. Bounds what peers that grant window but do not read can make weft hold.
    pub buffered_bytes_per_connection: usize,
    pub buffered_bytes: usize,
    /// HBONE connections held at once, in total and from one peer address.
    pub connections: usize,
    pub connections_per_peer: usize,
    /// An HBONE connection that carries no stream for this long is closed (GOAWAY).
    pub idle_connection: Duration,
    /// Upstream connects (to an app, or a destination outside the mesh) in progress at once,
    /// per pod and in total.
    pub pending_connects_per_pod: usize,
    pub pending_connects: usize,
    /// Bound on every connect weft makes (to apps, to tunnel peers, to destinations outside
    /// the mesh) and on each TLS + HTTP/2 handshake.
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            streams_per_connection: 200,
            header_list_bytes: 64 * 1024,
            stream_send_buffer: 400 * 1024,
            buffered_bytes_per_connection: 16 * 1024 * 1024,
            buffered_bytes: 256 * 1024 * 1024,
            connections: 8192,
            connections_per_peer: 512,
            idle_connection: Duration::from_secs(120),
            pending_connects_per_pod: 256,
            pending_connects: 4096,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The DNS proxy in every captured pod: answers for the mesh's hostnames from weft's state,
/// forwards the rest to the pod's own resolvers.
#[derive(Clone, Debug)]
pub struct Dns {
    /// Serve DNS in captured pods, and (standalone) redirect their DNS to it. Istio's default:
    /// on (ztunnel's proxy metadata `DNS_CAPTURE`, istio-cni's `ambient.dnsCapture`).
    pub enabled: bool,
    /// A forwarded query not answered within this gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// Forwarded queries in flight at once, per pod and in total; over it, SERVFAIL at once
    /// (answers from weft's state are never limited: they cost no upstream).
    pub pending_per_pod: usize,
    pub pending: usize,
    /// weft's own resolvers: for the hostnames of endpoints known only by name (ServiceEntries
    /// with `resolution: DNS`), and for a pod whose own `resolv.conf` cannot be found (no
    /// process of the pod is visible), as ztunnel does.
    pub own_resolv_conf: PathBuf,
    /// The cluster's DNS suffix (`cluster.local`): short service names are expanded with it.
    pub domain_suffix: String,
}

impl Dns {
    /// Whether a pod's DNS is captured: its own choice (`ambient.istio.io/dns-capture`) when
    /// it made one, else the node's. The one place that decides.
    pub fn captures(&self, pod_choice: Option<bool>) -> bool {
        pod_choice.unwrap_or(self.enabled)
    }
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            enabled: true,
            upstream_timeout: Duration::from_secs(5),
            pending_per_pod: 100,
            pending: 2000,
            own_resolv_conf: PathBuf::from("/etc/resolv.conf"),
            domain_suffix: "cluster.local".into(),
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
    pub limits: Limits,
    /// Address the node-level servers (metrics, readiness) bind; admin is always loopback.
    pub node_bind: IpAddr,
    /// Connect to apps with the client's own source IP (needs IP_TRANSPARENT / CAP_NET_ADMIN).
    pub preserve_source_ip: bool,
    /// Share inner tunnels of double HBONE between connections with the same source,
    /// destination identities, gateway and service (a second connection costs no handshake,
    /// but all of them reach the endpoint the gateway picked for the first). Off: one inner
    /// connection per client connection, each balanced by the gateway, as ztunnel does.
    pub pool_cross_network: bool,
    /// The network of this node (ztunnel's `NETWORK`). When set, it is the origin network
    /// weft names on the inner request of double HBONE, and the network an arriving request
    /// must name to count as not coming through a gateway. Unset: each pod's own network.
    pub network: Option<String>,
    /// How long the metric series of a workload that is gone stay exported.
    pub metrics_retention: Duration,
    pub dns: Dns,
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
            limits: Limits::default(),
            node_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            preserve_source_ip: true,
            pool_cross_network: true,
            network: None,
            metrics_retention: Duration::from_secs(300),
            dns: Dns::default(),
        }
    }
}

/// ztunnel's environment variables that weft understands, and the `WEFT_*` variable (the
/// flag's own) each stands for. Istio's chart sets the former; applied before the command line
/// is read, and only where the `WEFT_*` variable is unset, so a flag beats `WEFT_*` beats the
/// Istio name. This table is the one place that says so (the README shows it).
pub const ISTIO_ENV: &[(&str, &str)] = &[
    ("XDS_ADDRESS", "WEFT_XDS_ADDRESS"),
    ("CA_ADDRESS", "WEFT_CA_ADDRESS"),
    ("XDS_ROOT_CA", "WEFT_XDS_ROOT_CA"),
    ("CA_ROOT_CA", "WEFT_CA_ROOT_CA"),
    ("ALT_XDS_HOSTNAME", "WEFT_XDS_SERVER_NAME"),
    ("ALT_CA_HOSTNAME", "WEFT_CA_SERVER_NAME"),
    ("AUTH_TOKEN", "WEFT_TOKEN_FILE"),
    ("CLUSTER_ID", "WEFT_CLUSTER_ID"),
    ("ISTIO_META_CLUSTER_ID", "WEFT_CLUSTER_ID"),
    ("TRUST_DOMAIN", "WEFT_TRUST_DOMAIN"),
    ("CLUSTER_DOMAIN", "WEFT_DOMAIN_SUFFIX"),
    ("POD_NAME", "WEFT_POD_NAME"),
    ("POD_NAMESPACE", "WEFT_POD_NAMESPACE"),
    ("INSTANCE_IP", "WEFT_INSTANCE_IP"),
    ("SERVICE_ACCOUNT", "WEFT_SERVICE_ACCOUNT"),
    ("PACKET_MARK", "WEFT_MARK"),
    ("ZTUNNEL_WORKER_THREADS", "WEFT_WORKER_THREADS"),
    ("TERMINATION_GRACE_PERIOD_SECONDS", "WEFT_DRAIN_SECONDS"),
    ("LOG_FORMAT", "WEFT_LOG_FORMAT"),
    ("INPOD_UDS", "WEFT_ZDS_SOCKET"),
    ("NETWORK", "WEFT_NETWORK"),
];

impl Settings {
    /// The network a pod on this node speaks for: the node's, when set, else the pod's own.
    pub fn local_network<'a>(&'a self, pod_network: &'a str) -> &'a str {
        self.network.as_deref().unwrap_or(pod_network)
    }
}

/// Prefix of the variables whose rest is sent to istiod as node metadata, as ztunnel does.
pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";
