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
}

impl ConnectionGuard {
    pub fn open(metrics: Arc<Metrics>, labels: ConnLabels, entry: AccessLogEntry) -> Self {
        let series = metrics.series(labels);
        series.opened.inc();
        metrics.live_connections.inc();
        ConnectionGuard {
            metrics,
            series,
            entry,
            start: Instant::now(),
            failure: None,
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
