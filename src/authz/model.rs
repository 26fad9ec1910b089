//! The internal policy model both input forms are converted into.
//!
//! It is shaped after ztunnel's `Authorization` (rules → clauses → matches)
//! because that nesting can express everything the Kubernetes form can, while
//! the Kubernetes form (`from`/`to`/`when`) cannot express every ztunnel
//! policy. Converting both into this one shape keeps evaluation in one place
//! and loses nothing from either form.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Serialize;

use super::matcher::{ServiceAccountMatch, StringMatch};

/// One authorization policy, ready to be evaluated.
///
/// Exists as the single representation the evaluator, the admin
/// `/config_dump` and both loaders agree on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// The policy matches when any rule matches. An empty list never matches
    /// (Istio: an ALLOW policy with no rules allows nothing).
    pub rules: Vec<Rule>,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
    /// Everything the loader had to drop or reinterpret to enforce the policy
    /// at L4. Kept with the policy so the admin page shows it next to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Policy {
    /// The `namespace/name` key used in logs, decisions and workload references.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Which workloads a policy applies to.
///
/// Exists because Istio selects policies in three different ways, and the
/// evaluator indexes each differently.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// Every workload in the mesh. A namespace-wide policy in the root
    /// namespace is promoted to this by [`super::PolicySet::new`].
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads whose labels contain all of `match_labels`: in the policy's
    /// namespace, or in every namespace when the policy lives in the root
    /// namespace. An empty map selects nothing by labels: such a policy only
    /// applies to workloads that name it (ztunnel's local config has no labels;
    /// the control plane lists the policies of each workload instead).
    #[serde(rename_all = "camelCase")]
    WorkloadSelector {
        match_labels: BTreeMap<String, String>,
    },
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A conjunction of clauses: the rule matches when every clause matches.
/// A rule with no clause matches every connection (Istio's `- {}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// A disjunction of matches: the clause matches when any match does.
/// A clause with no match matches every connection.
///
/// A Kubernetes rule's `from` becomes one clause (one match per source), its
/// `to` another, and each `when` condition one more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// A conjunction of attribute conditions: every non-empty field must hold.
///
/// For each attribute the positive list must contain a hit (if not empty) and
/// the negative list must contain none. An absent attribute (no identity on a
/// plaintext connection) hits no pattern, so a positive list fails and a
/// negative list holds: `notPrincipals: ["*"]` matches plaintext traffic.
///
/// A match with no field at all never matches, as in ztunnel: an empty match
/// can only come from a mistake, and it must not silently match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Checked against the connection's source IP as seen by the destination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// A warning for each principal pattern written as a `spiffe://` URI: compared as written
    /// against principals that have no such prefix, it never matches (Istio's semantics).
    pub fn spiffe_uri_warnings(&self, at: &str) -> Vec<String> {
        self.principals
            .iter()
            .chain(&self.not_principals)
            .filter(|p| p.is_spiffe_uri())
            .map(|p| format!("{at}: principal {p:?} starts with spiffe:// and never matches; write it without (e.g. cluster.local/ns/NS/sa/SA)"))
            .collect()
    }

    /// True when no condition is set (see the type's docs for what that means).
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}
