//! The DNS proxy's metrics: Istio's names and labels (as ztunnel exports them), and weft's
//! count of packets that were not DNS.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::state::Workload;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DnsProtocol {
    udp,
    tcp,
}

/// `request_query_type` (lowercase: `a`, `aaaa`, ...), `request_protocol`, and the asking
/// workload's canonical service and revision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub request_query_type: String,
    pub request_protocol: DnsProtocol,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// A lookup of an endpoint's hostname: who connected, and the name (ztunnel's labels).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OnDemandLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub hostname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MalformedLabels {
    pub request_protocol: DnsProtocol,
}

/// ztunnel's upstream-duration buckets.
const DURATION_BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

#[derive(Clone)]
pub struct DnsMetrics {
    /// Every well-formed query, answered from state or forwarded.
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    /// Forwarded queries that got no usable answer (timeout, refused, unreachable, too many
    /// pending): the client got SERVFAIL.
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
    /// Packets dropped because they were not a DNS query.
    pub malformed: Family<MalformedLabels, Counter>,
    /// Lookups of endpoints known only by a hostname, made when a connection picked one.
    pub on_demand: Family<OnDemandLabels, Counter>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            malformed: Family::default(),
            on_demand: Family::default(),
        }
    }
}

impl DnsMetrics {
    pub fn on_demand_lookup(&self, source: &Workload, hostname: &str) {
        let name = source.workload_name_or_name();
        self.on_demand
            .get_or_create(&OnDemandLabels {
                source_workload: name.to_string(),
                source_canonical_service: source.app().to_string(),
                source_canonical_revision: source.canonical_revision.clone(),
                source_workload_namespace: source.namespace.clone(),
                source_principal: source.identity().to_string(),
                source_app: source.app().to_string(),
                source_version: source.canonical_revision.clone(),
                source_cluster: source.cluster_id.clone(),
                hostname: hostname.to_string(),
            })
            .inc();
    }

    /// Registers Istio's families (the registry prefixed `istio`).
    pub fn register_istio(&self, istio: &mut Registry) {
        istio.register(
            "dns_requests",
            "DNS queries received by the DNS proxy",
            self.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "DNS queries forwarded to the pod's upstream resolvers",
            self.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "Forwarded DNS queries that got no upstream answer (answered SERVFAIL)",
            self.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Time to the upstream resolver's answer",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        istio.register(
            "on_demand_dns",
            "Lookups of endpoints known only by a hostname, made when a connection picked one",
            self.on_demand.clone(),
        );
    }

    /// Registers weft's own (the registry prefixed `weft`).
    pub fn register_weft(&self, weft: &mut Registry) {
        weft.register(
            "dns_malformed_packets",
            "Packets on the DNS proxy's port that were not a DNS query; dropped",
            self.malformed.clone(),
        );
    }
}
