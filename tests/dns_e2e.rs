//! The DNS proxy in the lab: pods' DNS redirected by weft's capture rules to weft's proxy in
//! their namespace; mesh names answered from the state (through the pod's own libc resolver and
//! search list), everything else forwarded to the pod's resolver from its resolv.conf (a test
//! resolver in b2's namespace, written with the same DNS crate weft uses); timeouts, malformed
//! packets and a flood bounded without disturbing another pod.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use common::dns::{self, a_records, ask_udp, query_bytes};
use common::lab::Lab;
use common::*;
use weft::capture::Netns;

/// The lab's test resolver: b2 (outside the mesh).
const RESOLVER: &str = "10.250.2.3:53";
const OUTSIDE_IP: &str = "10.250.77.7";
/// A name the test resolver never answers.
const BLACKHOLE: &str = "blackhole.example.";
/// A name whose UDP answer the resolver truncates (the full one over TCP).
const BIG: &str = "big.example.";

/// /etc/netns/<ns>/resolv.conf: `ip netns exec` (the pods' processes here) bind-mounts it over
/// /etc/resolv.conf in the process's own mount namespace, as a container runtime gives a pod
/// its file. Removed on drop.
struct PodResolvConf(PathBuf);

impl PodResolvConf {
    fn write(ns: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {}\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:3 attempts:1\n",
                RESOLVER.trim_end_matches(":53")
            ),
        )
        .unwrap();
        PodResolvConf(dir)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the test resolver saw: (qname, protocol, source address).
type Seen = Arc<Mutex<Vec<(String, &'static str, String)>>>;

/// The upstream resolver in b2's namespace, UDP and TCP on port 53: answers `outside.example`
/// and `big.example`, never answers `blackhole.example`, refuses the rest.
struct TestResolver {
    seen: Seen,
    stop: Arc<AtomicBool>,
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn resolver_answer(q: &Message, udp: bool) -> Option<Message> {
    let query = q.queries().first()?;
    let qname = query.name().to_lowercase().to_ascii();
    if qname == BLACKHOLE {
        return None;
    }
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true);
    m.add_query(query.clone());
    match qname.as_str() {
        "outside.example." if query.query_type() == RecordType::A => {
            m.add_answer(Record::from_rdata(
                query.name().clone(),
                60,
                RData::A(A(OUTSIDE_IP.parse().unwrap())),
            ));
        }
        "outside.example." => {}
        BIG if udp => {
            m.set_truncated(true);
        }
        BIG => {
            for i in 1..=100u8 {
                m.add_answer(Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A(A([10, 250, 78, i].into())),
                ));
            }
        }
        _ => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    Some(m)
}

/// Records a query the resolver received.
fn note(seen: &Seen, q: &Message, proto: &'static str, from: SocketAddr) {
    if let Some(query) = q.queries().first() {
        seen.lock().unwrap().push((
            query.name().to_lowercase().to_ascii(),
            proto,
            from.ip().to_string(),
        ));
    }
}

impl TestResolver {
    fn start(lab: &Lab) -> TestResolver {
        let netns = Netns::open(lab.netns_path("b2")).unwrap();
        let addr: SocketAddr = RESOLVER.parse().unwrap();
        let udp = netns.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
        let tcp = netns
            .run(move || std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                note(&s, &q, "udp", from);
                if let Some(a) = resolver_answer(&q, true) {
                    let _ = udp.send_to(&a.to_vec().unwrap(), from);
                }
            }
        });
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            while !st.load(Ordering::Relaxed) {
                let Ok((mut c, from)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                if c.read_exact(&mut msg).is_err() {
                    continue;
                }
                let Ok(q) = Message::from_vec(&msg) else {
                    continue;
                };
                note(&s, &q, "tcp", from);
                if let Some(a) = resolver_answer(&q, false) {
                    let bytes = a.to_vec().unwrap();
                    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
                    frame.extend(bytes);
                    let _ = c.write_all(&frame);
                }
            }
        });
        TestResolver { seen, stop }
    }

    fn saw(&self, qname: &str, proto: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, p, _)| n == qname && *p == proto)
            .map(|(_, _, from)| from.clone())
            .collect()
    }
}

fn pod_udp(lab: &Lab, pod: &str) -> UdpSocket {
    dns::pod_udp(&lab.netns_path(pod), RESOLVER)
}

/// One query over TCP from a pod.
fn ask_tcp(lab: &Lab, pod: &str, qname: &str) -> Message {
    use std::io::{Read, Write};
    let netns = Netns::open(lab.netns_path(pod)).unwrap();
    let addr: SocketAddr = RESOLVER.parse().unwrap();
    let mut c = netns
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let q = query_bytes(7, qname, RecordType::A);
    let mut frame = (q.len() as u16).to_be_bytes().to_vec();
    frame.extend(q);
    c.write_all(&frame).unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).unwrap();
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut msg).unwrap();
    Message::from_vec(&msg).unwrap()
}

/// The pod's own libc resolver (search list, ndots) as an app uses it.
fn getent(lab: &Lab, pod: &str, host: &str) -> Vec<String> {
    let out = Command::new("timeout")
        .args([
            "10",
            "ip",
            "netns",
            "exec",
            &lab.ns(pod),
            "getent",
            "ahostsv4",
            host,
        ])
        .output()
        .expect("getent");
    let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    ips.dedup();
    ips
}

fn config(lab: &Lab) -> String {
    let captured = |name: &str, sa: &str, ip: &str, node: &str, services: &str| {
        format!(
            "- uid: {name}\n  name: {name}\n  namespace: shop\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  netns: {}\n  labels: {{app: {name}}}\n{services}",
            lab.netns_path(name)
        )
    };
    format!(
        "workloads:\n{}{}{}- uid: b2\n  name: b2\n  namespace: legacy\n  workloadIps: [\"10.250.2.3\"]\n  protocol: TCP\n  node: b\nservices:\n- name: backend\n  namespace: shop\n  hostname: backend.shop.svc.cluster.local\n  vips: [\"/10.96.0.20\"]\n  ports: {{80: 8080}}\n- name: db\n  namespace: shop\n  hostname: db.example.internal\n  vips: [\"/240.240.0.5\"]\n  ports: {{5432: 8080}}\n",
        captured("a1", "client", "10.250.1.2", "a", ""),
        captured("a2", "other", "10.250.1.3", "a", ""),
        captured(
            "b1",
            "server",
            "10.250.2.2",
            "b",
            "  services:\n    shop/backend.shop.svc.cluster.local: {80: 8080}\n    shop/db.example.internal: {5432: 8080}\n"
        ),
    )
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks
}

/// `count` queries from `s`, `window` in flight at once; queries per second and the p50/p99 of
/// the round trip. Bounded in count; a lost reply ends the run with what it has.
fn load(s: &UdpSocket, qname: &str, count: u16, window: u16) -> (f64, Duration, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent_at = vec![None; usize::from(count)];
    let mut rtts = Vec::with_capacity(usize::from(count));
    let t0 = Instant::now();
    let mut next = 0u16;
    let mut buf = [0u8; 4096];
    while rtts.len() < usize::from(count) {
        while next < count && next - (rtts.len() as u16) < window {
            sent_at[usize::from(next)] = Some(Instant::now());
            s.send(&query_bytes(next, qname, RecordType::A)).unwrap();
            next += 1;
        }
        if s.recv(&mut buf).is_err() {
            break;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        if let Some(at) = sent_at.get_mut(usize::from(id)).and_then(Option::take) {
            rtts.push(at.elapsed());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if rtts.is_empty() {
        return (0.0, Duration::ZERO, Duration::ZERO);
    }
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p) as usize];
    (rtts.len() as f64 / secs, pct(0.5), pct(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_mesh_names_from_weft_and_the_rest_upstream() {
    let logs = logs();
    let mut lab = Lab::up(&["a1"]);
    let _confs: Vec<PodResolvConf> = ["a1", "a2"]
        .iter()
        .map(|p| PodResolvConf::write(&lab.ns(p)))
        .collect();
    // The pods' processes, each with the pod's resolv.conf (see PodResolvConf).
    lab.hold(&["a1", "a2", "b1"]);
    let resolver = TestResolver::start(&lab);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config(&lab));
    let mut s = settings("a");
    s.dns.upstream_timeout = Duration::from_millis(1000);
    s.dns.pending_per_pod = 20;
    let a = start_node_with(s, &cfg).await;
    let b = start_node("b", &cfg).await;
    let rules = lab.ruleset("a1").expect("a1 captured");
    assert!(rules.contains("udp dport 53 redirect to :15053"), "{rules}");
    let b1 = lab.serve("b1", 8080);

    // A Kubernetes service by its short name: the pod's resolver walks its search list, weft
    // answers from the state; the VIP then carries a1 → b1 over HBONE.
    assert_eq!(getent(&lab, "a1", "backend"), ["10.96.0.20"]);
    assert_eq!(
        getent(&lab, "a1", "backend.shop.svc.cluster.local"),
        ["10.96.0.20"]
    );
    assert_eq!(
        lab.send("a1", "10.96.0.20", 80, "via-dns"),
        Ok("via-dns".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_opened_total",
        &[
            "destination_workload=\"b1\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
        1.0,
    )
    .await;
    // A host with no real DNS record (a ServiceEntry-style host): weft alone knows it.
    assert_eq!(getent(&lab, "a1", "db.example.internal"), ["240.240.0.5"]);
    assert_eq!(lab.send("a1", "240.240.0.5", 5432, "db"), Ok("db".into()));
    assert!(
        resolver.saw("db.example.internal.", "udp").is_empty()
            && resolver
                .saw("backend.shop.svc.cluster.local.", "udp")
                .is_empty(),
        "mesh names never reach the upstream"
    );

    // Outside the mesh: forwarded to the pod's resolver, from the pod's own address.
    assert_eq!(getent(&lab, "a1", "outside.example"), [OUTSIDE_IP]);
    let from = resolver.saw("outside.example.", "udp");
    assert!(
        !from.is_empty() && from.iter().all(|f| f == "10.250.1.2"),
        "{from:?}"
    );
    let m = scrape(a.metrics_addr).await;
    let app = [
        "source_canonical_service=\"a1\"",
        "request_protocol=\"udp\"",
    ];
    assert!(
        metric(&m, "istio_dns_requests_total", &app).unwrap_or(0.0) >= 4.0,
        "{m}"
    );
    assert!(metric(&m, "istio_dns_upstream_requests_total", &app).unwrap_or(0.0) >= 1.0);
    assert!(
        metric(
            &m,
            "istio_dns_upstream_request_duration_seconds_count",
            &app
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // The client's query id and flags come back; a truncated upstream answer is passed on and
    // the client's TCP retry is forwarded over TCP.
    let udp = pod_udp(&lab, "a1");
    let (m, _) = ask_udp(
        &udp,
        0xbeef,
        "outside.example.",
        RecordType::A,
        Duration::from_secs(3),
    )
    .expect("answer");
    assert_eq!((m.id(), m.recursion_desired()), (0xbeef, true));
    assert_eq!(a_records(&m), [OUTSIDE_IP]);
    let (m, _) = ask_udp(&udp, 0xb16, BIG, RecordType::A, Duration::from_secs(3)).expect("answer");
    assert!(m.truncated(), "{m:?}");
    let m = ask_tcp(&lab, "a1", BIG);
    assert_eq!(a_records(&m).len(), 100);
    assert!(!resolver.saw(BIG, "tcp").is_empty());
    // A mesh name over TCP is answered from the state too.
    let m = ask_tcp(&lab, "a1", "backend.shop.svc.cluster.local.");
    assert_eq!(a_records(&m), ["10.96.0.20"]);

    // An upstream that never answers: SERVFAIL within the configured second, and weft keeps
    // answering.
    let (m, took) = ask_udp(
        &udp,
        0xdead,
        BLACKHOLE,
        RecordType::A,
        Duration::from_secs(4),
    )
    .expect("an answer, not silence");
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let m = scrape(a.metrics_addr).await;
    assert!(metric(&m, "istio_dns_upstream_failures_total", &app).unwrap_or(0.0) >= 1.0);
    assert_eq!(getent(&lab, "a1", "backend"), ["10.96.0.20"]);

    // Not DNS at all: dropped, counted, nothing else disturbed.
    udp.send(b"\x00\x01garbage that is not a DNS message")
        .unwrap();
    udp.send(&[0u8; 3]).unwrap();
    eventually_metric(
        a.metrics_addr,
        "weft_dns_malformed_packets_total",
        &["request_protocol=\"udp\""],
        2.0,
    )
    .await;
    let (m, _) = ask_udp(&udp, 0x1, "backend.", RecordType::A, Duration::from_secs(3))
        .expect("still answering");
    assert_eq!(a_records(&m), ["10.96.0.20"]);

    // A flood from a1 of queries that hang upstream: bounded per pod (20 pending, the rest
    // SERVFAIL at once); a2's queries are still answered meanwhile, forwarded ones too.
    let flood = pod_udp(&lab, "a1");
    let before_flood = resolver.saw(BLACKHOLE, "udp").len();
    let t0 = Instant::now();
    for id in 0..2000u16 {
        flood
            .send(&query_bytes(id, BLACKHOLE, RecordType::A))
            .unwrap();
    }
    let other = pod_udp(&lab, "a2");
    let (m, took) = ask_udp(
        &other,
        9,
        "outside.example.",
        RecordType::A,
        Duration::from_secs(3),
    )
    .expect("a2 answered during a1's flood");
    assert_eq!(a_records(&m), [OUTSIDE_IP]);
    let (m, _) = ask_udp(
        &other,
        10,
        "backend.",
        RecordType::A,
        Duration::from_secs(3),
    )
    .expect("a2 answered from state during a1's flood");
    assert_eq!(a_records(&m), ["10.96.0.20"]);
    eprintln!(
        "FIGURE a2 forwarded query during a1's flood of 2000: {took:?} (flood sent in {:?})",
        t0.elapsed()
    );
    // Every flood query the kernel delivered is handled within the first second (sent in
    // ~50 ms); with 20 allowed pending, at most 20 (40 if handling outlasted the first
    // timeouts) reach the upstream, where without the bound all of them would.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let upstream_blackhole = resolver.saw(BLACKHOLE, "udp").len() - before_flood;
    assert!(
        (1..=40).contains(&upstream_blackhole),
        "{upstream_blackhole} flood queries reached the upstream"
    );
    let limited = metric(
        &scrape(a.metrics_addr).await,
        "weft_limit_reached_total",
        &["limit=\"dns_pending_per_pod\""],
    )
    .unwrap_or(0.0);
    assert!(limited >= 100.0, "flood not bounded: {limited}");
    eprintln!("FIGURE flood of 2000: {limited} answered SERVFAIL at once by the per-pod bound, {upstream_blackhole} forwarded (the rest dropped by the kernel's socket buffer)");
    assert!(
        logs.lines_with("dns_pending_per_pod").len() < 10,
        "one log line per second at most"
    );

    // Figures (not asserted): from the state and forwarded, 4000 queries, 16 in flight (within
    // the pod's 20 pending).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (what, qname) in [
        ("answered from state", "backend.shop.svc.cluster.local."),
        ("forwarded", "outside.example."),
    ] {
        let s = pod_udp(&lab, "a2");
        let cpu0 = cpu_seconds();
        let (qps, p50, p99) = load(&s, qname, 4000, 16);
        let cpu = cpu_seconds() - cpu0;
        eprintln!(
            "FIGURE DNS {what}: {qps:.0} queries/s, p50 {p50:?}, p99 {p99:?}, CPU of the test process (weft, client, resolver) {:.1} ms per 1000 queries",
            cpu * 1000.0 / 4.0
        );
    }

    a.shutdown(Duration::from_millis(200)).await;
    b.shutdown(Duration::from_millis(200)).await;
}
