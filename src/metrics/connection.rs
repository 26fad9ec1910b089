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

pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    counters: ByteCounters,
    entry: AccessLogEntry,
    start: Instant,
    failure: Option<(ResponseFlags, String)>,
}

impl ConnectionGuard {
    pub fn open(metrics: Arc<Metrics>, labels: ConnLabels, entry: AccessLogEntry) -> Self {
        metrics.connections_opened.get_or_create(&labels).inc();
        let counters = ByteCounters {
            to_server: metrics.received_bytes.get_or_create(&labels).clone(),
            to_client: metrics.sent_bytes.get_or_create(&labels).clone(),
        };
        ConnectionGuard {
            metrics,
            labels,
            counters,
            entry,
            start: Instant::now(),
            failure: None,
        }
    }

    pub fn counters(&self) -> &ByteCounters {
        &self.counters
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
        match self.failure.take() {
            None => {
                self.metrics
                    .connections_closed
                    .get_or_create(&self.labels)
                    .inc();
            }
            Some((flags, error)) => {
                let mut labels = self.labels.clone();
                labels.response_flags = flags;
                self.metrics.connections_closed.get_or_create(&labels).inc();
                self.metrics.connections_failed.get_or_create(&labels).inc();
                self.entry.error = Some(error);
                self.entry.response_flags = flags;
            }
        }
        access_log::emit(&self.entry);
    }
}
