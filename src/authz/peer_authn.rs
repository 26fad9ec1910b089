//! Istio's `PeerAuthentication` (`security.istio.io`) at L4, for the Kubernetes-direct mode.
//!
//! In ambient mode PeerAuthentication only decides whether plaintext may reach a workload
//! (through 15006): STRICT refuses it, PERMISSIVE and DISABLE admit it (HBONE is always mTLS).
//! istiod does not send PeerAuthentications to a node proxy; it turns them into DENY
//! authorization policies and lists, on each workload, which of them apply. weft's Kubernetes
//! source does the same here, so that a workload reaches the same decision whichever source
//! configures weft:
//!
//! - one mesh-wide static policy, [`STATIC_STRICT`] in the root namespace, present as soon as
//!   any PeerAuthentication exists: deny connections without a peer identity;
//! - for a workload-selector PeerAuthentication with port-level modes that make a difference,
//!   a policy `converted_peer_authentication_<name>` in its namespace, with the effective
//!   mesh/namespace mode merged in (a connection matching any DENY policy is refused, so the
//!   static policy and a port exception cannot both be attached);
//! - per workload, the keys of those that apply ([`PeerAuthns::policy_keys`]).
//!
//! Precedence is Istio's: workload (selector) over namespace over mesh (root namespace, no
//! selector); UNSET inherits; when several apply at one level, the oldest wins.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::matcher::StringMatch;
use super::model::{Action, Clause, Match, Policy, Rule, Scope};

/// The name of the mesh-wide "mTLS required" policy.
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
/// Prefix of the policy derived from one workload-selector PeerAuthentication.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";
const API_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `spec.mtls.mode`, and the mode of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the level above.
    #[default]
    Unset,
    /// Plaintext admitted; in ambient mode the same as PERMISSIVE.
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    fn is_strict(self) -> bool {
        self == MtlsMode::Strict
    }
    fn is_unset(self) -> bool {
        self == MtlsMode::Unset
    }
    fn admits_plaintext(self) -> bool {
        matches!(self, MtlsMode::Permissive | MtlsMode::Disable)
    }
}

/// One PeerAuthentication, as far as L4 needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthn {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, UTC): ordering decides between conflicting
    /// policies of one level. Missing sorts first.
    pub created: String,
    /// `spec.selector.matchLabels`; `None` without a `selector` field.
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthn {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Without a selector, or with one that has no labels: namespace-wide (mesh-wide in the
    /// root namespace) for the choice of the effective level.
    fn is_namespace_wide(&self) -> bool {
        self.selector.as_ref().is_none_or(BTreeMap::is_empty)
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Older first; the key breaks ties so the choice never depends on listing order.
    fn older_than(&self, other: &PeerAuthn) -> bool {
        (self.created.as_str(), self.key()) < (other.created.as_str(), other.key())
    }

    fn converted_name(&self) -> String {
        format!("{CONVERTED_PREFIX}{}", self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("peer authentication {key}: {reason}")]
pub struct PeerAuthnError {
    pub key: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<ModeField>,
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<String, ModeField>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ModeField {
    #[serde(default)]
    mode: Option<MtlsMode>,
}

/// Reads one PeerAuthentication object (the JSON a watcher hands over).
pub fn from_k8s_value(v: &Value) -> Result<PeerAuthn, PeerAuthnError> {
    let meta = v.get("metadata");
    let text = |field: &str| {
        meta.and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let name = text("name").unwrap_or("<unnamed>").to_owned();
    let namespace = text("namespace").unwrap_or("default").to_owned();
    let err = |reason: String| PeerAuthnError {
        key: format!("{namespace}/{name}"),
        reason,
    };
    if let Some(a) = v.get("apiVersion").and_then(Value::as_str) {
        if !API_VERSIONS.contains(&a) {
            return Err(err(format!("apiVersion {a:?} is not security.istio.io")));
        }
    }
    if text("name").is_none() {
        return Err(err("metadata.name missing".into()));
    }
    let spec: Spec = match v.get("spec") {
        None | Some(Value::Null) => Spec {
            selector: None,
            mtls: None,
            port_level_mtls: None,
        },
        Some(s) => Spec::deserialize(s).map_err(|e| err(format!("spec: {e}")))?,
    };
    let mut ports = BTreeMap::new();
    for (port, m) in spec.port_level_mtls.unwrap_or_default() {
        let n: u16 = port.parse().ok().filter(|&n| n != 0).ok_or_else(|| {
            err(format!(
                "spec.portLevelMtls: {port:?} is not a port (1-65535)"
            ))
        })?;
        ports.insert(n, m.mode.unwrap_or_default());
    }
    let selector = spec.selector.map(|s| s.match_labels.unwrap_or_default());
    if !ports.is_empty() && selector.as_ref().is_none_or(BTreeMap::is_empty) {
        // Istio's validation refuses it too: port numbers only mean something for the pods a
        // selector picks.
        return Err(err(
            "spec.portLevelMtls needs spec.selector.matchLabels (Istio refuses it otherwise)"
                .into(),
        ));
    }
    Ok(PeerAuthn {
        created: text("creationTimestamp").unwrap_or_default().to_owned(),
        mode: spec.mtls.and_then(|m| m.mode).unwrap_or_default(),
        namespace,
        name,
        selector,
        ports,
    })
}

/// All PeerAuthentications of the cluster, and what they mean for authorization.
#[derive(Debug, Default)]
pub struct PeerAuthns {
    root_namespace: String,
    all: Vec<PeerAuthn>,
}

impl PeerAuthns {
    pub fn new(root_namespace: &str, all: Vec<PeerAuthn>) -> Self {
        PeerAuthns {
            root_namespace: root_namespace.to_owned(),
            all,
        }
    }

    /// The oldest policy without a `selector` field in `namespace` (the namespace's policy, or
    /// the mesh's in the root namespace), as istiod picks the parent of a workload policy.
    fn namespace_policy(&self, namespace: &str) -> Option<&PeerAuthn> {
        self.all
            .iter()
            .filter(|p| p.namespace == namespace && p.selector.is_none())
            .reduce(|a, b| if b.older_than(a) { b } else { a })
    }

    /// The authorization policies PeerAuthentication contributes: the static STRICT one (when
    /// any PeerAuthentication exists) and one per workload policy whose ports need it.
    pub fn derived_policies(&self) -> Vec<Policy> {
        if self.all.is_empty() {
            return Vec::new();
        }
        let mut out = vec![Policy {
            name: STATIC_STRICT.to_owned(),
            namespace: self.root_namespace.clone(),
            scope: Scope::WorkloadSelector {
                match_labels: BTreeMap::new(),
            },
            action: Action::Deny,
            rules: vec![Rule {
                clauses: vec![no_identity()],
            }],
            dry_run: false,
            warnings: Vec::new(),
        }];
        out.extend(self.all.iter().filter_map(|pa| self.convert(pa)));
        out
    }

    /// The policy derived from one workload-selector PeerAuthentication, or None when its
    /// ports change nothing that the static policy (or no policy) does not already say.
    fn convert(&self, pa: &PeerAuthn) -> Option<Policy> {
        if pa.namespace == self.root_namespace || pa.selector.is_none() || pa.ports.is_empty() {
            return None;
        }
        let ns = self.namespace_policy(&pa.namespace).map(|p| p.mode);
        let root = self.namespace_policy(&self.root_namespace).map(|p| p.mode);
        let ns_strict = ns.is_some_and(MtlsMode::is_strict);
        let root_strict = root.is_some_and(MtlsMode::is_strict);
        let ns_silent = ns.is_none_or(MtlsMode::is_unset);
        // These conditions are istiod's as it evaluates them (the mesh's STRICT counts for a
        // STRICT port even under a workload mode that is set; an UNSET namespace policy stops
        // a port exception from inheriting the mesh's STRICT): copied in meaning so that both
        // sources reach the same decision for every combination.
        let strict_port_covered =
            pa.mode.is_strict() || (pa.mode.is_unset() && ns_strict) || (ns_silent && root_strict);
        let exception_matters = pa.mode.is_strict()
            || (pa.mode.is_unset() && (ns_strict || (ns.is_none() && root_strict)));
        let merge_strict = ns_strict || (root_strict && ns_silent);

        let mut clauses = Vec::new();
        let mut port_rules = Vec::new();
        if pa.mode.is_strict() {
            clauses.push(no_identity());
        }
        let mut exempted = false;
        for (&port, &mode) in &pa.ports {
            if mode.is_strict() {
                if strict_port_covered {
                    continue;
                }
                port_rules.push(Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            not_principals: vec![StringMatch::Presence],
                            destination_ports: vec![port],
                            ..Match::default()
                        }],
                    }],
                });
            } else if mode.admits_plaintext() && exception_matters {
                exempted = true;
                clauses.push(Clause {
                    matches: vec![Match {
                        not_destination_ports: vec![port],
                        ..Match::default()
                    }],
                });
            }
        }
        if pa.mode.is_strict() && !exempted {
            return None;
        }
        if clauses.is_empty() && port_rules.is_empty() {
            return None;
        }
        // Exceptions under an inherited STRICT carry that strictness with them: the static
        // policy is then not attached to the workload.
        if merge_strict && exempted && !pa.mode.is_strict() {
            clauses.push(no_identity());
        }
        let mut rules = port_rules;
        if !clauses.is_empty() {
            rules.push(Rule { clauses });
        }
        Some(Policy {
            name: pa.converted_name(),
            namespace: pa.namespace.clone(),
            scope: Scope::WorkloadSelector {
                match_labels: BTreeMap::new(),
            },
            action: Action::Deny,
            rules,
            dry_run: false,
            warnings: Vec::new(),
        })
    }

    /// The keys (`namespace/name`) of the derived policies that apply to a workload with
    /// `labels` in `namespace`: what istiod lists in the workload's `authorization_policies`.
    pub fn policy_keys(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let applicable = self.all.iter().filter(|p| {
            if p.namespace == namespace {
                p.selects(labels)
            } else {
                p.namespace == self.root_namespace && p.selector.is_none()
            }
        });
        let (mut mesh, mut ns, mut workload) = (None, None, None);
        for p in applicable {
            if p.is_namespace_wide() {
                if p.namespace == self.root_namespace {
                    oldest(&mut mesh, p);
                } else {
                    oldest(&mut ns, p);
                }
            } else if p.namespace != self.root_namespace {
                oldest(&mut workload, p);
            }
        }
        let mut strict = mesh.is_some_and(|p| p.mode.is_strict());
        if let Some(p) = ns.filter(|p| !p.mode.is_unset()) {
            strict = p.mode.is_strict();
        }
        let mut converted = None;
        if let Some(w) = workload {
            if w.mode.is_strict() {
                strict = true;
            } else if w.mode.admits_plaintext() {
                strict = false;
            }
            if !w.ports.is_empty() {
                let any = |f: fn(MtlsMode) -> bool| w.ports.values().any(|&m| f(m));
                let needs_own = match w.mode {
                    MtlsMode::Strict => any(MtlsMode::admits_plaintext),
                    MtlsMode::Permissive | MtlsMode::Disable => any(MtlsMode::is_strict),
                    // Istio checks only for PERMISSIVE ports here (not DISABLE) under an
                    // inherited STRICT; kept, so both sources decide alike.
                    MtlsMode::Unset if strict => any(|m| m == MtlsMode::Permissive),
                    MtlsMode::Unset => {
                        strict = false;
                        any(MtlsMode::is_strict)
                    }
                };
                if needs_own {
                    converted = Some(format!("{}/{}", w.namespace, w.converted_name()));
                    // The converted policy then carries the workload's STRICT itself.
                    if w.mode != MtlsMode::Permissive && w.mode != MtlsMode::Disable {
                        strict = false;
                    }
                }
            }
        }
        let mut keys: Vec<String> = strict
            .then(|| format!("{}/{STATIC_STRICT}", self.root_namespace))
            .into_iter()
            .chain(converted)
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Keeps in `slot` the older of it and `p`.
fn oldest<'a>(slot: &mut Option<&'a PeerAuthn>, p: &'a PeerAuthn) {
    if slot.is_none_or(|cur| p.older_than(cur)) {
        *slot = Some(p);
    }
}

/// A clause matching connections without a peer identity (plaintext).
fn no_identity() -> Clause {
    Clause {
        matches: vec![Match {
            not_principals: vec![StringMatch::Presence],
            ..Match::default()
        }],
    }
}

#[cfg(test)]
mod tests;
