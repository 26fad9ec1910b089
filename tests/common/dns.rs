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

pub fn a_records(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}
