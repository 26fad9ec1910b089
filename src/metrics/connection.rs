//! One guard per proxied connection: it counts the connection open when created, and on drop
//! counts it closed (or failed, with its response flags) and writes the access log line, so no
//! code path can forget either.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use super::access_log::{self, AccessLogEntry};
use super::labels::{ConnLabels, ResponseFlags};
use super::Metrics;

/// The two byte counters of a connection, resolved once; the data path does one atomic add per
/// read on them.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    /// Client → server ("received" in Istio's naming).
    pub to_server: Counter,
    /// Server → client ("sent" in Istio's naming).
    pub to_client: Counter,
}

/// The counters of one label set, resolved once and shared by every connection that has the
/// same label set: a connection holds one `Arc` of it instead of its own copy of twenty label
/// strings, and opening or closing it costs no label lookup.
#[derive(Debug)]
pub struct ConnSeries {
    pub labels: ConnLabels,
    opened: Counter,
    closed: Counter,
    pub bytes: ByteCounters,
}

impl ConnSeries {
    pub(super) fn new(metrics: &Metrics, labels: ConnLabels) -> Self {
        ConnSeries {
            opened: metrics.connections_opened.get_or_create(&labels).clone(),
            closed: metrics.connections_closed.get_or_create(&labels).clone(),
            bytes: ByteCounters {
                to_server: metrics.received_bytes.get_or_create(&labels).clone(),
                to_client: metrics.sent_bytes.get_or_create(&labels).clone(),
            },
            labels,
        }
    }
}

pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    series: Arc<ConnSeries>,
    entry: AccessLogEntry,
    start: Instant,
    failure: Option<(ResponseFlags, String)>,
    /// Whether `series` has counted the connection opened.
    counted: bool,
}

impl ConnectionGuard {
    /// A guard for a connection counted opened now, under `labels`.
    pub fn open(metrics: Arc<Metrics>, labels: ConnLabels, entry: AccessLogEntry) -> Self {
        let mut guard = Self::pending(metrics, labels, entry);
        guard.confirm();
        guard
    }

    /// A guard for a connection whose destination is named only once it is connected
    /// (through a network's gateway, by the answer's `baggage`): it counts the connection
    /// opened at [`ConnectionGuard::confirm`], or at its end if it never got that far, under
    /// the labels it has by then, so its opened and closed counts stay in one series.
    pub fn pending(metrics: Arc<Metrics>, labels: ConnLabels, entry: AccessLogEntry) -> Self {
        let series = metrics.series(labels);
        metrics.live_connections.inc();
        ConnectionGuard {
            metrics,
            series,
            entry,
            start: Instant::now(),
            failure: None,
            counted: false,
        }
    }

    pub fn labels(&self) -> &ConnLabels {
        &self.series.labels
    }

    /// New labels for a pending guard (ignored once it has counted the connection opened).
    pub fn relabel(&mut self, labels: ConnLabels) {
        if !self.counted {
            self.series = self.metrics.series(labels);
        }
    }

    /// Counts a pending guard's connection opened; call before relaying its bytes, which go
    /// to the series of the labels it has now.
    pub fn confirm(&mut self) {
        if !self.counted {
            self.series.opened.inc();
            self.counted = true;
        }
    }

    pub fn counters(&self) -> &ByteCounters {
        &self.series.bytes
    }

    /// Totals for the access log, as counted by the relay.
    pub fn set_bytes(&mut self, to_server: u64, to_client: u64) {
        self.entry.bytes_to_server = to_server;
        self.entry.bytes_to_client = to_client;
    }

    /// Marks the connection failed; the last call wins.
    pub fn fail(&mut self, flags: ResponseFlags, error: impl Display) {
        self.failure = Some((flags, error.to_string()));
    }

    /// Records an error in the access log without counting the connection as failed: it was
    /// established and carried bytes, then ended abnormally (e.g. a reset).
    pub fn note_error(&mut self, error: impl Display) {
        self.entry.error = Some(error.to_string());
    }

    pub fn entry_mut(&mut self) -> &mut AccessLogEntry {
        &mut self.entry
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.confirm();
        self.entry.duration = self.start.elapsed();
        self.metrics.live_connections.dec();
        match self.failure.take() {
            None => {
                self.series.closed.inc();
            }
            Some((flags, error)) => {
                // Failures are the rare path: their label sets are looked up here, not cached.
                let mut labels = self.series.labels.clone();
                labels.response_flags = flags;
                self.metrics.connections_closed.get_or_create(&labels).inc();
                self.metrics.connections_failed.get_or_create(&labels).inc();
                self.entry.error = Some(error);
                self.entry.response_flags = flags;
            }
        }
        access_log::emit(&self.entry, &self.series.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::access_log::Direction;
    use crate::metrics::labels::{Peers, Reporter};
    use crate::state::Workload;

    fn opened_lines(m: &Metrics) -> Vec<String> {
        let text = m.encode(false).expect("encodes");
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{") && !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_pending_connection_is_counted_once_under_the_labels_it_ends_up_with() {
        let m = Arc::new(Metrics::new());
        let none = Peers {
            source: None,
            source_identity: None,
            destination: None,
            destination_identity: None,
            destination_service: None,
        };
        let labels = ConnLabels::new(Reporter::source, &none, true);
        let addr = "10.250.1.2:1000".parse().expect("address");
        let entry = || AccessLogEntry::new(Direction::Outbound, addr, addr);

        let mut g = ConnectionGuard::pending(m.clone(), labels.clone(), entry());
        assert!(opened_lines(&m).is_empty(), "not counted before confirm");
        let b1 = Workload {
            workload_name: "b1".into(),
            namespace: "shop".into(),
            ..Workload::default()
        };
        g.relabel(g.labels().with_destination(&b1));
        g.confirm();
        g.relabel(labels.clone()); // too late: ignored
        drop(g);
        let lines = opened_lines(&m);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("destination_workload=\"b1\""),
            "{lines:?}"
        );
        assert!(lines[0].ends_with(" 1"), "{lines:?}");

        // Never confirmed (it failed before the answer): counted at its end, as it was.
        drop(ConnectionGuard::pending(m.clone(), labels, entry()));
        let lines = opened_lines(&m);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("destination_workload=\"unknown\"") && l.ends_with(" 1")),
            "{lines:?}"
        );
    }
}
