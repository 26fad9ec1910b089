//! Shared test harness: a CA, unique loopback addresses, weft nodes in-process, an echo server,
//! and a log capture for access-log assertions.
#![allow(dead_code)]

pub mod apiserver;
pub mod dns;
pub mod fake_xds;
pub mod hbone_hop;
pub mod istio;
pub mod istio_cni;
pub mod lab;
pub mod raw_hbone;
pub mod weft_process;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use weft::config::Settings;
use weft::identity::CertificateAuthority;
use weft::node::{Node, Sources};
use weft::proxy::{DestinationMode, ListenerSet, LocalSockets, WorkloadProxy};

/// A /24 on loopback nobody else in this test process uses: 127.<pid-derived>.<n>.0/24.
pub fn unique_subnet() -> [u8; 3] {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    [127, (pid % 200 + 20) as u8, (n % 250) as u8]
}

pub fn ip(subnet: [u8; 3], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host))
}

/// Collects everything logged, so tests can look for their access-log lines.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// The last `n` lines, for a failing test to show what happened.
    pub fn tail(&self, n: usize) -> String {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Inbound access-log lines for connections to `dst` (`ip:port`) from `identity`.
    pub fn inbound_to_from(&self, dst: &str, identity: &str) -> usize {
        let (dst, src) = (
            format!("dst.addr={dst}"),
            format!("src.identity=\"{identity}\""),
        );
        self.lines_with("direction=\"inbound\"")
            .iter()
            .filter(|l| l.contains(&dst) && l.contains(&src))
            .count()
    }

    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

/// Installs (once per test binary) a global subscriber writing to a shared buffer.
pub fn logs() -> LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuffer::default();
        let writer = buf.clone();
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        // As weft's own: the log filter is the log's, the header-limit layer sees h2's events.
        let _ = tracing_subscriber::registry()
            .with(weft::hbone::header_limit::layer())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .with_filter(tracing_subscriber::EnvFilter::new("info,weft=debug")),
            )
            .try_init();
        buf
    })
    .clone()
}

/// A CA shared by the test binary, plus its directory.
pub fn ca_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        CertificateAuthority::init(d.path(), "cluster.local").unwrap();
        d
    })
    .path()
    .to_owned()
}

pub fn settings(node: &str) -> Settings {
    let mut s = Settings {
        node_name: node.to_string(),
        ca_dir: ca_dir(),
        ..Settings::default()
    };
    s.ports.admin = 0;
    s.ports.metrics = 0;
    s.ports.readiness = 0;
    s.node_bind = IpAddr::V4(Ipv4Addr::LOCALHOST);
    s
}

pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("weft.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// Replaces a file a running node watches, atomically: the new content goes to a temporary
/// file in the same directory, which is then renamed over `path`. A reader sees the old file or
/// the new one, never a truncated or half-written one (which `std::fs::write` would expose).
pub fn replace_file(path: &Path, contents: impl AsRef<[u8]>) {
    let dir = path.parent().expect("the file has a directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir).expect("temporary file");
    tmp.write_all(contents.as_ref())
        .expect("write the temporary file");
    tmp.persist(path).expect("rename over the watched file");
}

pub async fn start_node(node: &str, config: &Path) -> Node {
    start_node_with(settings(node), config).await
}

/// A node with the given settings (start from [`settings`]) and a config file.
pub async fn start_node_with(settings: Settings, config: &Path) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    logs();
    Node::start(
        settings,
        Sources {
            config_file: Some(config.to_owned()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("node starts")
}

/// An outbound listener for `uid` on `node` that sends every connection to `dest` (what the
/// capture rules do with `SO_ORIGINAL_DST`, made explicit for loopback tests).
pub fn forward(
    node: &Node,
    uid: &str,
    listen_ip: IpAddr,
    dest: SocketAddr,
) -> (WorkloadProxy, SocketAddr) {
    let snap = node.ctx.state.snapshot();
    let w = snap
        .workload_by_uid(uid)
        .expect("workload in config")
        .clone();
    let listen = ListenerSet {
        outbound: vec![SocketAddr::new(listen_ip, 0)],
        ..Default::default()
    };
    let p = WorkloadProxy::start(
        node.ctx.clone(),
        &w,
        Arc::new(LocalSockets { mark: None }),
        &listen,
        DestinationMode::Fixed(dest),
    )
    .expect("forward listener");
    let addr = p.bound.outbound[0];
    (p, addr)
}

/// An echo server: writes back everything, and half-closes when the client does. Reports the
/// peer address of each connection it accepts.
pub async fn echo_server(
    ip: IpAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            let _ = tx.send(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// Sends `data` and reads the echo concurrently; returns what came back.
pub async fn echo_roundtrip(addr: SocketAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut out))
        .await
        .expect("echo finished in time")
        .unwrap();
    writer.await.unwrap();
    out
}

/// Waits until `f` is true (bounded).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Two workloads on loopback, `client` (uid `{p}client`) on node a and `server` on node b.
pub fn two_workloads(subnet: [u8; 3]) -> String {
    format!(
        r#"
workloads:
- uid: client-uid
  name: client
  namespace: shop
  serviceAccount: client-sa
  workloadIps: ["{c}"]
  protocol: HBONE
  node: a
  netns: self
- uid: server-uid
  name: server
  namespace: shop
  serviceAccount: server-sa
  workloadIps: ["{s}"]
  protocol: HBONE
  node: b
  netns: self
"#,
        c = ip(subnet, 2),
        s = ip(subnet, 3)
    )
}

/// GETs a path from one of a node's HTTP endpoints; returns the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub async fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics").await
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until a scraped metric has the value `want` (bounded).
pub async fn eventually_metric(addr: SocketAddr, name: &str, labels: &[&str], want: f64) {
    for _ in 0..100 {
        if metric(&scrape(addr).await, name, labels) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{name}{labels:?} never reached {want}:\n{}",
        scrape(addr).await
    );
}
