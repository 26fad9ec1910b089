//! The one place the proxy asks authorization for a verdict.

use tracing::info;

use super::tracker::AdmittedConnection;
use crate::authz::{ConnFacts, Target, Verdict};
use crate::state::{Snapshot, Workload};

/// A connection authorization refused, and the policy that decided (none: no ALLOW matched).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("denied by policy {0}")]
    ByPolicy(String),
    #[error("denied: no ALLOW policy matched")]
    NoAllowMatched,
}

fn target(dest: &Workload) -> Target<'_> {
    Target {
        namespace: &dest.namespace,
        labels: &dest.labels,
        policy_names: &dest.authorization_policies,
    }
}

/// What verdicts for connections to `dest` depend on, as one number (see
/// [`crate::authz::PolicySet::inputs`]).
pub fn inputs(snap: &Snapshot, dest: &Workload) -> u64 {
    snap.policies.inputs(&target(dest))
}

/// Allowed, or denied with the policy that decided.
pub fn check(snap: &Snapshot, dest: &Workload, conn: &AdmittedConnection) -> Result<(), Denial> {
    let principal = conn.source_identity.as_ref().map(|i| i.principal());
    let facts = ConnFacts {
        source_ip: conn.source_ip,
        source_principal: principal.as_deref(),
        source_namespace: conn.source_identity.as_ref().map(|i| i.namespace.as_str()),
        destination_ip: conn.destination_ip,
        destination_port: conn.destination_port,
    };
    let decision = snap.policies.evaluate(&target(dest), &facts);
    for d in &decision.dry_run {
        info!(policy = %d.policy, would_allow = d.would_allow, src = %conn.source_ip,
            dst = %format!("{}:{}", conn.destination_ip, conn.destination_port), "dry-run policy evaluated");
    }
    match decision.verdict {
        Verdict::Allow { .. } => Ok(()),
        Verdict::Deny { by: Some(p) } => Err(Denial::ByPolicy(p)),
        Verdict::Deny { by: None } => Err(Denial::NoAllowMatched),
    }
}
