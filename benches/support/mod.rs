//! What the in-process benchmarks share: two weft nodes on loopback with their own CA, an app
//! server that speaks the three small benchmark protocols, and the client side of each
//! measurement.
//!
//! The app protocol: the first byte a client sends picks what the server does.
//! - `S` (sink): the server reads to EOF, then answers the byte count (u64, big-endian) and
//!   closes. The client knows every byte arrived when the count comes back.
//! - `E` (echo): everything is written back; the server half-closes after the client does.
//! - `R` (request/reply): a u16 length and that many bytes; the server writes them back and
//!   closes first, so TIME_WAIT lands on the server side and a long connection-rate run does not
//!   run out of client ports.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use weft::config::{H2Tuning, Settings};
use weft::hbone::client::{handshake, open_stream};
use weft::hbone::wire::ConnectRequest;
use weft::identity::{CertificateAuthority, Identity};
use weft::node::{Node, Sources};
use weft::proxy::{DestinationMode, ListenerSet, LocalSockets, WorkloadProxy};

pub const SINK: u8 = b'S';
pub const ECHO: u8 = b'E';
pub const REQUEST: u8 = b'R';

/// How the client reaches the app server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Straight to the server socket: the floor every other figure is compared with.
    Direct,
    /// Through weft's outbound listener to an address outside the mesh: weft's plain TCP relay.
    Relay,
    /// Outbound → HBONE (mTLS + HTTP/2 CONNECT) → inbound → app.
    Hbone,
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Direct, Via::Relay, Via::Hbone];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Relay => "relay",
            Via::Hbone => "hbone",
        }
    }
}

/// A `/24` on loopback of our own: 127.230-249.x.0. The integration tests use 127.20-219, so a
/// benchmark never collides with a test run at the same time.
fn unique_subnet() -> [u8; 3] {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    [127, (230 + std::process::id() % 20) as u8, (n % 250) as u8]
}

fn ip(subnet: [u8; 3], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host))
}

/// Log like a production weft at `info` (the access log is formatted for every connection), but
/// throw the text away: the cost is in the figures, the disk is not.
pub fn quiet_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(std::io::sink)
        .try_init();
}

fn config_yaml(subnet: [u8; 3]) -> String {
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

/// Two weft nodes in this process, an app server in the mesh (HBONE) and one outside it
/// (plain relay), and an outbound listener towards each.
pub struct Lab {
    pub rt: Runtime,
    subnet: [u8; 3],
    pub a: Node,
    pub b: Node,
    /// App server on the mesh workload's address.
    pub mesh_app: SocketAddr,
    /// App server on an address weft does not know: reached by plain passthrough.
    pub plain_app: SocketAddr,
    /// Outbound listener of node a forwarding to `mesh_app` (HBONE).
    pub hbone_entry: SocketAddr,
    /// Outbound listener of node a forwarding to `plain_app` (TCP relay).
    pub relay_entry: SocketAddr,
    _forwards: Vec<WorkloadProxy>,
    /// Keeps one pooled tunnel connection open for the whole run.
    _keeper: TcpStream,
    _dir: tempfile::TempDir,
}

impl Lab {
    pub fn start() -> anyhow::Result<Lab> {
        // As the weft binary does, before any thread starts.
        weft::allocator::tune();
        quiet_logging();
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let dir = tempfile::tempdir().context("temporary directory")?;
        let ca = dir.path().join("ca");
        CertificateAuthority::init(&ca, "cluster.local").context("creating a CA")?;
        let subnet = unique_subnet();
        let cfg = dir.path().join("weft.yaml");
        std::fs::write(&cfg, config_yaml(subnet)).context("writing the config")?;

        let (a, b, mesh_app, plain_app, forwards, keeper) = rt.block_on(async {
            let a = start_node("a", &ca, &cfg).await?;
            let b = start_node("b", &ca, &cfg).await?;
            let mesh_app = app_server(ip(subnet, 3)).await?;
            let plain_app = app_server(ip(subnet, 9)).await?;
            let hbone = forward(&a, "client-uid", ip(subnet, 2), mesh_app)?;
            let relay = forward(&a, "client-uid", ip(subnet, 2), plain_app)?;
            let keeper = Warm::connect(hbone.bound.outbound[0])
                .await?
                .round_trip_check()
                .await?;
            Ok::<_, anyhow::Error>((a, b, mesh_app, plain_app, vec![hbone, relay], keeper.stream))
        })?;
        Ok(Lab {
            rt,
            subnet,
            hbone_entry: forwards[0].bound.outbound[0],
            relay_entry: forwards[1].bound.outbound[0],
            a,
            b,
            mesh_app,
            plain_app,
            _forwards: forwards,
            _keeper: keeper,
            _dir: dir,
        })
    }

    /// Where a client connects for `path`.
    pub fn entry(&self, path: Via) -> SocketAddr {
        match path {
            Via::Direct => self.mesh_app,
            Via::Relay => self.relay_entry,
            Via::Hbone => self.hbone_entry,
        }
    }

    /// A client that opens a brand-new HBONE connection (TCP + TLS 1.3 mutual handshake +
    /// HTTP/2) for every tunnelled connection, to node b's HBONE port.
    pub fn fresh_tunnel_client(&self) -> anyhow::Result<FreshTunnel> {
        let td = "cluster.local";
        let tls = self.a.ctx.tls.client_config(
            Identity::new(td, "shop", "client-sa"),
            vec![Identity::new(td, "shop", "server-sa")],
        )?;
        Ok(FreshTunnel {
            tls,
            tuning: self.a.ctx.settings.h2.clone(),
            limits: self.a.ctx.settings.limits.clone(),
            buffers: self.a.ctx.send_buffers.clone(),
            hbone: SocketAddr::new(ip(self.subnet, 3), self.b.ctx.settings.ports.hbone),
            authority: self.mesh_app,
        })
    }
}

async fn start_node(name: &str, ca: &Path, cfg: &Path) -> anyhow::Result<Node> {
    let mut s = Settings {
        node_name: name.to_string(),
        ca_dir: ca.to_owned(),
        node_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..Settings::default()
    };
    s.ports.admin = 0;
    s.ports.metrics = 0;
    s.ports.readiness = 0;
    Node::start(
        s,
        Sources {
            config_file: Some(cfg.to_owned()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .with_context(|| format!("starting node {name}"))
}

/// An outbound listener that sends every connection to `dest`: what the capture rules and
/// `SO_ORIGINAL_DST` do in a pod, made explicit for loopback.
fn forward(
    node: &Node,
    uid: &str,
    listen_ip: IpAddr,
    dest: SocketAddr,
) -> anyhow::Result<WorkloadProxy> {
    let w = node
        .ctx
        .state
        .snapshot()
        .workload_by_uid(uid)
        .cloned()
        .with_context(|| format!("workload {uid} is not in the config"))?;
    let listen = ListenerSet {
        outbound: vec![SocketAddr::new(listen_ip, 0)],
        ..Default::default()
    };
    Ok(WorkloadProxy::start(
        node.ctx.clone(),
        &w,
        Arc::new(LocalSockets { mark: None }),
        &listen,
        DestinationMode::Fixed(dest),
    )?)
}

/// The benchmark app server (protocol in the module docs).
pub async fn app_server(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = serve_one(s).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    match s.read_u8().await? {
        SINK => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        ECHO => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        REQUEST => {
            let len = s.read_u16().await? as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await?;
            s.write_all(&body).await?;
            s.shutdown().await?;
            // Wait (briefly) for the client's FIN so the close is orderly, not a reset.
            let mut rest = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await;
            Ok(())
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown benchmark request {other:#x}"),
        )),
    }
}

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// Sends `total` bytes to a sink over `conns` parallel connections; returns when the server has
/// confirmed every byte.
pub async fn transfer(target: SocketAddr, total: u64, conns: u64) -> anyhow::Result<()> {
    let per = total / conns;
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(sink_one(target, per)))
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn sink_one(target: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    s.write_u8(SINK).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        s.write_all(&ZEROS[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let got = s.read_u64().await?;
    if got != bytes {
        bail!("sink received {got} bytes of {bytes}");
    }
    Ok(())
}

/// One open echo connection, for round trips on a warm path.
pub struct Warm {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Warm {
    pub async fn connect(target: SocketAddr) -> anyhow::Result<Warm> {
        let mut stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        stream.write_u8(ECHO).await?;
        Ok(Warm {
            stream,
            buf: vec![0u8; 1024],
        })
    }

    /// Writes 1 KiB and reads the 1 KiB echo.
    pub async fn round_trip(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&ZEROS[..1024]).await?;
        self.stream.read_exact(&mut self.buf).await?;
        Ok(())
    }

    async fn round_trip_check(mut self) -> anyhow::Result<Warm> {
        tokio::time::timeout(Duration::from_secs(10), self.round_trip())
            .await
            .context("first round trip timed out")??;
        Ok(self)
    }
}

/// The `R` request a connection-rate client sends: 64 bytes of payload.
pub fn small_request() -> Bytes {
    let mut v = vec![REQUEST, 0, 64];
    v.extend_from_slice(&[0x5a; 64]);
    Bytes::from(v)
}

/// One new TCP connection: request, reply, close.
pub async fn request_reply(target: SocketAddr, request: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    s.write_all(request).await?;
    let mut reply = Vec::with_capacity(64);
    s.read_to_end(&mut reply).await?;
    if reply.len() != request.len() - 3 {
        bail!(
            "reply of {} bytes, expected {}",
            reply.len(),
            request.len() - 3
        );
    }
    Ok(())
}

/// A client that pays for a complete HBONE connection setup on every tunnelled connection.
pub struct FreshTunnel {
    tls: Arc<ClientConfig>,
    tuning: H2Tuning,
    limits: weft::config::Limits,
    buffers: Arc<weft::proxy::buffers::SendBuffers>,
    hbone: SocketAddr,
    authority: SocketAddr,
}

impl FreshTunnel {
    /// TCP connect, TLS 1.3 mutual handshake, HTTP/2 handshake, CONNECT, request, reply; then
    /// the whole connection is dropped.
    pub async fn request_reply(&self, request: Bytes) -> anyhow::Result<()> {
        let tcp = TcpStream::connect(self.hbone).await?;
        tcp.set_nodelay(true)?;
        let client = tcp.local_addr()?;
        let conn = handshake(
            tcp,
            self.tls.clone(),
            &self.tuning,
            &self.limits,
            &self.buffers,
        )
        .await?;
        let req = ConnectRequest {
            authority: self.authority.into(),
            client,
            baggage: String::new(),
            service_host: None,
            origin_network: None,
        };
        let mut stream = open_stream(&conn, &req).await?.stream;
        let want = request.len() - 3;
        stream.send.send_data(request, true)?;
        let mut got = 0;
        while let Some(chunk) = stream.recv.data().await {
            let chunk = chunk?;
            got += chunk.len();
            let _ = stream.recv.flow_control().release_capacity(chunk.len());
        }
        if got != want {
            bail!("reply of {got} bytes through a fresh tunnel, expected {want}");
        }
        Ok(())
    }
}

/// Runs `iters` operations, `concurrency` at a time, and returns the wall time they took.
pub async fn run_concurrent<F, Fut>(iters: u64, concurrency: u64, op: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let start = Instant::now();
    let workers = concurrency.min(iters).max(1);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            // Spread the remainder over the first workers.
            let n = iters / workers + u64::from(w < iters % workers);
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..n {
                    op().await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// The `q`-quantile (0..=1) of `samples`, which it sorts.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx.min(samples.len() - 1)]
}
