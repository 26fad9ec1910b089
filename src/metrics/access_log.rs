//! The access log: one line per connection, written when it ends, through `tracing` (target
//! `access`), so `--log-format json` makes it JSON like every other line.

use std::net::SocketAddr;
use std::time::Duration;

use super::labels::{ConnLabels, ResponseFlags, UNKNOWN};

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
    /// The transport peer (what policy saw).
    pub src_addr: SocketAddr,
    /// The original client an HBONE peer claims (`forwarded`), when it differs from the peer.
    pub claimed_src: Option<SocketAddr>,
    pub dst_addr: SocketAddr,
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
            claimed_src: None,
            dst_addr,
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

/// The log says `-` where the metrics say `unknown`.
fn dash(s: &str) -> &str {
    if s.is_empty() || s == UNKNOWN {
        "-"
    } else {
        s
    }
}

/// Writes the line. Names and identities come from the connection's metric labels, which
/// already hold them resolved once.
pub fn emit(e: &AccessLogEntry, who: &ConnLabels) {
    let upstream = e.upstream.map(|u| u.to_string());
    let claimed = e.claimed_src.map(|c| c.to_string());
    tracing::info!(
        target: "access",
        direction = e.direction.as_str(),
        src.addr = %e.src_addr,
        src.forwarded = claimed.as_deref().unwrap_or("-"),
        src.workload = dash(&who.source_workload),
        src.namespace = dash(&who.source_workload_namespace),
        src.identity = dash(&who.source_principal),
        dst.addr = %e.dst_addr,
        dst.workload = dash(&who.destination_workload),
        dst.namespace = dash(&who.destination_workload_namespace),
        dst.identity = dash(&who.destination_principal),
        upstream = upstream.as_deref().unwrap_or("-"),
        protocol = e.protocol,
        // Istio's direction (as `istio_tcp_sent_bytes`): sent is server to client.
        bytes_sent = e.bytes_to_client,
        bytes_recv = e.bytes_to_server,
        duration_ms = e.duration.as_millis() as u64,
        response_flags = e.response_flags.as_str(),
        error = e.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}
