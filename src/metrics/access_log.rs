//! The access log: one line per connection, written when it ends, through `tracing` (target
//! `access`), so `--log-format json` makes it JSON like every other line.

use std::net::SocketAddr;
use std::time::Duration;

use super::labels::ResponseFlags;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLogEntry {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub dst_addr: SocketAddr,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_identity: String,
    pub dst_workload: String,
    pub dst_namespace: String,
    pub dst_identity: String,
    /// Where weft actually sent the bytes (a tunnel endpoint, or the app).
    pub upstream: Option<SocketAddr>,
    pub protocol: &'static str,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    pub response_flags: ResponseFlags,
    pub error: Option<String>,
}

impl AccessLogEntry {
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        AccessLogEntry {
            direction,
            src_addr,
            dst_addr,
            src_workload: String::new(),
            src_namespace: String::new(),
            src_identity: String::new(),
            dst_workload: String::new(),
            dst_namespace: String::new(),
            dst_identity: String::new(),
            upstream: None,
            protocol: "tcp",
            bytes_to_server: 0,
            bytes_to_client: 0,
            duration: Duration::ZERO,
            response_flags: ResponseFlags::None,
            error: None,
        }
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn emit(e: &AccessLogEntry) {
    let upstream = e.upstream.map(|u| u.to_string());
    let flags = match e.response_flags {
        ResponseFlags::None => "-",
        ResponseFlags::Deny => "DENY",
        ResponseFlags::Connect => "CONNECT",
    };
    tracing::info!(
        target: "access",
        direction = e.direction.as_str(),
        src.addr = %e.src_addr,
        src.workload = dash(&e.src_workload),
        src.namespace = dash(&e.src_namespace),
        src.identity = dash(&e.src_identity),
        dst.addr = %e.dst_addr,
        dst.workload = dash(&e.dst_workload),
        dst.namespace = dash(&e.dst_namespace),
        dst.identity = dash(&e.dst_identity),
        upstream = upstream.as_deref().unwrap_or("-"),
        protocol = e.protocol,
        bytes_sent = e.bytes_to_server,
        bytes_recv = e.bytes_to_client,
        duration_ms = e.duration.as_millis() as u64,
        response_flags = flags,
        error = e.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}
