//! The limits of [`Limits`](crate::config::Limits) that weft enforces itself, and the one way a
//! reached limit is reported: `weft_limit_reached_total{limit}` goes up every time, and a log
//! line names who reached it, at most one line per limit every [`LOG_EVERY`] (with the count of
//! those not logged). A flood is a number on a dashboard, never a flood of log lines.
//!
//! The two limits HTTP/2 enforces for weft (concurrent streams, header-list size) are set in
//! [`crate::hbone::server`]; reaching either is reported here too (the header list through
//! [`crate::hbone::header_limit`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::config::Limits;
use crate::metrics::{LimitLabels, Metrics};

/// At most one log line per limit this often.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    ConnectionsPerPeer,
    StreamsPerConnection,
    IdleConnection,
    PendingConnects,
    PendingConnectsPerPod,
    ConnectTimeout,
    HandshakeTimeout,
    DnsPending,
    DnsPendingPerPod,
    BufferedBytesPerConnection,
    BufferedBytes,
    HeaderList,
}

impl Limit {
    /// The `limit` label, and the limit's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerPeer => "connections_per_peer",
            Limit::StreamsPerConnection => "streams_per_connection",
            Limit::IdleConnection => "idle_connection",
            Limit::PendingConnects => "pending_connects",
            Limit::PendingConnectsPerPod => "pending_connects_per_pod",
            Limit::ConnectTimeout => "connect_timeout",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::DnsPending => "dns_pending",
            Limit::DnsPendingPerPod => "dns_pending_per_pod",
            Limit::BufferedBytesPerConnection => "buffered_bytes_per_connection",
            Limit::BufferedBytes => "buffered_bytes",
            Limit::HeaderList => "header_list",
        }
    }
}

impl Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts and logs reached limits.
pub struct LimitReports {
    metrics: Arc<Metrics>,
    /// Per limit: when it was last logged, and how many times it was reached since.
    logged: Mutex<HashMap<Limit, (Instant, u64)>>,
}

impl LimitReports {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        LimitReports {
            metrics,
            logged: Mutex::default(),
        }
    }

    /// `who` reached `limit`; `what` says what weft did about it.
    pub fn reached(&self, limit: Limit, who: impl Display, what: &str) {
        self.metrics
            .limits_reached
            .get_or_create(&LimitLabels {
                limit: limit.name(),
            })
            .inc();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match logged.get_mut(&limit) {
            Some((at, unlogged)) if now.duration_since(*at) < LOG_EVERY => *unlogged += 1,
            entry => {
                let unlogged = entry.map_or(0, |(_, n)| *n);
                logged.insert(limit, (now, 0));
                warn!(limit = limit.name(), %who, unlogged, "limit reached: {what}");
            }
        }
    }
}

/// HBONE connections held, in total and per peer address.
pub struct ConnectionCaps {
    max: usize,
    max_per_peer: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
    reports: Arc<LimitReports>,
    metrics: Arc<Metrics>,
}

/// One admitted connection; gives its place back when dropped.
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    peer: IpAddr,
}

impl ConnectionCaps {
    pub fn new(limits: &Limits, reports: Arc<LimitReports>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            max: limits.connections,
            max_per_peer: limits.connections_per_peer,
            held: Mutex::default(),
            reports,
            metrics,
        })
    }

    /// A place for a new connection from `peer`, or the limit that refuses it (reported).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, Limit> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *held;
        let from_peer = per_peer.get(&peer).copied().unwrap_or(0);
        let refused = if *total >= self.max {
            Some(Limit::Connections)
        } else if from_peer >= self.max_per_peer {
            Some(Limit::ConnectionsPerPeer)
        } else {
            None
        };
        if let Some(limit) = refused {
            drop(held);
            self.reports
                .reached(limit, peer, "HBONE connection closed before its handshake");
            return Err(limit);
        }
        *total += 1;
        per_peer.insert(peer, from_peer + 1);
        self.metrics.hbone_connections.set(*total as i64);
        Ok(ConnectionSlot {
            caps: self.clone(),
            peer,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut held = self.caps.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
        self.caps.metrics.hbone_connections.set(*total as i64);
    }
}

/// Upstream connects in progress: one budget per pod, one for the process.
#[derive(Clone)]
pub struct ConnectBudget {
    budget: PodBudget,
    pub timeout: Duration,
}

/// Held while one connect (or one forwarded DNS query) is in progress.
pub struct ConnectPermit {
    _pod: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

/// Work in progress bounded per pod and per process: room is taken from both or neither, and a
/// refusal is reported with the limit that refused it.
#[derive(Clone)]
pub struct PodBudget {
    /// The pod, for the log line (`namespace/name`).
    pod: Arc<str>,
    pod_budget: Arc<Semaphore>,
    all: Arc<Semaphore>,
    /// The per-pod and the process-wide limit.
    limits: (Limit, Limit),
    /// What a refusal means, for the log line.
    refused: &'static str,
    reports: Arc<LimitReports>,
}

impl PodBudget {
    pub fn new(
        pod: &str,
        per_pod: usize,
        all: Arc<Semaphore>,
        limits: (Limit, Limit),
        refused: &'static str,
        reports: Arc<LimitReports>,
    ) -> Self {
        PodBudget {
            pod: pod.into(),
            pod_budget: Arc::new(Semaphore::new(per_pod)),
            all,
            limits,
            refused,
            reports,
        }
    }

    /// Room for one more for the pod, or the limit that refuses it (reported).
    pub fn start(&self) -> Result<ConnectPermit, Limit> {
        let Ok(pod_permit) = self.pod_budget.clone().try_acquire_owned() else {
            self.reports.reached(self.limits.0, &self.pod, self.refused);
            return Err(self.limits.0);
        };
        let Ok(all) = self.all.clone().try_acquire_owned() else {
            self.reports.reached(self.limits.1, &self.pod, self.refused);
            return Err(self.limits.1);
        };
        Ok(ConnectPermit {
            _pod: pod_permit,
            _all: all,
        })
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }
}

impl ConnectBudget {
    /// The process-wide budget, shared by every pod's.
    pub fn process(limits: &Limits) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(limits.pending_connects))
    }

    pub fn for_pod(
        pod: &str,
        limits: &Limits,
        all: Arc<Semaphore>,
        reports: Arc<LimitReports>,
    ) -> Self {
        ConnectBudget {
            budget: PodBudget::new(
                pod,
                limits.pending_connects_per_pod,
                all,
                (Limit::PendingConnectsPerPod, Limit::PendingConnects),
                "connection refused while connects are pending",
                reports,
            ),
            timeout: limits.connect_timeout,
        }
    }

    /// Room for one more connect for the pod, or the limit that refuses it (reported).
    pub fn start(&self) -> Result<ConnectPermit, Limit> {
        self.budget.start()
    }

    pub fn timed_out(&self) {
        self.budget.reports.reached(
            Limit::ConnectTimeout,
            &self.budget.pod,
            "connect abandoned; the client's connection is closed",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, per_peer: usize) -> Limits {
        Limits {
            connections,
            connections_per_peer: per_peer,
            pending_connects_per_pod: 2,
            pending_connects: 3,
            ..Limits::default()
        }
    }

    fn reached(m: &Metrics, limit: Limit) -> u64 {
        m.limits_reached
            .get_or_create(&LimitLabels {
                limit: limit.name(),
            })
            .get()
    }

    #[test]
    fn connection_caps_count_per_peer_and_in_total_and_give_places_back() {
        let m = Arc::new(Metrics::new());
        let reports = Arc::new(LimitReports::new(m.clone()));
        let caps = ConnectionCaps::new(&limits(3, 2), reports, m.clone());
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let a1 = caps.admit(a).expect("first from a");
        let _a2 = caps.admit(a).expect("second from a");
        assert_eq!(caps.admit(a).err(), Some(Limit::ConnectionsPerPeer));
        let _b1 = caps.admit(b).expect("b has its own budget");
        assert_eq!(caps.admit(b).err(), Some(Limit::Connections));
        assert_eq!(m.hbone_connections.get(), 3);
        drop(a1);
        assert_eq!(m.hbone_connections.get(), 2);
        let _a3 = caps.admit(a).expect("a's place was given back");
        assert_eq!(reached(&m, Limit::ConnectionsPerPeer), 1);
        assert_eq!(reached(&m, Limit::Connections), 1);
    }

    #[test]
    fn connect_budget_is_per_pod_within_a_process_budget() {
        let m = Arc::new(Metrics::new());
        let reports = Arc::new(LimitReports::new(m.clone()));
        let l = limits(1, 1);
        let all = ConnectBudget::process(&l);
        let p1 = ConnectBudget::for_pod("ns/p1", &l, all.clone(), reports.clone());
        let p2 = ConnectBudget::for_pod("ns/p2", &l, all, reports);
        let held: Vec<_> = (0..2).map(|_| p1.start().expect("p1")).collect();
        assert_eq!(p1.start().err(), Some(Limit::PendingConnectsPerPod));
        let third = p2.start().expect("p2 has room: 3 in total");
        assert_eq!(p2.start().err(), Some(Limit::PendingConnects));
        drop(held);
        drop(third);
        assert!(p2.start().is_ok());
        assert_eq!(reached(&m, Limit::PendingConnectsPerPod), 1);
        assert_eq!(reached(&m, Limit::PendingConnects), 1);
    }
}
