//! Tests against real network namespaces. They need root, `ip` and `nft`;
//! without root they print why and pass, so an unprivileged `cargo test`
//! of the whole crate still works.
//!
//! Every test builds its own uniquely named namespaces (`weftt-…`), uses
//! only 10.250.x.x / fd00:250::/32 inside them, and removes them on drop,
//! also when it fails. Every wait is bounded.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

use super::*;

/// Upper bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch a listener that must *not* get a connection.
const QUIET: Duration = Duration::from_millis(300);

fn is_root() -> bool {
    // The owner of /proc/self is the effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Fails the test where it cannot run: these tests need root for network namespaces, and a
/// skip would let a broken CI pass.
macro_rules! require_root {
    () => {
        assert!(
            is_root(),
            "needs root to create network namespaces (run the suite as root: scripts/test.sh)"
        );
    };
}

/// Runs a command with a hard time limit, returning its output.
fn cmd(args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["-s", "KILL", "20"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    out
}

/// Like [`cmd`], but the command must succeed.
fn must(args: &[&str]) -> String {
    let out = cmd(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace that is deleted on drop.
struct TestNs {
    name: String,
}

impl TestNs {
    fn new() -> TestNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "weftt-{}-{}-{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        must(&["ip", "netns", "add", &name]);
        let ns = TestNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn open(&self) -> Netns {
        Netns::open(self.path()).expect("open test netns")
    }

    /// `ip -n NAME ARGS…`
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        must(&full)
    }

    /// `ip netns exec NAME ARGS…` (with the time limit of [`cmd`]).
    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        cmd(&full)
    }

    fn disable_ipv6(&self) {
        for key in ["all", "default", "lo"] {
            let setting = format!("net.ipv6.conf.{key}.disable_ipv6=1");
            let out = self.exec(&["sysctl", "-w", &setting]);
            assert!(out.status.success(), "sysctl {setting}");
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = cmd(&["ip", "netns", "del", &self.name]);
    }
}

/// Two namespaces joined by a veth pair, both named `eth0`:
/// `a` = 10.250.N.1/24, fd00:250:N::1/64; `b` = 10.250.N.2/24, fd00:250:N::2/64.
struct Pair {
    a: TestNs,
    b: TestNs,
    n: u8,
}

impl Pair {
    fn new(n: u8) -> Pair {
        let (a, b) = (TestNs::new(), TestNs::new());
        a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]);
        for (ns, host) in [(&a, 1), (&b, 2)] {
            ns.ip(&[
                "addr",
                "add",
                &format!("10.250.{n}.{host}/24"),
                "dev",
                "eth0",
            ]);
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00:250:{n}::{host}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        Pair { a, b, n }
    }

    fn v4(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(10, 250, self.n, host).into(), port)
    }

    fn v6(&self, host: u16, port: u16) -> SocketAddr {
        let ip = Ipv6Addr::new(0xfd00, 0x250, u16::from(self.n), 0, 0, 0, 0, host);
        SocketAddr::new(ip.into(), port)
    }
}

/// A listener created inside `ns`, used from the test's runtime.
async fn listen_in(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let std = ns
        .run_async(move || -> io::Result<std::net::TcpListener> {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            if addr.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into())?;
            sock.listen(128)?;
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        })
        .await
        .expect("netns worker")
        .unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
    TcpListener::from_std(std).expect("register listener")
}

/// How a test client socket is set up inside its namespace.
#[derive(Clone, Copy, Default)]
struct ClientOpts {
    mark: Option<u32>,
    /// Bind to this (possibly foreign) IP with IP_TRANSPARENT first.
    spoof: Option<IpAddr>,
}

/// Connects to `dst` from a socket created inside `ns`.
async fn connect_from(ns: &Netns, dst: SocketAddr, opts: ClientOpts) -> io::Result<TcpStream> {
    let sock = ns
        .run_async(move || -> io::Result<Socket> {
            let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            if let Some(mark) = opts.mark {
                sock.set_mark(mark)?;
            }
            if let Some(ip) = opts.spoof {
                sock.set_ip_transparent_v4(true)?;
                sock.bind(&SocketAddr::new(ip, 0).into())?;
            }
            sock.set_nonblocking(true)?;
            Ok(sock)
        })
        .await
        .expect("netns worker")?;
    let sock = TcpSocket::from_std_stream(sock.into());
    timeout(WAIT, sock.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect {dst}")))?
}

async fn accept(l: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    timeout(WAIT, l.accept())
        .await
        .unwrap_or_else(|_| panic!("{what}: no connection within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: accept: {e}"))
}

async fn assert_quiet(l: &TcpListener, what: &str) {
    if let Ok(Ok((_, peer))) = timeout(QUIET, l.accept()).await {
        panic!("{what}: unexpected connection from {peer}");
    }
}

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` of an accepted socket.
fn original_dst(s: &TcpStream) -> SocketAddr {
    match s.local_addr().expect("local addr") {
        SocketAddr::V4(_) => {
            let sin = getsockopt(s, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
            SocketAddr::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                u16::from_be(sin.sin_port),
            )
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(s, sockopt::Ip6tOriginalDst).expect("IP6T_SO_ORIGINAL_DST");
            SocketAddr::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                u16::from_be(sin6.sin6_port),
            )
        }
    }
}

fn this_thread_netns() -> NsId {
    NsId::of_path("/proc/thread-self/ns/net").expect("stat own netns")
}

fn install(ns: &Netns) {
    PodCapture::install(ns, &RuleParams::default(), &RouteParams::default())
        .unwrap_or_else(|e| panic!("install: {e}"));
}

/// Lines of `ip [-6] rule` that are weft's fwmark rule.
fn weft_rules(ns: &TestNs, family: &str) -> usize {
    let out = ns.exec(&["ip", family, "rule"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("32764:") && l.contains("fwmark 0x111/0xfff lookup 100"))
        .count()
}

fn weft_routes(ns: &TestNs, family: &str) -> String {
    let out = ns.exec(&["ip", family, "route", "show", "table", "100"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test namespace whose only address, `ip`, sits on one end of a veth pair inside it (no
/// dummy driver on every kernel), opened.
fn ns_with_address(ip: &str) -> (TestNs, Netns) {
    let t = TestNs::new();
    t.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    t.ip(&["addr", "add", &format!("{ip}/32"), "dev", "v0"]);
    t.ip(&["link", "set", "v0", "up"]);
    let ns = t.open();
    (t, ns)
}

#[test]
fn run_here_enters_for_the_closure_and_comes_back() {
    require_root!();
    let (_t, ns) = ns_with_address("10.250.9.2");
    let before = this_thread_netns();
    let addr: SocketAddr = "10.250.9.2:0".parse().expect("addr");

    let (inside_ns, bound) = ns
        .run_here(|| (this_thread_netns(), std::net::TcpListener::bind(addr)))
        .expect("run_here");
    assert_eq!(inside_ns, ns.id(), "the closure ran in the pod namespace");
    let listener = bound.expect("the address exists only inside: bind there");
    assert_eq!(this_thread_netns(), before, "the thread came back");
    assert!(
        std::net::TcpListener::bind(addr).is_err(),
        "address leaked into the caller's namespace"
    );
    // The socket stays in the namespace it was made in: reachable from inside only.
    let port = listener.local_addr().expect("local addr").port();
    let reached = ns
        .run(move || std::net::TcpStream::connect(("10.250.9.2", port)).is_ok())
        .expect("run");
    assert!(reached);

    // A panic inside still brings the thread home.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = ns.run_here(|| panic!("inside"));
    }));
    assert!(r.is_err());
    assert_eq!(
        this_thread_netns(),
        before,
        "the thread came back after a panic"
    );
}

#[test]
fn run_executes_inside_the_namespace() {
    require_root!();
    let (t, ns) = ns_with_address("10.250.9.1");
    let before = this_thread_netns();
    let addr: SocketAddr = "10.250.9.1:0".parse().expect("addr");

    // The address exists only in the test namespace.
    let inside = ns
        .run(move || std::net::TcpListener::bind(addr).map(|l| l.local_addr()))
        .expect("run");
    assert!(inside.is_ok(), "bind inside: {inside:?}");
    assert!(
        std::net::TcpListener::bind(addr).is_err(),
        "address leaked into caller netns"
    );
    let here = Netns::current().expect("current");
    let in_current = here
        .run(move || std::net::TcpListener::bind(addr).is_ok())
        .expect("run");
    assert!(!in_current);

    let names = ns
        .run(|| {
            nix::net::if_::if_nameindex().map(|ifs| {
                ifs.iter()
                    .map(|i| i.name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        })
        .expect("run")
        .expect("if_nameindex");
    let mut names = names;
    names.sort();
    assert_eq!(names, ["lo", "v0", "v1"]);

    // Identity: same namespace through /proc/PID/ns/net of a process in it.
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &t.name, "sleep", "30"])
        .spawn()
        .expect("spawn sleeper");
    let proc_path = format!("/proc/{}/ns/net", sleeper.id());
    let deadline = Instant::now() + WAIT;
    while NsId::of_path(&proc_path).ok() != Some(ns.id()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let via_proc = Netns::open(&proc_path);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let via_proc = via_proc.expect("open /proc/PID/ns/net");
    assert!(via_proc.same_as(&ns));
    assert!(!ns.same_as(&here));
    assert_eq!(NsId::of_path(t.path()).expect("stat"), ns.id());

    // A panicking job is reported and the worker keeps serving.
    let panicked = ns.run(|| -> u32 { panic!("deliberate test panic") });
    assert!(
        matches!(panicked, Err(CaptureError::JobPanicked { .. })),
        "{panicked:?}"
    );
    // Nested run on the same namespace does not deadlock.
    let inner = ns.clone();
    let nested = ns.run(move || inner.run(|| 7).ok()).expect("run");
    assert_eq!(nested, Some(7));

    assert_eq!(this_thread_netns(), before, "caller thread changed netns");
}

#[test]
fn worker_exits_when_last_handle_is_dropped() {
    require_root!();
    let t = TestNs::new();
    let ns = t.open();
    let clone = ns.clone();
    // "/proc/thread-self" links to "PID/task/TID" of the worker.
    let task = ns
        .run(|| std::fs::read_link("/proc/thread-self"))
        .expect("run")
        .expect("readlink");
    let task = PathBuf::from("/proc").join(task);
    assert!(task.exists());
    drop(ns);
    assert_eq!(clone.run(|| 1).expect("clone still works"), 1);
    drop(clone);
    let deadline = Instant::now() + WAIT;
    while task.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!task.exists(), "worker {} still running", task.display());
}

#[test]
fn open_errors_name_the_path_and_step() {
    require_root!();
    let missing = Netns::open("/run/netns/weftt-does-not-exist").expect_err("missing");
    let msg = missing.to_string();
    assert!(
        msg.contains("/run/netns/weftt-does-not-exist") && msg.contains("open"),
        "{msg}"
    );
    let wrong_kind = Netns::open("/proc/self/ns/uts").expect_err("uts is not a netns");
    assert!(
        matches!(wrong_kind, CaptureError::Setns { .. }),
        "{wrong_kind}"
    );
    assert!(wrong_kind.to_string().contains("/proc/self/ns/uts"));
}

#[tokio::test]
async fn listener_made_in_namespace_accepts_client_from_namespace() {
    require_root!();
    let t = TestNs::new();
    let ns = t.open();
    let listener = listen_in(&ns, "127.0.0.1:0".parse().expect("addr")).await;
    let port = listener.local_addr().expect("addr").port();

    let name = t.name.clone();
    let client = std::thread::spawn(move || {
        let script = format!("echo hello-from-ns >/dev/tcp/127.0.0.1/{port}");
        cmd(&["ip", "netns", "exec", &name, "bash", "-c", &script])
    });
    let (mut stream, _) = accept(&listener, "client in netns").await;
    let mut got = String::new();
    timeout(WAIT, stream.read_to_string(&mut got))
        .await
        .expect("read in time")
        .expect("read");
    assert_eq!(got.trim(), "hello-from-ns");
    let out = client.join().expect("client thread");
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn run_is_cheap_enough_per_connection() {
    require_root!();
    let t = TestNs::new();
    let ns = t.open();
    const N: u32 = 2000;
    let start = Instant::now();
    for _ in 0..N {
        let sock = ns
            .run_async(|| Socket::new(Domain::IPV4, Type::STREAM, None))
            .await
            .expect("run")
            .expect("socket");
        drop(sock);
    }
    let async_rate = f64::from(N) / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..N {
        ns.run(|| ()).expect("run");
    }
    let sync_rate = f64::from(N) / start.elapsed().as_secs_f64();
    eprintln!("netns run: {async_rate:.0}/s async (with socket), {sync_rate:.0}/s blocking");
    assert!(async_rate > 2000.0 && sync_rate > 2000.0, "too slow");
}

#[test]
fn install_is_idempotent_and_uninstall_removes_everything() {
    require_root!();
    let t = TestNs::new();
    let ns = t.open();
    assert!(ns.has_ipv6(), "fresh netns with lo up has ::1");
    assert_eq!(rules::inspect(&ns).expect("inspect"), None);

    install(&ns);
    let first = rules::inspect(&ns)
        .expect("inspect")
        .expect("table present");
    for needle in [
        "redirect to :15001",
        "redirect to :15006",
        "tcp dport 15008 accept",
    ] {
        assert!(first.contains(needle), "missing {needle:?} in\n{first}");
    }
    install(&ns);
    let second = rules::inspect(&ns)
        .expect("inspect")
        .expect("table present");
    assert_eq!(first, second, "re-install changed the table");
    let all = String::from_utf8_lossy(&t.exec(&["nft", "list", "ruleset"]).stdout).into_owned();
    assert_eq!(all.matches("table inet weft").count(), 1, "{all}");
    for family in ["-4", "-6"] {
        assert_eq!(weft_rules(&t, family), 1, "ip {family} rule");
        assert!(
            weft_routes(&t, family).contains("local default dev lo"),
            "ip {family} route"
        );
    }

    PodCapture::uninstall(&ns, &RuleParams::default(), &RouteParams::default()).expect("uninstall");
    assert_eq!(rules::inspect(&ns).expect("inspect"), None);
    for family in ["-4", "-6"] {
        assert_eq!(weft_rules(&t, family), 0, "ip {family} rule");
        assert_eq!(weft_routes(&t, family).trim(), "", "ip {family} route");
    }
    PodCapture::uninstall(&ns, &RuleParams::default(), &RouteParams::default())
        .expect("uninstall when absent");
}

#[test]
fn ipv4_only_namespace_installs_without_ipv6() {
    require_root!();
    let t = TestNs::new();
    t.disable_ipv6();
    let ns = t.open();
    assert!(!ns.has_ipv6());
    install(&ns);
    install(&ns);
    assert!(rules::inspect(&ns).expect("inspect").is_some());
    assert_eq!(weft_rules(&t, "-4"), 1);
    assert_eq!(weft_rules(&t, "-6"), 0);
    PodCapture::uninstall(&ns, &RuleParams::default(), &RouteParams::default()).expect("uninstall");
    assert_eq!(weft_rules(&t, "-4"), 0);
    assert_eq!(rules::inspect(&ns).expect("inspect"), None);
}

#[test]
fn invalid_params_are_refused_before_touching_the_namespace() {
    require_root!();
    let t = TestNs::new();
    let ns = t.open();
    let bad = RuleParams {
        reply_mark: 0x539,
        ..RuleParams::default()
    };
    let err = PodCapture::install(&ns, &bad, &RouteParams::default()).expect_err("invalid");
    assert!(matches!(err, CaptureError::InvalidParams(_)), "{err}");
    assert_eq!(rules::inspect(&ns).expect("inspect"), None);
    assert_eq!(weft_rules(&t, "-4"), 0);
}

/// App in `a` connects out: redirected to 15001 with the original destination
/// preserved; weft-marked sockets go straight through.
#[tokio::test]
async fn outbound_is_redirected_unless_marked() {
    require_root!();
    let p = Pair::new(3);
    let (a, b) = (p.a.open(), p.b.open());
    install(&a);
    let out4 = listen_in(&a, "0.0.0.0:15001".parse().expect("addr")).await;
    let out6 = listen_in(&a, "[::]:15001".parse().expect("addr")).await;
    let server4 = listen_in(&b, p.v4(2, 80)).await;
    let server6 = listen_in(&b, p.v6(2, 80)).await;

    let _app = connect_from(&a, p.v4(2, 80), ClientOpts::default())
        .await
        .expect("connect v4");
    let (got, _) = accept(&out4, "outbound v4 capture").await;
    assert_eq!(original_dst(&got), p.v4(2, 80));
    assert_eq!(
        got.local_addr().expect("addr").ip(),
        IpAddr::from(Ipv4Addr::LOCALHOST)
    );
    assert_quiet(&server4, "server must not see captured traffic").await;

    let _app6 = connect_from(&a, p.v6(2, 80), ClientOpts::default())
        .await
        .expect("connect v6");
    let (got6, _) = accept(&out6, "outbound v6 capture").await;
    assert_eq!(original_dst(&got6), p.v6(2, 80));
    assert_quiet(&server6, "server must not see captured v6 traffic").await;

    let marked = ClientOpts {
        mark: Some(RuleParams::default().mark),
        ..ClientOpts::default()
    };
    let _weft = connect_from(&a, p.v4(2, 80), marked)
        .await
        .expect("marked connect");
    let (_, peer) = accept(&server4, "marked traffic goes direct").await;
    assert_eq!(peer.ip(), p.v4(1, 0).ip());
    assert_quiet(&out4, "marked traffic must not be captured").await;
    let _weft6 = connect_from(&a, p.v6(2, 80), marked)
        .await
        .expect("marked v6 connect");
    accept(&server6, "marked v6 traffic goes direct").await;
    assert_quiet(&out6, "marked v6 traffic must not be captured").await;
}

/// A peer connects to the pod: plaintext lands on 15006, HBONE on 15008
/// untouched, and the capture port itself is not reachable directly.
#[tokio::test]
async fn inbound_is_redirected_and_hbone_untouched() {
    require_root!();
    let p = Pair::new(4);
    let (a, b) = (p.a.open(), p.b.open());
    install(&a);
    let in4 = listen_in(&a, "0.0.0.0:15006".parse().expect("addr")).await;
    let in6 = listen_in(&a, "[::]:15006".parse().expect("addr")).await;
    let hbone = listen_in(&a, "0.0.0.0:15008".parse().expect("addr")).await;
    let app = listen_in(&a, p.v4(1, 8080)).await;

    let _c = connect_from(&b, p.v4(1, 8080), ClientOpts::default())
        .await
        .expect("connect");
    let (got, peer) = accept(&in4, "inbound v4 capture").await;
    assert_eq!(peer.ip(), p.v4(2, 0).ip(), "source IP preserved");
    assert_eq!(original_dst(&got), p.v4(1, 8080));
    assert_quiet(&app, "app must not see captured traffic").await;

    let _c6 = connect_from(&b, p.v6(1, 8080), ClientOpts::default())
        .await
        .expect("connect v6");
    let (got6, _) = accept(&in6, "inbound v6 capture").await;
    assert_eq!(original_dst(&got6), p.v6(1, 8080));

    let _h = connect_from(&b, p.v4(1, 15008), ClientOpts::default())
        .await
        .expect("hbone");
    let (h, _) = accept(&hbone, "hbone untouched").await;
    assert_eq!(h.local_addr().expect("addr"), p.v4(1, 15008));
    assert_quiet(&in4, "hbone must not be captured").await;

    let direct = connect_from(&b, p.v4(1, 15006), ClientOpts::default()).await;
    assert_eq!(
        direct.as_ref().map_err(io::Error::kind).err(),
        Some(io::ErrorKind::ConnectionRefused),
        "direct connection to the capture port must be reset"
    );
    assert_quiet(&in4, "direct 15006 must not reach the listener").await;
}

/// A pod calling itself goes straight to its app; calling the capture ports
/// directly is refused, so weft can never be made to connect to itself.
#[tokio::test]
async fn self_calls_do_not_loop() {
    require_root!();
    let p = Pair::new(5);
    let a = p.a.open();
    install(&a);
    let out4 = listen_in(&a, "0.0.0.0:15001".parse().expect("addr")).await;
    let in4 = listen_in(&a, "0.0.0.0:15006".parse().expect("addr")).await;
    let hbone = listen_in(&a, "0.0.0.0:15008".parse().expect("addr")).await;
    let app = listen_in(&a, p.v4(1, 8080)).await;

    let _c = connect_from(&a, p.v4(1, 8080), ClientOpts::default())
        .await
        .expect("self call");
    accept(&app, "self call reaches the app").await;
    assert_quiet(&out4, "self call must not be captured").await;

    for dst in [
        "127.0.0.1:15001".parse().expect("addr"),
        p.v4(1, 15001),
        p.v4(1, 15006),
    ] {
        let r = connect_from(&a, dst, ClientOpts::default()).await;
        assert_eq!(
            r.as_ref().map_err(io::Error::kind).err(),
            Some(io::ErrorKind::ConnectionRefused),
            "direct connection to {dst} must be reset"
        );
    }
    assert_quiet(&out4, "no direct 15001").await;
    assert_quiet(&in4, "no direct 15006").await;

    let _h = connect_from(&a, p.v4(1, 15008), ClientOpts::default())
        .await
        .expect("self hbone");
    accept(&hbone, "self call to hbone").await;
}

/// weft's inbound path: connect to the app with the client's IP as source.
/// The app's replies to that foreign IP must come back to weft, which only
/// the reply mark + policy routing achieve.
#[tokio::test]
async fn spoofed_source_replies_come_back_to_weft() {
    require_root!();
    let p = Pair::new(6);
    let a = p.a.open();
    install(&a);
    let app = listen_in(&a, p.v4(1, 8080)).await;
    let weft = ClientOpts {
        mark: Some(RuleParams::default().mark),
        spoof: Some(p.v4(2, 0).ip()),
    };

    let mut upstream = connect_from(&a, p.v4(1, 8080), weft)
        .await
        .expect("spoofed connect");
    let (mut served, peer) = accept(&app, "app gets spoofed connection").await;
    assert_eq!(
        peer,
        upstream.local_addr().expect("addr"),
        "app sees client IP"
    );
    assert_eq!(peer.ip(), p.v4(2, 0).ip());
    served.write_all(b"pong").await.expect("app write");
    let mut buf = [0u8; 4];
    timeout(WAIT, upstream.read_exact(&mut buf))
        .await
        .expect("reply in time")
        .expect("read reply");
    assert_eq!(&buf, b"pong");
    upstream.write_all(b"ping").await.expect("weft write");
    timeout(WAIT, served.read_exact(&mut buf))
        .await
        .expect("request in time")
        .expect("read request");
    assert_eq!(&buf, b"ping");

    // Control: without the policy routing the reply leaves the pod and the
    // connection never completes.
    routes::remove(&a, &RouteParams::default(), 0x111, 0xfff).expect("remove routes");
    let r = timeout(
        Duration::from_secs(2),
        connect_from(&a, p.v4(1, 8080), weft),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "spoofed connect must fail without reply routing"
    );
}
