//! Selecting the policies that apply to a workload and deciding a connection.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use serde::Serialize;

use super::matcher::Facts;
use super::model::{Action, Policy, Scope};

/// The workload a connection is addressed to, as far as policy selection cares.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The workload's namespace.
    pub namespace: &'a str,
    /// The workload's labels, matched against `spec.selector.matchLabels`.
    pub labels: &'a BTreeMap<String, String>,
    /// `namespace/name` of policies attached to the workload by name. ztunnel's
    /// local config and xDS attach selector policies this way.
    pub policy_names: &'a [String],
}

/// What the destination knows about one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnFacts<'a> {
    /// The connection's source as seen by the destination: the HBONE peer's
    /// address, or the TCP peer for plaintext. (`remoteIpBlocks` and
    /// `remote.ip` are not L4 attributes; see `k8s_form`.)
    pub source_ip: IpAddr,
    /// The peer's SPIFFE identity without `spiffe://`, e.g.
    /// `cluster.local/ns/x/sa/y`. `None` for plaintext traffic.
    pub source_principal: Option<&'a str>,
    /// The peer's namespace. Ignored without a principal; when the principal
    /// has the `<td>/ns/<ns>/sa/<sa>` form its namespace wins.
    pub source_namespace: Option<&'a str>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// The enforced outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// `by` is the matching ALLOW policy, or `None` when no ALLOW policy
    /// applies to the workload (and no DENY matched).
    Allow { by: Option<String> },
    /// `by` is the matching DENY policy, or `None` when ALLOW policies apply
    /// to the workload but none matched.
    Deny { by: Option<String> },
}

/// What one dry-run policy would have done on its own: an ALLOW policy
/// would allow when it matches; a DENY policy would allow when it does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    pub policy: String,
    pub would_allow: bool,
}

/// The result of [`evaluate`]: the enforced verdict plus the would-be results
/// of dry-run policies, so callers can count them in metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRun>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow { .. })
    }

    /// The policy that decided, if a single one did.
    pub fn policy(&self) -> Option<&str> {
        match &self.verdict {
            Verdict::Allow { by } | Verdict::Deny { by } => by.as_deref(),
        }
    }
}

/// Index position of a policy in [`PolicySet`]'s entries.
type Idx = u32;

/// Selector policies of one namespace, indexed by one of their labels.
///
/// A workload can only match a selector if it carries each of its labels, so
/// filing every selector under one (key, value) pair and looking up the
/// workload's own pairs finds every candidate without scanning the others.
/// A policy is filed once, so a lookup never yields it twice.
#[derive(Debug, Default)]
struct SelectorIndex {
    by_label: HashMap<String, HashMap<String, Vec<Idx>>>,
}

impl SelectorIndex {
    fn insert(&mut self, labels: &BTreeMap<String, String>, idx: Idx) {
        // Callers only pass non-empty selectors.
        if let Some((k, v)) = labels.iter().next() {
            self.by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(idx);
        }
    }

    fn collect(&self, set: &PolicySet, labels: &BTreeMap<String, String>, out: &mut Vec<Idx>) {
        if self.by_label.is_empty() {
            return;
        }
        for (k, v) in labels {
            if let Some(found) = self.by_label.get(k).and_then(|vs| vs.get(v)) {
                out.extend(found.iter().copied().filter(|&i| {
                    set.entry(i)
                        .is_some_and(|e| selector_matches(&e.policy.scope, labels))
                }));
            }
        }
    }
}

fn selector_matches(scope: &Scope, labels: &BTreeMap<String, String>) -> bool {
    match scope {
        Scope::WorkloadSelector { match_labels } if !match_labels.is_empty() => {
            match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        }
        _ => false,
    }
}

/// How a policy takes part in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Deny,
    Allow,
    DryRun,
}

impl Role {
    fn of(p: &Policy) -> Self {
        match (p.dry_run, p.action) {
            (true, _) => Role::DryRun,
            (false, Action::Deny) => Role::Deny,
            (false, Action::Allow) => Role::Allow,
        }
    }
}

/// Policy indices of one scope, split by role so that each step of a
/// decision walks only the policies it needs (a mesh may hold thousands of
/// namespace-wide or global policies).
#[derive(Debug, Default)]
struct ByRole {
    deny: Vec<Idx>,
    allow: Vec<Idx>,
    dry_run: Vec<Idx>,
}

impl ByRole {
    fn push(&mut self, role: Role, idx: Idx) {
        match role {
            Role::Deny => self.deny.push(idx),
            Role::Allow => self.allow.push(idx),
            Role::DryRun => self.dry_run.push(idx),
        }
    }

    fn get(&self, role: Role) -> &[Idx] {
        match role {
            Role::Deny => &self.deny,
            Role::Allow => &self.allow,
            Role::DryRun => &self.dry_run,
        }
    }
}

#[derive(Debug, Default)]
struct NamespaceIndex {
    whole: ByRole,
    selectors: SelectorIndex,
}

#[derive(Debug)]
struct Entry {
    key: String,
    policy: Policy,
    role: Role,
    /// The policy's content as one number, for [`PolicySet::inputs`].
    content: u64,
}

/// The policies that apply to one target. Scope lists are disjoint (each
/// policy is filed under exactly one), so only `extra` needs de-duplicating.
struct Applicable<'s> {
    global: &'s ByRole,
    namespace: Option<&'s ByRole>,
    /// Selected by labels, or attached by name and not already in scope.
    extra: Vec<Idx>,
}

impl<'s> Applicable<'s> {
    fn with_role(&self, set: &'s PolicySet, role: Role) -> impl Iterator<Item = &'s Entry> + '_ {
        let extra = self
            .extra
            .iter()
            .copied()
            .filter_map(|i| set.entry(i))
            .filter(move |e| e.role == role);
        self.global
            .get(role)
            .iter()
            .chain(self.namespace.map_or(&[][..], |n| n.get(role)))
            .copied()
            .filter_map(|i| set.entry(i))
            .chain(extra)
    }
}

/// All policies in force, indexed for evaluation.
///
/// Exists so that the per-connection work is proportional to the policies that
/// can apply to the destination, not to every policy in the mesh. Built once
/// per configuration change; immutable afterwards, so it can be shared behind
/// an `Arc` and swapped atomically.
#[derive(Debug)]
pub struct PolicySet {
    root_namespace: String,
    entries: Vec<Entry>,
    global: ByRole,
    /// Selector policies in the root namespace: they select in every namespace.
    root_selectors: SelectorIndex,
    namespaces: HashMap<String, NamespaceIndex>,
    by_key: HashMap<String, Idx>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::new(Vec::new(), "istio-system".to_owned())
    }
}

impl PolicySet {
    /// Indexes `policies`. A namespace-wide policy in `root_namespace` becomes
    /// [`Scope::Global`], as in Istio. When two policies share a
    /// `namespace/name`, the later one wins.
    pub fn new(policies: Vec<Policy>, root_namespace: String) -> Self {
        let mut set = PolicySet {
            root_namespace,
            entries: Vec::with_capacity(policies.len()),
            global: ByRole::default(),
            root_selectors: SelectorIndex::default(),
            namespaces: HashMap::new(),
            by_key: HashMap::with_capacity(policies.len()),
        };
        let mut latest: HashMap<String, Policy> = HashMap::with_capacity(policies.len());
        let mut order: Vec<String> = Vec::with_capacity(policies.len());
        for mut policy in policies {
            if policy.scope == Scope::Namespace && policy.namespace == set.root_namespace {
                policy.scope = Scope::Global;
            }
            let key = policy.key();
            if latest.insert(key.clone(), policy).is_some() {
                tracing::warn!(policy = %key, "duplicate authorization policy; the later one is used");
            } else {
                order.push(key);
            }
        }
        for key in order {
            let Some(policy) = latest.remove(&key) else {
                continue;
            };
            let Ok(idx) = Idx::try_from(set.entries.len()) else {
                tracing::error!("more than 2^32 authorization policies; the rest are ignored");
                break;
            };
            let role = Role::of(&policy);
            match &policy.scope {
                Scope::Global => set.global.push(role, idx),
                Scope::Namespace => set
                    .namespaces
                    .entry(policy.namespace.clone())
                    .or_default()
                    .whole
                    .push(role, idx),
                // Selects nothing by labels: only reachable by name.
                Scope::WorkloadSelector { match_labels } if match_labels.is_empty() => {}
                Scope::WorkloadSelector { match_labels } => {
                    if policy.namespace == set.root_namespace {
                        set.root_selectors.insert(match_labels, idx);
                    } else {
                        set.namespaces
                            .entry(policy.namespace.clone())
                            .or_default()
                            .selectors
                            .insert(match_labels, idx);
                    }
                }
            }
            set.by_key.insert(key.clone(), idx);
            let content = {
                let mut h = std::hash::DefaultHasher::new();
                policy.hash(&mut h);
                h.finish()
            };
            set.entries.push(Entry {
                key,
                policy,
                role,
                content,
            });
        }
        set
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Policies in load order (after de-duplication).
    pub fn policies(&self) -> impl ExactSizeIterator<Item = &Policy> {
        self.entries.iter().map(|e| &e.policy)
    }

    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.by_key
            .get(key)
            .and_then(|&i| self.entry(i))
            .map(|e| &e.policy)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, idx: Idx) -> Option<&Entry> {
        self.entries.get(idx as usize)
    }

    /// Whether the policy's scope alone selects `target`.
    fn in_scope(&self, p: &Policy, target: &Target<'_>) -> bool {
        match &p.scope {
            Scope::Global => true,
            Scope::Namespace => p.namespace == target.namespace,
            Scope::WorkloadSelector { .. } => {
                (p.namespace == target.namespace || p.namespace == self.root_namespace)
                    && selector_matches(&p.scope, target.labels)
            }
        }
    }

    fn applicable(&self, target: &Target<'_>) -> Applicable<'_> {
        let ns = self.namespaces.get(target.namespace);
        let mut extra = Vec::new();
        if let Some(ns) = ns {
            ns.selectors.collect(self, target.labels, &mut extra);
        }
        // Root selectors live only here, never under `namespaces`, so this
        // also covers workloads in the root namespace without duplicates.
        self.root_selectors.collect(self, target.labels, &mut extra);
        for name in target.policy_names {
            match self.by_key.get(name.as_str()) {
                Some(&idx) => {
                    let in_scope = self
                        .entry(idx)
                        .is_some_and(|e| self.in_scope(&e.policy, target));
                    if !in_scope && !extra.contains(&idx) {
                        extra.push(idx);
                    }
                }
                // Normal while a policy is being added or removed.
                None => tracing::debug!(policy = %name, "workload names an unknown policy"),
            }
        }
        Applicable {
            global: &self.global,
            namespace: ns.map(|n| &n.whole),
            extra,
        }
    }

    /// Everything a verdict for a connection to `target` depends on besides the connection
    /// itself, as one number: the target's namespace, labels and attached policy names, and
    /// the content of every policy that applies to it. Equal numbers (in one process) mean
    /// equal verdicts for equal connections, so a policy change need only re-check the
    /// connections of targets whose number changed.
    pub fn inputs(&self, target: &Target<'_>) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        (target.namespace, target.labels, target.policy_names).hash(&mut h);
        let applicable = self.applicable(target);
        for role in [Role::Deny, Role::Allow, Role::DryRun] {
            for e in applicable.with_role(self, role) {
                (&e.key, e.content).hash(&mut h);
            }
        }
        h.finish()
    }

    /// See [`evaluate`].
    pub fn evaluate(&self, target: &Target<'_>, conn: &ConnFacts<'_>) -> Decision {
        evaluate(self, target, conn)
    }
}

impl Serialize for PolicySet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let policies: Vec<&Policy> = self.policies().collect();
        let mut st = s.serialize_struct("PolicySet", 2)?;
        st.serialize_field("rootNamespace", &self.root_namespace)?;
        st.serialize_field("policies", &policies)?;
        st.end()
    }
}

/// Decides a connection to `target`, with Istio's order: any matching DENY
/// denies; else, if no ALLOW policy applies to the workload, allow; else any
/// matching ALLOW allows; else deny. Dry-run policies are evaluated on the
/// side, logged at info level and reported in [`Decision::dry_run`].
pub fn evaluate(policies: &PolicySet, target: &Target<'_>, conn: &ConnFacts<'_>) -> Decision {
    let facts = Facts::new(
        conn.source_principal,
        conn.source_namespace,
        conn.source_ip,
        conn.destination_ip,
        conn.destination_port,
    );
    let applicable = policies.applicable(target);
    let with_role = |role| applicable.with_role(policies, role);

    let mut dry_run = Vec::new();
    for e in with_role(Role::DryRun) {
        let matched = e.policy.matches(&facts);
        let would_allow = match e.policy.action {
            Action::Allow => matched,
            Action::Deny => !matched,
        };
        tracing::info!(
            policy = %e.key,
            would_allow,
            src = %conn.source_ip,
            principal = conn.source_principal.unwrap_or("-"),
            dst = %conn.destination_ip,
            port = conn.destination_port,
            "dry-run authorization policy"
        );
        dry_run.push(DryRun {
            policy: e.key.clone(),
            would_allow,
        });
    }

    let verdict = if let Some(e) = with_role(Role::Deny).find(|e| e.policy.matches(&facts)) {
        Verdict::Deny {
            by: Some(e.key.clone()),
        }
    } else if with_role(Role::Allow).next().is_none() {
        Verdict::Allow { by: None }
    } else if let Some(e) = with_role(Role::Allow).find(|e| e.policy.matches(&facts)) {
        Verdict::Allow {
            by: Some(e.key.clone()),
        }
    } else {
        Verdict::Deny { by: None }
    };
    tracing::debug!(
        ?verdict,
        namespace = target.namespace,
        src = %conn.source_ip,
        principal = conn.source_principal.unwrap_or("-"),
        dst = %conn.destination_ip,
        port = conn.destination_port,
        "authorization decision"
    );
    Decision { verdict, dry_run }
}
