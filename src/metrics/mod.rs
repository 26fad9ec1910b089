//! Prometheus metrics with Istio's names and labels, so existing dashboards work unchanged.
//!
//! Per-connection label sets are resolved once, when a connection starts (see
//! [`connection::ConnectionGuard`]); the data path then bumps a plain atomic per read.

pub mod access_log;
pub mod connection;
pub mod labels;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use connection::ConnSeries;
pub use labels::ConnLabels;

/// An xDS resource type, as ztunnel labels its xDS metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeUrlLabels {
    pub url: String,
}

/// Why an xDS stream ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminationLabels {
    pub reason: Termination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Termination {
    /// Could not connect, or the stream broke.
    ConnectionError,
    /// The server ended the stream with an error status.
    Error,
    /// The server closed the stream cleanly.
    Complete,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    #[allow(non_camel_case_types)]
    accepted,
    #[allow(non_camel_case_types)]
    rejected,
}

/// Which of weft's limits was reached (`config::Limits`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// Which side of an HBONE TLS handshake weft was on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (weft served it) or `outbound` (weft opened it; a double-HBONE connection
    /// counts its outer and its inner handshake).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Every metric weft exports.
pub struct Metrics {
    registry: Registry,
    pub connections_opened: Family<ConnLabels, Counter>,
    pub connections_closed: Family<ConnLabels, Counter>,
    pub connections_failed: Family<ConnLabels, Counter>,
    pub sent_bytes: Family<ConnLabels, Counter>,
    pub received_bytes: Family<ConnLabels, Counter>,
    pub captured_pods: Gauge,
    pub policies: Gauge,
    pub config_reloads: Family<OutcomeLabels, Counter>,
    pub connections_closed_by_policy: Counter,
    pub certificate_expiry_seconds: Family<IdentityLabels, Gauge<f64, AtomicU64>>,
    pub open_fds: Gauge,
    pub worker_threads: Gauge,
    /// xDS responses received, and their encoded size, per type (ztunnel's names).
    pub xds_messages: Family<TypeUrlLabels, Counter>,
    pub xds_message_bytes: Family<TypeUrlLabels, Counter>,
    pub xds_terminations: Family<TerminationLabels, Counter>,
    /// Resources refused (NACKed) per type.
    pub xds_rejected: Family<TypeUrlLabels, Counter>,
    /// Times a limit refused or closed something, per limit.
    pub limits_reached: Family<LimitLabels, Counter>,
    /// HBONE connections held now.
    pub hbone_connections: Gauge,
    /// Bytes read from apps that HTTP/2 has not yet written to TLS.
    pub buffered_bytes: Gauge,
    /// Completed HBONE TLS handshakes: what pooling saves.
    pub hbone_handshakes: Family<HandshakeLabels, Counter>,
    /// Proxied connections (either direction) open now: what a drain waits for.
    pub live_connections: Gauge,
    /// The DNS proxy's families.
    pub dns: crate::dns::metrics::DnsMetrics,
    /// Serialises scrapes so the process gauges are set and read as one.
    scrape: Mutex<()>,
    /// Every connection label set seen, with its counters. Like the families above it only
    /// grows: a series, once exported, stays.
    series: RwLock<HashMap<ConnLabels, Arc<ConnSeries>>>,
    /// Label sets naming a workload that is gone, and since when (see [`Metrics::forget_departed`]).
    departed: Mutex<HashMap<ConnLabels, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one completed HBONE handshake (`inbound` or `outbound`).
    pub fn handshake_completed(&self, direction: &'static str) {
        self.hbone_handshakes
            .get_or_create(&HandshakeLabels { direction })
            .inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_failed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            captured_pods: Gauge::default(),
            policies: Gauge::default(),
            config_reloads: Family::default(),
            connections_closed_by_policy: Counter::default(),
            certificate_expiry_seconds: Family::default(),
            open_fds: Gauge::default(),
            worker_threads: Gauge::default(),
            xds_messages: Family::default(),
            xds_message_bytes: Family::default(),
            xds_terminations: Family::default(),
            xds_rejected: Family::default(),
            limits_reached: Family::default(),
            hbone_connections: Gauge::default(),
            buffered_bytes: Gauge::default(),
            hbone_handshakes: Family::default(),
            live_connections: Gauge::default(),
            dns: Default::default(),
            scrape: Mutex::new(()),
            series: RwLock::default(),
            departed: Mutex::default(),
            registry: Registry::default(),
        };
        // Istio's names; prometheus-client appends `_total` to counters.
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.connections_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.connections_closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "TCP connections that failed (denied, upstream unreachable, tunnel refused)",
            m.connections_failed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent during response (server to client)",
            m.sent_bytes.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received during request (client to server)",
            m.received_bytes.clone(),
        );
        istio.register(
            "xds_message",
            "xDS responses received, by type",
            m.xds_messages.clone(),
        );
        istio.register_with_unit(
            "xds_message",
            "Bytes of xDS resources received, by type",
            prometheus_client::registry::Unit::Bytes,
            m.xds_message_bytes.clone(),
        );
        istio.register(
            "xds_connection_terminations",
            "xDS streams that ended, by reason",
            m.xds_terminations.clone(),
        );
        m.dns.register_istio(istio);
        let weft = registry.sub_registry_with_prefix("weft");
        m.dns.register_weft(weft);
        weft.register(
            "xds_rejected_resources",
            "xDS resources refused (NACKed), by type; their last good version stays in force",
            m.xds_rejected.clone(),
        );
        weft.register(
            "captured_pods",
            "Pods captured by this node",
            m.captured_pods.clone(),
        );
        weft.register(
            "policies",
            "Authorization policies in force",
            m.policies.clone(),
        );
        weft.register(
            "config_reloads",
            "Configuration reloads by outcome",
            m.config_reloads.clone(),
        );
        weft.register(
            "connections_closed_by_policy",
            "Live connections closed because a policy change denies them",
            m.connections_closed_by_policy.clone(),
        );
        weft.register(
            "certificate_expiry_seconds",
            "Seconds until each workload certificate expires",
            m.certificate_expiry_seconds.clone(),
        );
        weft.register(
            "limit_reached",
            "Connections, streams or connects refused or closed because a limit was reached, per limit",
            m.limits_reached.clone(),
        );
        weft.register(
            "hbone_connections",
            "Inbound HBONE connections held now",
            m.hbone_connections.clone(),
        );
        weft.register(
            "buffered_bytes",
            "Bytes read from apps on their way into HBONE that HTTP/2 has not yet written to TLS",
            m.buffered_bytes.clone(),
        );
        weft.register(
            "hbone_handshakes",
            "HBONE TLS handshakes completed, inbound (served) and outbound (opened)",
            m.hbone_handshakes.clone(),
        );
        weft.register(
            "connections_active",
            "Proxied connections open now, inbound and outbound",
            m.live_connections.clone(),
        );
        let process = registry.sub_registry_with_prefix("process");
        process.register("open_fds", "Open file descriptors", m.open_fds.clone());
        let rt = registry.sub_registry_with_prefix("tokio");
        rt.register(
            "workers",
            "Runtime worker threads",
            m.worker_threads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text format (OpenMetrics when `openmetrics` is asked for).
    /// Sets `weft_certificate_expiry_seconds` to exactly the certificates held now: the series
    /// of an identity weft no longer holds goes with it.
    pub fn set_certificate_expiry(&self, held: impl IntoIterator<Item = (String, f64)>) {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.certificate_expiry_seconds.clear();
        for (identity, seconds) in held {
            self.certificate_expiry_seconds
                .get_or_create(&IdentityLabels { identity })
                .set(seconds);
        }
    }

    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.worker_threads.set(h.metrics().num_workers() as i64);
        }
        encode_registry(&self.registry, openmetrics)
    }

    /// The shared counters of a connection label set.
    pub fn series(&self, labels: ConnLabels) -> Arc<ConnSeries> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&labels)
        {
            return s.clone();
        }
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        all.entry(labels.clone())
            .or_insert_with(|| Arc::new(ConnSeries::new(self, labels)))
            .clone()
    }

    /// Drops the connection series of workloads that are gone, so that cardinality follows the
    /// workloads there are, not every pod that ever ran. A label set goes once its source or
    /// destination workload (by namespace and name; `present` says which exist) has been gone
    /// for `retention` and no connection uses it; it is removed from every family, with its
    /// failure variants. Returns how many label sets were removed.
    pub fn forget_departed(
        &self,
        present: impl Fn(&str, &str) -> bool,
        retention: Duration,
    ) -> usize {
        let now = Instant::now();
        let gone = |ns: &str, name: &str| name != labels::UNKNOWN && !present(ns, name);
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        let mut expired = Vec::new();
        {
            let all = self.series.read().unwrap_or_else(|p| p.into_inner());
            departed.retain(|l, _| all.contains_key(l));
            for (l, series) in all.iter() {
                if !(gone(&l.source_workload_namespace, &l.source_workload)
                    || gone(&l.destination_workload_namespace, &l.destination_workload))
                {
                    departed.remove(l);
                    continue;
                }
                let since = *departed.entry(l.clone()).or_insert(now);
                // The map's own reference is the only one: no live connection has this set.
                if now.duration_since(since) >= retention && Arc::strong_count(series) == 1 {
                    expired.push(l.clone());
                }
            }
        }
        if expired.is_empty() {
            return 0;
        }
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0;
        for l in expired {
            // Taken again under the write lock: a connection may have started meanwhile.
            if all.get(&l).is_some_and(|s| Arc::strong_count(s) > 1) {
                continue;
            }
            all.remove(&l);
            departed.remove(&l);
            for flags in labels::ResponseFlags::ALL {
                let variant = ConnLabels {
                    response_flags: flags,
                    ..l.clone()
                };
                self.connections_opened.remove(&variant);
                self.connections_closed.remove(&variant);
                self.connections_failed.remove(&variant);
                self.sent_bytes.remove(&variant);
                self.received_bytes.remove(&variant);
            }
            removed += 1;
        }
        removed
    }

    pub fn record_reload(&self, ok: bool) {
        let outcome = if ok {
            Outcome::accepted
        } else {
            Outcome::rejected
        };
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

impl crate::state::local::ReloadObserver for Metrics {
    fn reloaded(&self, ok: bool) {
        self.record_reload(ok);
    }
}

/// A registry in OpenMetrics, or in the classic text format (which has no `# EOF`).
pub fn encode_registry(registry: &Registry, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    encode(&mut out, registry)?;
    if !openmetrics {
        if let Some(stripped) = out.strip_suffix("# EOF\n") {
            out.truncate(stripped.len());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_expiry_keeps_only_the_identities_held() {
        let m = Metrics::new();
        let a = "spiffe://cluster.local/ns/a/sa/a".to_owned();
        let b = "spiffe://cluster.local/ns/b/sa/b".to_owned();
        m.set_certificate_expiry([(a.clone(), 100.0), (b.clone(), 200.0)]);
        let text = m.encode(false).expect("encodes");
        assert!(text.contains(&a) && text.contains(&b), "{text}");
        m.set_certificate_expiry([(a.clone(), 90.0)]);
        let text = m.encode(false).expect("encodes");
        assert!(text.contains(&format!("identity=\"{a}\"}} 90")), "{text}");
        assert!(
            !text.contains(&b),
            "a released identity keeps its series:\n{text}"
        );
    }
}
