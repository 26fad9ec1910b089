//! A captured pod's network namespace as the proxy uses it: a socket factory whose sockets are
//! created inside the namespace, and the capture (rules + routes) installed there.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use tracing::warn;

use super::{CaptureError, Netns, PodCapture, RouteParams, RuleParams};
use crate::config::Settings;
use crate::proxy::socket::{ListenOptions, LocalSockets, SocketFactory};

/// Sockets made inside the pod's namespace (listeners by its worker thread, per-connection
/// sockets by the calling thread, briefly entering it): they live there, so listeners see the
/// pod's traffic and upstream connections leave with the pod's address.
#[derive(Debug)]
struct NetnsSockets {
    netns: Netns,
    local: LocalSockets,
}

fn worker_error(e: CaptureError) -> io::Error {
    io::Error::other(e)
}

impl SocketFactory for NetnsSockets {
    fn tcp(&self, ip: IpAddr) -> io::Result<socket2::Socket> {
        self.netns
            .run_here(|| self.local.tcp(ip))
            .map_err(worker_error)?
    }

    fn udp(&self, ip: IpAddr) -> io::Result<socket2::Socket> {
        self.netns
            .run_here(|| self.local.udp(ip))
            .map_err(worker_error)?
    }

    /// The capture routes replies to foreign sources back to weft (weft's own policy routing,
    /// or the CNI agent's).
    fn returns_replies_to(&self, _source: IpAddr) -> bool {
        true
    }

    fn listen_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let local = self.local.clone();
        self.netns
            .run(move || local.listen_udp(addr))
            .map_err(worker_error)?
    }

    fn listen(&self, addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener> {
        let local = self.local.clone();
        self.netns
            .run(move || local.listen(addr, opts))
            .map_err(worker_error)?
    }
}

/// Who installs the redirection of a captured pod's traffic to weft's listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RulesBy {
    /// weft's own nftables table and policy routing (standalone mode).
    Weft,
    /// The CNI node agent (istio-cni) installed its own; weft only binds its sockets.
    CniAgent,
}

/// Makes the kernel move connections still queued on a closing listener to another listener
/// of the same reuse-port group instead of resetting them (`net.ipv4.tcp_migrate_req`, per
/// network namespace, Linux 5.14+). When an old weft closes its listeners during an upgrade,
/// the new weft's listeners take the connections not yet accepted. Runs inside the namespace:
/// `/proc/sys/net` shows the namespace of the thread that opens it.
fn hand_over_pending_connections() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

pub struct PodNetwork {
    netns: Netns,
    rules: RuleParams,
    routes: RouteParams,
    rules_by: RulesBy,
    ipv6: bool,
}

impl PodNetwork {
    pub fn open(path: &Path, settings: &Settings, dns: bool) -> Result<Self, CaptureError> {
        PodNetwork::new(Netns::open(path)?, settings, RulesBy::Weft, dns)
    }

    /// `dns`: whether the pod's DNS goes to weft's DNS proxy ([`crate::config::Dns::captures`]).
    pub fn new(
        netns: Netns,
        settings: &Settings,
        rules_by: RulesBy,
        dns: bool,
    ) -> Result<Self, CaptureError> {
        let ipv6 = netns.has_ipv6();
        if let Err(e) = netns.run(hand_over_pending_connections)? {
            warn!(netns = ?netns, error = %e, "tcp_migrate_req not set: connections queued for a weft that exits may be reset during an upgrade");
        }
        let rules = RuleParams {
            outbound_port: settings.ports.outbound,
            inbound_plain_port: settings.ports.inbound_plaintext,
            hbone_port: settings.ports.hbone,
            mark: settings.mark,
            dns_port: dns.then_some(settings.ports.dns),
            ..RuleParams::default()
        };
        rules.validate()?;
        Ok(PodNetwork {
            netns,
            rules,
            routes: RouteParams::default(),
            rules_by,
            ipv6,
        })
    }

    pub fn sockets(&self) -> Arc<dyn SocketFactory> {
        Arc::new(NetnsSockets {
            netns: self.netns.clone(),
            local: LocalSockets {
                mark: Some(self.rules.mark),
            },
        })
    }

    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Whether the pod's DNS is redirected to the DNS proxy (so one should serve it).
    pub fn captures_dns(&self) -> bool {
        self.rules.dns_port.is_some()
    }

    /// Starts redirecting the pod's traffic (unless the CNI agent does). Call once the
    /// listeners are up.
    pub fn install(&self) -> Result<(), CaptureError> {
        if self.rules_by == RulesBy::CniAgent {
            return Ok(());
        }
        PodCapture::install(&self.netns, &self.rules, &self.routes)
    }

    /// Stops redirecting; the pod's traffic flows uncaptured again.
    pub fn uninstall(&self) -> Result<(), CaptureError> {
        if self.rules_by == RulesBy::CniAgent {
            return Ok(());
        }
        PodCapture::uninstall(&self.netns, &self.rules, &self.routes)
    }
}
