//! A DNS client for the lab's pods: queries sent from a socket made inside a pod's network
//! namespace (the pod's own, unmarked traffic, which the capture redirects to weft's proxy).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use weft::capture::Netns;

/// A UDP socket in the namespace at `netns_path`, connected to `server` (`ip:port`).
pub fn pod_udp(netns_path: &str, server: &str) -> UdpSocket {
    let netns = Netns::open(netns_path).expect("pod netns");
    let s = netns
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("netns worker")
        .expect("bind in the pod");
    s.connect(server).expect("connect");
    s
}

pub fn query_bytes(id: u16, qname: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_ascii(qname).expect("query name"),
        qtype,
    ));
    m.to_vec().expect("encode query")
}

/// One query; the answer with this id and how long it took, or None after `wait`.
pub fn ask_udp(
    s: &UdpSocket,
    id: u16,
    qname: &str,
    qtype: RecordType,
    wait: Duration,
) -> Option<(Message, Duration)> {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let t0 = Instant::now();
    s.send(&query_bytes(id, qname, qtype)).expect("send query");
    let mut buf = [0u8; 4096];
    loop {
        let n = s.recv(&mut buf).ok()?;
        let m = Message::from_vec(&buf[..n]).expect("a DNS answer");
        if m.id() == id {
            return Some((m, t0.elapsed()));
        }
    }
}

/// The A records of the answer to one query for `qname`, which must come within 3 s.
pub fn resolve_a(s: &UdpSocket, id: u16, qname: &str) -> Vec<String> {
    let (answer, _) = ask_udp(s, id, qname, RecordType::A, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("no answer for {qname} within 3 s"));
    a_records(&answer)
}

pub fn a_records(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// A resolver for weft's own lookups (its `--dns-resolv-conf` names it): answers A queries
/// for the names it was given, NXDOMAIN for anything else, over UDP on `addr` in the test's
/// own namespace (loopback). Records every question it gets.
pub struct NodeResolver {
    pub asked: std::sync::Arc<std::sync::Mutex<Vec<(String, RecordType)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeResolver {
    pub fn start(addr: &str, names: &[(&str, std::net::Ipv4Addr)]) -> NodeResolver {
        use hickory_proto::op::{MessageType, ResponseCode};
        use hickory_proto::rr::{rdata::A, Record};
        let socket = UdpSocket::bind(addr).expect("bind the node resolver");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let names: Vec<(Name, std::net::Ipv4Addr)> = names
            .iter()
            .map(|(n, ip)| (Name::from_ascii(n).expect("name"), *ip))
            .collect();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (asked2, stop2) = (asked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(question) = q.queries().first().cloned() else {
                    continue;
                };
                asked2.lock().unwrap().push((
                    question.name().to_lowercase().to_ascii(),
                    question.query_type(),
                ));
                let mut a = Message::new();
                a.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_desired(q.recursion_desired())
                    .set_recursion_available(true)
                    .add_query(question.clone());
                let known = names
                    .iter()
                    .find(|(n, _)| n.eq_case(&question.name().to_lowercase()));
                match known {
                    Some((n, ip)) => {
                        if question.query_type() == RecordType::A {
                            a.add_answer(Record::from_rdata(n.clone(), 300, RData::A(A(*ip))));
                        }
                    }
                    None => {
                        a.set_response_code(ResponseCode::NXDomain);
                    }
                }
                let _ = socket.send_to(&a.to_vec().expect("encode"), from);
            }
        });
        NodeResolver {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    /// How many times `name` (with the root dot) was asked for `qtype`.
    pub fn times_asked(&self, name: &str, qtype: RecordType) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t)| n == name && *t == qtype)
            .count()
    }
}

impl Drop for NodeResolver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
