//! Which identity a caller may have a certificate for. Pure, so every rule has a test.

use tonic::Code;

use super::authn::Caller;
use crate::identity::Identity;

/// What to check before issuing.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    /// The caller's own identity.
    Own(Identity),
    /// A node agent asking for another identity: issue only if a pod with it runs on the
    /// node of the agent's pod.
    OnNodeOf {
        identity: Identity,
        agent_pod: super::authn::BoundPod,
    },
}

impl Grant {
    pub fn identity(&self) -> &Identity {
        match self {
            Grant::Own(id) | Grant::OnNodeOf { identity: id, .. } => id,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub reason: String,
}

pub fn refuse(code: Code, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// Decides from the caller and the identity asked for (`ImpersonatedIdentity`, when given).
pub fn decide(
    caller: &Caller,
    impersonated: Option<&str>,
    trust_domain: &str,
    node_agents: &[String],
) -> Result<Grant, Refusal> {
    let own = Identity::new(trust_domain, &caller.namespace, &caller.service_account);
    let Some(asked) = impersonated else {
        return Ok(Grant::Own(own));
    };
    let asked: Identity = asked.parse().map_err(|e| {
        refuse(
            Code::InvalidArgument,
            format!("ImpersonatedIdentity {asked:?}: {e}"),
        )
    })?;
    if asked == own {
        return Ok(Grant::Own(own));
    }
    let agent = format!("{}/{}", caller.namespace, caller.service_account);
    if !node_agents.contains(&agent) {
        return Err(refuse(
            Code::PermissionDenied,
            format!("{agent} is not a node agent and may only ask for its own identity"),
        ));
    }
    if asked.trust_domain != trust_domain {
        return Err(refuse(
            Code::PermissionDenied,
            format!("{asked} is not in trust domain {trust_domain}"),
        ));
    }
    let agent_pod = caller.pod.clone().ok_or_else(|| {
        refuse(
            Code::Unauthenticated,
            "a node agent's token must be bound to its pod (the node is read from the pod)",
        )
    })?;
    Ok(Grant::OnNodeOf {
        identity: asked,
        agent_pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca_service::authn::BoundPod;

    fn caller(ns: &str, sa: &str, bound: bool) -> Caller {
        Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: bound.then(|| BoundPod {
                name: "p".into(),
                uid: "u".into(),
            }),
        }
    }

    const AGENTS: &[&str] = &["weft-system/weft"];

    fn agents() -> Vec<String> {
        AGENTS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn everyone_gets_their_own_identity() {
        let c = caller("shop", "cart", false);
        let own = Identity::new("cluster.local", "shop", "cart");
        assert_eq!(
            decide(&c, None, "cluster.local", &agents()),
            Ok(Grant::Own(own.clone()))
        );
        assert_eq!(
            decide(&c, Some(&own.to_string()), "cluster.local", &agents()),
            Ok(Grant::Own(own))
        );
    }

    #[test]
    fn only_node_agents_impersonate_and_only_with_a_bound_token() {
        let asked = "spiffe://cluster.local/ns/bank/sa/vault";
        let err = decide(
            &caller("shop", "cart", true),
            Some(asked),
            "cluster.local",
            &agents(),
        )
        .unwrap_err();
        assert_eq!(err.code, Code::PermissionDenied);
        let err = decide(
            &caller("weft-system", "weft", false),
            Some(asked),
            "cluster.local",
            &agents(),
        )
        .unwrap_err();
        assert_eq!(err.code, Code::Unauthenticated);
        let grant = decide(
            &caller("weft-system", "weft", true),
            Some(asked),
            "cluster.local",
            &agents(),
        )
        .unwrap();
        assert!(matches!(grant, Grant::OnNodeOf { .. }));
        assert_eq!(grant.identity().to_string(), asked);
    }

    #[test]
    fn foreign_trust_domains_and_garbage_are_refused() {
        let agent = caller("weft-system", "weft", true);
        let err = decide(
            &agent,
            Some("spiffe://other.org/ns/a/sa/b"),
            "cluster.local",
            &agents(),
        )
        .unwrap_err();
        assert_eq!(err.code, Code::PermissionDenied);
        let err = decide(&agent, Some("not a spiffe id"), "cluster.local", &agents()).unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
    }
}
