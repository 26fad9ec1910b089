//! The `weft` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter::Targets, reload};

use weft::admin::LogControl;
use weft::config::{Dns, Limits, Ports, Settings};
use weft::grpc::{GrpcTarget, TokenFile};
use weft::identity::istio_ca::{IstioCa, IstioCaSettings};
use weft::identity::{CertificateAuthority, CertificateSigner, Identity};
use weft::k8s::KubeSettings;
use weft::node::{Node, Sources};
use weft::xds::{NodeIdentity, XdsSettings};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Node-level L4 tunnel for ambient service meshes (HBONE, mTLS, L4 policy)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Run the node agent as Istio's ztunnel container does (`proxy ztunnel`, the arguments
    /// of Istio's chart): istiod is the control plane and CA unless told otherwise.
    Proxy {
        /// The proxy kind; only `ztunnel` is known.
        #[arg(value_parser = ["ztunnel"])]
        kind: String,
        #[command(flatten)]
        args: Box<RunArgs>,
    },
    /// Certificate authority tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// weft-cni, weft's chained CNI plugin, on this node: put it into the CNI configuration
    /// list, or take it out.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy weft-cni into the CNI binary directory and chain it into the node's configuration.
    Install(weft::cni::install::InstallOptions),
    /// Remove weft-cni's entry from the node's configuration, and its binary.
    Uninstall(weft::cni::install::InstallOptions),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new root CA (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Serve Istio's certificate protocol with the mesh's signing key: the one place that
    /// holds it. Callers are authenticated with TokenReview; node agents get certificates only
    /// for identities with a pod on their node.
    Serve(Box<CaServeArgs>),
}

#[derive(clap::Args)]
struct CaServeArgs {
    /// Directory holding ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.
    #[arg(long, env = "WEFT_CA_DIR", default_value = "/etc/weft/ca")]
    ca_dir: PathBuf,
    /// gRPC over TLS.
    #[arg(long, env = "WEFT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// /metrics and /healthz/ready.
    #[arg(long, env = "WEFT_CA_METRICS_LISTEN", default_value = "0.0.0.0:15014")]
    metrics_listen: std::net::SocketAddr,
    /// DNS names of the service's own certificate (issued from the CA at start).
    #[arg(
        long,
        env = "WEFT_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "weft-ca.weft-system.svc"
    )]
    server_names: Vec<String>,
    /// The Kubernetes API for TokenReview and pod lookups (in-cluster when absent).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The audience callers' tokens must be for.
    #[arg(long, env = "WEFT_CA_AUDIENCE", default_value = "istio-ca")]
    audience: String,
    /// Service accounts (namespace/name) of node agents, which may ask on pods' behalf.
    #[arg(
        long,
        env = "WEFT_CA_NODE_AGENTS",
        value_delimiter = ',',
        default_value = "weft-system/weft"
    )]
    node_agents: Vec<String>,
    /// Longest certificate lifetime issued, whatever is asked.
    #[arg(long, env = "WEFT_CA_MAX_TTL_SECONDS", default_value_t = 86400)]
    max_ttl_seconds: u64,
    /// Issuance rate per caller (certificates per second, and the burst above it).
    #[arg(long, env = "WEFT_CA_RATE_PER_SECOND", default_value_t = 10.0)]
    rate_per_second: f64,
    #[arg(long, env = "WEFT_CA_BURST", default_value_t = 100)]
    burst: u32,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
}

fn ca_serve(args: CaServeArgs) -> anyhow::Result<()> {
    let _log_control = init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let client = weft::k8s::client(&KubeSettings {
            kubeconfig: args.kubeconfig.clone(),
            domain_suffix: String::new(),
            auto_allocate_vips: true,
        })
        .await
        .context("connecting to the Kubernetes API")?;
        let api = Arc::new(weft::ca_service::authn::KubeApi { client });
        let settings = weft::ca_service::CaServiceSettings {
            ca_dir: args.ca_dir,
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            server_names: args.server_names,
            trust_domain: args.trust_domain,
            audience: args.audience,
            node_agents: args.node_agents,
            max_ttl: Duration::from_secs(args.max_ttl_seconds),
            rate_per_second: args.rate_per_second,
            burst: args.burst,
        };
        let _service = weft::ca_service::CaService::start(settings, api.clone(), api).await?;
        shutdown_signal().await;
        tracing::info!("shutting down");
        Ok(())
    })
}

#[derive(clap::Args)]
struct RunArgs {
    /// Local configuration file (ztunnel's local-config YAML shape), watched for changes.
    #[arg(long, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster service account, else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "WEFT_KUBERNETES")]
    kubernetes: bool,
    /// Watch the Kubernetes API through this kubeconfig (implies --kubernetes).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// In the Kubernetes-direct mode, give ServiceEntries that have no addresses (and none
    /// from istiod) addresses from 240.240.0.0/16 and 2001:2::/48, as istiod's
    /// PILOT_ENABLE_IP_AUTOALLOCATE does; one opts out with the label
    /// networking.istio.io/enable-autoallocate-ip: "false".
    #[arg(long, env = "WEFT_SERVICE_ENTRY_AUTO_ALLOCATE", default_value_t = true, action = clap::ArgAction::Set)]
    service_entry_auto_allocate: bool,
    /// istiod's xDS address (`host:port` or `https://host:port`): configuration comes from istiod.
    #[arg(long, env = "WEFT_XDS_ADDRESS")]
    xds_address: Option<String>,
    /// Root certificate(s) istiod's xDS certificate must chain to; also the mesh roots.
    #[arg(
        long,
        env = "WEFT_XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    xds_root_ca: PathBuf,
    /// The name istiod's certificate must carry, when the address's host is not it.
    #[arg(long, env = "WEFT_XDS_SERVER_NAME")]
    xds_server_name: Option<String>,
    /// Istio CA address (default: the xDS address). With neither, the built-in CA signs.
    #[arg(long, env = "WEFT_CA_ADDRESS")]
    ca_address: Option<String>,
    #[arg(
        long,
        env = "WEFT_CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    ca_root_ca: PathBuf,
    #[arg(long, env = "WEFT_CA_SERVER_NAME")]
    ca_server_name: Option<String>,
    /// The node agent's projected service-account token (audience istio-ca), sent to istiod.
    #[arg(
        long,
        env = "WEFT_TOKEN_FILE",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    token_file: PathBuf,
    /// weft's own pod: name, namespace, IP and service account (istiod's node id and the
    /// identity weft asks certificates on behalf of others as).
    #[arg(long, env = "WEFT_POD_NAME", default_value = "")]
    pod_name: String,
    #[arg(long, env = "WEFT_POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    #[arg(long, env = "WEFT_INSTANCE_IP", default_value = "")]
    instance_ip: String,
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", default_value = "ztunnel")]
    service_account: String,
    /// Take pods from istio-cni's node agent over ZDS at this Unix socket (ztunnel's
    /// INPOD_UDS). The agent installs the redirection; weft only opens its listeners in the
    /// namespaces it is handed, and looks for none itself.
    #[arg(long, env = "WEFT_ZDS_SOCKET")]
    zds_socket: Option<PathBuf>,
    /// Serve weft's own CNI plugin (weft-cni) on this Unix socket: a pod is captured before
    /// it starts, in the namespace the container runtime names.
    #[arg(long, env = "WEFT_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// Where weft remembers the pods weft-cni handed it, so a restarted weft serves them again.
    #[arg(long, env = "WEFT_CNI_STATE_DIR", default_value = "/var/run/weft/pods")]
    cni_state_dir: PathBuf,
    /// DNS suffix of Kubernetes service hostnames.
    #[arg(long, env = "WEFT_DOMAIN_SUFFIX", default_value = "cluster.local")]
    domain_suffix: String,
    /// Directory holding ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.
    #[arg(long, env = "WEFT_CA_DIR", default_value = "/etc/weft/ca")]
    ca_dir: PathBuf,
    /// This node's name; workloads on other nodes are never captured here.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "WEFT_CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, env = "WEFT_ROOT_NAMESPACE", default_value = "istio-system")]
    root_namespace: String,
    /// SO_MARK on weft's own sockets (hex with 0x, or decimal).
    #[arg(long, env = "WEFT_MARK", default_value_t = Settings::default().mark, value_parser = parse_u32)]
    mark: u32,
    #[arg(long, env = "WEFT_OUTBOUND_PORT", default_value_t = Ports::default().outbound)]
    outbound_port: u16,
    #[arg(long, env = "WEFT_INBOUND_PLAINTEXT_PORT", default_value_t = Ports::default().inbound_plaintext)]
    inbound_plaintext_port: u16,
    #[arg(long, env = "WEFT_HBONE_PORT", default_value_t = Ports::default().hbone)]
    hbone_port: u16,
    #[arg(long, env = "WEFT_ADMIN_PORT", default_value_t = Ports::default().admin)]
    admin_port: u16,
    #[arg(long, env = "WEFT_METRICS_PORT", default_value_t = Ports::default().metrics)]
    metrics_port: u16,
    #[arg(long, env = "WEFT_READINESS_PORT", default_value_t = Ports::default().readiness)]
    readiness_port: u16,
    /// Address for the metrics and readiness listeners (admin is always 127.0.0.1).
    #[arg(long, env = "WEFT_NODE_BIND", default_value = "0.0.0.0")]
    node_bind: std::net::IpAddr,
    /// Workload certificate lifetime in seconds (renewed at half-life).
    #[arg(long, env = "WEFT_CERT_TTL_SECONDS", default_value_t = 86400)]
    cert_ttl_seconds: u64,
    /// Runtime worker threads (default: one per core).
    #[arg(long, env = "WEFT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Connections to apps keep the client's source IP (needs CAP_NET_ADMIN).
    #[arg(long, env = "WEFT_PRESERVE_SOURCE_IP", default_value_t = true, action = clap::ArgAction::Set)]
    preserve_source_ip: bool,
    /// Share the inner tunnels of cross-network (double HBONE) connections, as for any other
    /// tunnel; false makes one per connection, each balanced by the remote gateway.
    #[arg(long, env = "WEFT_POOL_CROSS_NETWORK", default_value_t = true, action = clap::ArgAction::Set)]
    pool_cross_network: bool,
    /// The network this node is on, in a multi-network mesh (ztunnel reads it as NETWORK).
    /// Unset or empty: each pod's own network, from its workload.
    #[arg(long, env = "WEFT_NETWORK")]
    network: Option<String>,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Seconds live connections get to finish on shutdown.
    #[arg(long, env = "WEFT_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    /// Seconds the metric series of a departed workload stay exported.
    #[arg(long, env = "WEFT_METRICS_RETENTION_SECONDS", default_value_t = 300)]
    metrics_retention_seconds: u64,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    dns: DnsArgs,
}

/// The DNS proxy of `weft::config::Dns`.
#[derive(clap::Args, Debug)]
struct DnsArgs {
    /// Serve DNS on port --dns-port in captured pods and (standalone) redirect their DNS there.
    /// ztunnel's proxy metadata DNS_CAPTURE (ISTIO_META_DNS_CAPTURE) says the same.
    #[arg(long, env = "WEFT_DNS_CAPTURE", default_value_t = Dns::default().enabled, action = clap::ArgAction::Set)]
    dns_capture: bool,
    #[arg(long, env = "WEFT_DNS_PORT", default_value_t = Ports::default().dns)]
    dns_port: u16,
    /// Milliseconds a forwarded query may take before the client gets SERVFAIL.
    #[arg(long, env = "WEFT_DNS_UPSTREAM_TIMEOUT_MS", default_value_t = Dns::default().upstream_timeout.as_millis() as u64)]
    dns_upstream_timeout_ms: u64,
    /// Forwarded DNS queries in flight per pod; more get SERVFAIL at once.
    #[arg(long, env = "WEFT_DNS_MAX_PENDING_PER_POD", default_value_t = Dns::default().pending_per_pod)]
    dns_max_pending_per_pod: usize,
    /// Forwarded DNS queries in flight in total.
    #[arg(long, env = "WEFT_DNS_MAX_PENDING", default_value_t = Dns::default().pending)]
    dns_max_pending: usize,
    /// weft's own resolvers: for endpoints known only by a hostname (ServiceEntries with
    /// `resolution: DNS`) and for pods whose resolv.conf cannot be found.
    #[arg(long, env = "WEFT_DNS_RESOLV_CONF", default_value_os_t = Dns::default().own_resolv_conf)]
    dns_resolv_conf: PathBuf,
}

/// The limits of `weft::config::Limits`, one flag each (defaults from there).
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// Concurrent CONNECT streams per HBONE connection (advertised in SETTINGS).
    #[arg(long, env = "WEFT_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::default().streams_per_connection)]
    max_streams_per_connection: u32,
    /// Largest request header list an HBONE peer may send, in bytes.
    #[arg(long, env = "WEFT_MAX_HEADER_LIST_BYTES", default_value_t = Limits::default().header_list_bytes)]
    max_header_list_bytes: u32,
    /// Bytes one stream may queue towards a peer that is not reading.
    #[arg(long, env = "WEFT_STREAM_SEND_BUFFER_BYTES", default_value_t = Limits::default().stream_send_buffer)]
    stream_send_buffer_bytes: usize,
    /// Bytes read from apps and not yet written to TLS, per HBONE connection.
    #[arg(long, env = "WEFT_MAX_BUFFERED_BYTES_PER_CONNECTION", default_value_t = Limits::default().buffered_bytes_per_connection)]
    max_buffered_bytes_per_connection: usize,
    /// Bytes read from apps and not yet written to TLS, in total.
    #[arg(long, env = "WEFT_MAX_BUFFERED_BYTES", default_value_t = Limits::default().buffered_bytes)]
    max_buffered_bytes: usize,
    /// HBONE connections held at once.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = Limits::default().connections)]
    max_connections: usize,
    /// HBONE connections held at once from one peer address.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_PEER", default_value_t = Limits::default().connections_per_peer)]
    max_connections_per_peer: usize,
    /// Seconds an HBONE connection without streams stays open.
    #[arg(long, env = "WEFT_IDLE_CONNECTION_SECONDS", default_value_t = Limits::default().idle_connection.as_secs())]
    idle_connection_seconds: u64,
    /// Upstream connects in progress at once for one pod.
    #[arg(long, env = "WEFT_MAX_PENDING_CONNECTS_PER_POD", default_value_t = Limits::default().pending_connects_per_pod)]
    max_pending_connects_per_pod: usize,
    /// Upstream connects in progress at once in total.
    #[arg(long, env = "WEFT_MAX_PENDING_CONNECTS", default_value_t = Limits::default().pending_connects)]
    max_pending_connects: usize,
    /// Seconds any connect may take.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT_SECONDS", default_value_t = Limits::default().connect_timeout.as_secs())]
    connect_timeout_seconds: u64,
    /// Seconds a TLS + HTTP/2 handshake may take.
    #[arg(long, env = "WEFT_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = Limits::default().handshake_timeout.as_secs())]
    handshake_timeout_seconds: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            streams_per_connection: self.max_streams_per_connection.max(1),
            header_list_bytes: self.max_header_list_bytes,
            stream_send_buffer: self.stream_send_buffer_bytes.max(16 * 1024),
            buffered_bytes_per_connection: self.max_buffered_bytes_per_connection.max(16 * 1024),
            buffered_bytes: self.max_buffered_bytes.max(16 * 1024),
            connections: self.max_connections,
            connections_per_peer: self.max_connections_per_peer,
            idle_connection: Duration::from_secs(self.idle_connection_seconds),
            pending_connects_per_pod: self.max_pending_connects_per_pod,
            pending_connects: self.max_pending_connects,
            connect_timeout: Duration::from_secs(self.connect_timeout_seconds.max(1)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_seconds.max(1)),
        }
    }
}

/// ztunnel reads DNS capture from its proxy metadata: `ISTIO_META_DNS_CAPTURE`, on unless
/// it says something other than "true".
fn istio_dns_capture() -> bool {
    std::env::var(format!("{}DNS_CAPTURE", weft::config::ISTIO_META_PREFIX))
        .map_or(true, |v| v.eq_ignore_ascii_case("true"))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

impl RunArgs {
    fn sources(&self) -> anyhow::Result<Sources> {
        let kubernetes = (self.kubernetes || self.kubeconfig.is_some()).then(|| KubeSettings {
            kubeconfig: self.kubeconfig.clone(),
            auto_allocate_vips: self.service_entry_auto_allocate,
            domain_suffix: self.domain_suffix.clone(),
        });
        let xds = self.xds_address.as_ref().map(|address| XdsSettings {
            target: GrpcTarget {
                address: address.clone(),
                root_cert: self.xds_root_ca.clone(),
                server_name: self.xds_server_name.clone(),
            },
            token: self.token(),
            node: self.node_identity(),
            defaults: weft::xds::translate::Defaults {
                trust_domain: self.trust_domain.clone(),
                cluster_id: self.cluster_id.clone(),
            },
            node_name: self.node_name.clone(),
            find_netns: self.zds_socket.is_none(),
        });
        if self.config.is_none() && kubernetes.is_none() && xds.is_none() {
            anyhow::bail!(
                "nothing to do: give --xds-address ADDR (XDS_ADDRESS), --config FILE, --kubernetes or --kubeconfig FILE (or several)"
            );
        }
        Ok(Sources {
            config_file: self.config.clone(),
            kubernetes,
            xds,
            zds: self.zds_socket.clone(),
            cni: self
                .cni_socket
                .clone()
                .map(|socket| weft::cni::CniServerSettings {
                    socket,
                    state_dir: self.cni_state_dir.clone(),
                }),
        })
    }

    /// The token file, if it exists (as ztunnel: no file, no credential).
    fn token(&self) -> Option<TokenFile> {
        self.token_file.exists().then(|| TokenFile {
            path: self.token_file.clone(),
        })
    }

    fn node_identity(&self) -> NodeIdentity {
        let prefix = weft::config::ISTIO_META_PREFIX;
        NodeIdentity {
            pod_name: self.pod_name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            pod_ip: self.instance_ip.clone(),
            node_name: self.node_name.clone(),
            cluster_id: self.cluster_id.clone(),
            metadata: std::env::vars()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v)))
                .collect(),
        }
    }

    /// The signer: istiod's CA (or another speaking its protocol) when an address is known,
    /// else the built-in CA of `--ca-dir` (chosen by the node).
    fn signer(&self) -> anyhow::Result<Option<Arc<dyn CertificateSigner>>> {
        let Some(address) = self.ca_address.clone().or_else(|| self.xds_address.clone()) else {
            return Ok(None);
        };
        let own = Identity::new(
            &self.trust_domain,
            &self.pod_namespace,
            &self.service_account,
        );
        let ca = IstioCa::new(IstioCaSettings {
            target: GrpcTarget {
                address,
                root_cert: self.ca_root_ca.clone(),
                server_name: self.ca_server_name.clone(),
            },
            token: self.token(),
            cluster_id: self.cluster_id.clone(),
            node_identity: Some(own),
            trust_domain: self.trust_domain.clone(),
        })
        .context("setting up the Istio CA client")?;
        Ok(Some(Arc::new(ca)))
    }

    fn settings(&self) -> Settings {
        let mut s = Settings {
            mark: self.mark,
            node_name: self.node_name.clone(),
            trust_domain: self.trust_domain.clone(),
            cluster_id: self.cluster_id.clone(),
            root_namespace: self.root_namespace.clone(),
            ca_dir: self.ca_dir.clone(),
            cert_ttl: Duration::from_secs(self.cert_ttl_seconds),
            node_bind: self.node_bind,
            preserve_source_ip: self.preserve_source_ip,
            pool_cross_network: self.pool_cross_network,
            network: self.network.clone().filter(|n| !n.is_empty()),
            limits: self.limits.limits(),
            metrics_retention: Duration::from_secs(self.metrics_retention_seconds),
            dns: Dns {
                enabled: self.dns.dns_capture && istio_dns_capture(),
                upstream_timeout: Duration::from_millis(self.dns.dns_upstream_timeout_ms),
                pending_per_pod: self.dns.dns_max_pending_per_pod,
                pending: self.dns.dns_max_pending,
                own_resolv_conf: self.dns.dns_resolv_conf.clone(),
                domain_suffix: self.domain_suffix.clone(),
            },
            ..Settings::default()
        };
        s.ports.dns = self.dns.dns_port;
        s.ports.outbound = self.outbound_port;
        s.ports.inbound_plaintext = self.inbound_plaintext_port;
        s.ports.hbone = self.hbone_port;
        s.ports.admin = self.admin_port;
        s.ports.metrics = self.metrics_port;
        s.ports.readiness = self.readiness_port;
        s
    }
}

/// Logging to stderr with a filter that /logging can change at run time.
fn init_logging(format: LogFormat) -> LogControl {
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let (filter, rejected) = match std::env::var("RUST_LOG").map(|spec| log_filter(&spec)) {
        Ok(Ok(f)) => (f, None),
        Ok(Err(e)) => (default(), Some(e)),
        Err(_) => (default(), None),
    };
    let (filter, handle) = reload::Layer::new(filter);
    // The filter is the log's alone: the header-limit layer sees h2's events whatever it says.
    let registry = tracing_subscriber::registry().with(weft::hbone::header_limit::layer());
    match format {
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init(),
    }
    if let Some(e) = rejected {
        tracing::warn!("RUST_LOG ignored, logging at info: {e}");
    }
    Arc::new(move |spec: &str| handle.reload(log_filter(spec)?).map_err(|e| e.to_string()))
}

/// A log filter: a level, `target=level` pairs, or both, comma-separated (`info,weft::hbone=debug`).
/// Targets and levels only: the span and field directives of tracing's `EnvFilter` compile
/// regular expressions, code that an idle weft would otherwise keep mapped for nothing.
fn log_filter(spec: &str) -> Result<Targets, String> {
    spec.parse::<Targets>()
        .map_err(|e| format!("bad filter {spec:?}: {e}"))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let log_control = init_logging(args.log_format);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the runtime")?;
    rt.block_on(async move {
        let settings = args.settings();
        let node =
            Node::start(settings, args.sources()?, args.signer()?, Some(log_control)).await?;
        shutdown_signal().await;
        tracing::info!(drain_seconds = args.drain_seconds, "shutting down");
        node.shutdown(Duration::from_secs(args.drain_seconds)).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Takes ztunnel's environment names where the `WEFT_*` one is unset (see `ISTIO_ENV`).
fn adopt_istio_environment() {
    for (istio, weft) in weft::config::ISTIO_ENV {
        if std::env::var_os(weft).is_none() {
            if let Some(v) = std::env::var_os(istio) {
                // Single-threaded still: no other thread reads the environment yet.
                std::env::set_var(weft, v);
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    weft::allocator::tune();
    adopt_istio_environment();
    let cli = Cli::parse();
    // kube and rcgen may pull in ring too; pick aws-lc-rs explicitly so rustls never has to guess.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Proxy { kind: _, mut args } => {
            // ztunnel's default control plane: istiod of the cluster.
            if args.xds_address.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
                args.xds_address = Some("istiod.istio-system.svc:15012".into());
            }
            // ztunnel's default capture hand-off: istio-cni over ZDS (INPOD_ENABLED).
            if args.zds_socket.is_none() && std::env::var("INPOD_ENABLED").as_deref() != Ok("false")
            {
                args.zds_socket = Some(weft::zds::DEFAULT_SOCKET.into());
            }
            run(*args)
        }
        Command::Ca {
            command: CaCommand::Serve(args),
        } => ca_serve(*args),
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            CertificateAuthority::init(&dir, &trust_domain)?;
            println!("created a root CA in {}", dir.display());
            Ok(())
        }
        Command::Cni {
            command: CniCommand::Install(opts),
        } => {
            println!("{}", weft::cni::install::install(&opts)?);
            Ok(())
        }
        Command::Cni {
            command: CniCommand::Uninstall(opts),
        } => {
            weft::cni::install::uninstall(&opts)?;
            println!("weft-cni removed from {}", opts.cni_conf_dir.display());
            Ok(())
        }
        Command::Version => {
            // The revision: build.rs (git HEAD, or WEFT_GIT_REVISION for an exported tree).
            println!(
                "weft {} (git {})",
                env!("CARGO_PKG_VERSION"),
                env!("WEFT_GIT_REVISION")
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn log_filter_takes_a_level_and_target_pairs_and_names_a_bad_one() {
        let f = log_filter("info,weft::hbone=debug").expect("valid filter");
        assert!(f.would_enable("weft::hbone::server", &Level::DEBUG));
        assert!(!f.would_enable("weft::proxy", &Level::DEBUG));
        assert!(f.would_enable("access", &Level::INFO));
        let e = log_filter("weft=loud").expect_err("not a level");
        assert!(e.contains("weft=loud"), "{e}");
    }
}
