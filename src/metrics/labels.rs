//! The label set of Istio's TCP metrics, built once per connection.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

use crate::identity::Identity;
use crate::state::{Service, Workload};

/// The value of a label weft could not resolve, as Istio writes it.
pub const UNKNOWN: &str = "unknown";

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Istio's `response_flags`: `-` for a normal connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    /// Denied by authorization policy.
    Deny,
    /// The upstream (tunnel or app) could not be reached or refused the tunnel.
    Connect,
}

impl ResponseFlags {
    pub const ALL: [ResponseFlags; 3] = [
        ResponseFlags::None,
        ResponseFlags::Deny,
        ResponseFlags::Connect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

/// Who was on each end, as far as weft could tell.
pub struct Peers<'a> {
    pub source: Option<&'a Workload>,
    /// The proven (mTLS) or configured identity of the source.
    pub source_identity: Option<&'a Identity>,
    pub destination: Option<&'a Workload>,
    pub destination_identity: Option<&'a Identity>,
    pub destination_service: Option<&'a Service>,
}

impl ConnLabels {
    pub fn new(reporter: Reporter, peers: &Peers<'_>, mtls: bool) -> Self {
        let wl = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map_or_else(|| UNKNOWN.to_string(), |w| or_unknown(f(w)))
        };
        let id = |i: Option<&Identity>| i.map_or_else(|| UNKNOWN.to_string(), |i| i.to_string());
        let (src, dst) = (peers.source, peers.destination);
        let svc = peers.destination_service;
        let mut labels = ConnLabels {
            reporter,
            source_workload: wl(src, |w| w.workload_name_or_name()),
            source_canonical_service: wl(src, |w| w.app()),
            source_canonical_revision: wl(src, |w| revision(w)),
            source_workload_namespace: wl(src, |w| &w.namespace),
            source_principal: id(peers.source_identity),
            source_app: wl(src, |w| w.app()),
            source_version: wl(src, |w| revision(w)),
            source_cluster: wl(src, |w| &w.cluster_id),
            destination_service: svc
                .map_or_else(|| UNKNOWN.to_string(), |s| or_unknown(&s.hostname)),
            destination_service_namespace: svc
                .map_or_else(|| UNKNOWN.to_string(), |s| or_unknown(&s.namespace)),
            destination_service_name: svc
                .map_or_else(|| UNKNOWN.to_string(), |s| or_unknown(&s.name)),
            // Filled in below, in the one place that derives them.
            destination_workload: String::new(),
            destination_canonical_service: String::new(),
            destination_canonical_revision: String::new(),
            destination_workload_namespace: String::new(),
            destination_principal: id(peers.destination_identity),
            destination_app: String::new(),
            destination_version: String::new(),
            destination_cluster: String::new(),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None,
            connection_security_policy: if mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
        };
        labels.set_destination(dst);
        labels
    }

    /// The same labels with the destination workload's fields taken from `dst` (one known
    /// only by its description, e.g. from `baggage`).
    pub fn with_destination(&self, dst: &Workload) -> Self {
        let mut labels = self.clone();
        labels.set_destination(Some(dst));
        labels
    }

    fn set_destination(&mut self, dst: Option<&Workload>) {
        let wl = |f: fn(&Workload) -> &str| {
            dst.map_or_else(|| UNKNOWN.to_string(), |w| or_unknown(f(w)))
        };
        self.destination_workload = wl(|w| w.workload_name_or_name());
        self.destination_canonical_service = wl(|w| w.app());
        self.destination_canonical_revision = wl(|w| revision(w));
        self.destination_workload_namespace = wl(|w| &w.namespace);
        self.destination_app = wl(|w| w.app());
        self.destination_version = wl(|w| revision(w));
        self.destination_cluster = wl(|w| &w.cluster_id);
    }
}

fn revision(w: &Workload) -> &str {
    if w.canonical_revision.is_empty() {
        "latest"
    } else {
        &w.canonical_revision
    }
}
