//! istiod's `Authorization` resource (xDS type `istio.security.Authorization`).
//!
//! It is the protobuf form of the very model ztunnel's local config writes in YAML, so it is
//! converted into that form and goes through the same conversion ([`super::from_local`]): one
//! place decides what a match means, whatever the policy came from. What the protobuf adds
//! (extensions a newer istiod may attach) is treated as the local form treats unknown fields:
//! an ALLOW rule using them never matches, a DENY rule applies without them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::IgnoredAny;

use super::error::AuthzError;
use super::local_form::{
    LocalAction, LocalIpBlock, LocalMatch, LocalPolicy, LocalPort, LocalScope, LocalServiceAccount,
    LocalStringMatch,
};
use super::matcher::StringMatch;
use super::model::Policy;
use crate::proto::security as pb;

/// Converts one resource. The error names the policy and the offending field.
pub fn from_xds(a: pb::Authorization) -> Result<Policy, AuthzError> {
    let key = format!("{}/{}", a.namespace, a.name);
    let invalid = |field: String, value: String, reason: &str| AuthzError::InvalidValue {
        policy: key.clone(),
        field,
        value,
        reason: reason.to_string(),
    };
    let scope = match pb::Scope::try_from(a.scope) {
        Ok(pb::Scope::Global) => LocalScope::Global,
        Ok(pb::Scope::Namespace) => LocalScope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => LocalScope::WorkloadSelector,
        Err(_) => {
            return Err(invalid(
                "scope".into(),
                a.scope.to_string(),
                "unknown scope",
            ))
        }
    };
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => LocalAction::Allow,
        Ok(pb::Action::Deny) => LocalAction::Deny,
        Err(_) => {
            return Err(AuthzError::UnsupportedAction {
                policy: key.clone(),
                action: a.action.to_string(),
            })
        }
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (i, rule) in a.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (j, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (k, m) in clause.matches.into_iter().enumerate() {
                let at = format!("rules[{i}].clauses[{j}].matches[{k}]");
                matches.push(convert_match(m, &at, &invalid)?);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    let local = LocalPolicy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    };
    super::from_local(local)
}

fn convert_match(
    m: pb::Match,
    at: &str,
    invalid: &impl Fn(String, String, &str) -> AuthzError,
) -> Result<LocalMatch, AuthzError> {
    let strings =
        |v: Vec<pb::StringMatch>, field: &str| -> Result<Vec<LocalStringMatch>, AuthzError> {
            v.into_iter()
                .map(|s| match s.match_type {
                    Some(pb::string_match::MatchType::Exact(x)) => Ok(StringMatch::Exact(x)),
                    Some(pb::string_match::MatchType::Prefix(x)) => Ok(StringMatch::Prefix(x)),
                    Some(pb::string_match::MatchType::Suffix(x)) => Ok(StringMatch::Suffix(x)),
                    Some(pb::string_match::MatchType::Presence(_)) => Ok(StringMatch::Presence),
                    None => Err(invalid(
                        format!("{at}.{field}"),
                        "{}".into(),
                        "a string match with no match type",
                    )),
                })
                .map(|r| r.map(LocalStringMatch))
                .collect()
        };
    let accounts = |v: Vec<pb::ServiceAccountMatch>| -> Vec<LocalServiceAccount> {
        v.into_iter()
            .map(|s| LocalServiceAccount {
                namespace: s.namespace,
                service_account: s.service_account,
            })
            .collect()
    };
    let cidrs = |v: Vec<pb::Address>, field: &str| -> Result<Vec<LocalIpBlock>, AuthzError> {
        v.into_iter()
            .map(|a| {
                let ip = ip_from_bytes(&a.address).ok_or_else(|| {
                    invalid(
                        format!("{at}.{field}"),
                        format!("{:?}", a.address),
                        "an address is 4 or 16 bytes",
                    )
                })?;
                let len = u8::try_from(a.length).unwrap_or(u8::MAX);
                IpNet::new(ip, len).map(LocalIpBlock).map_err(|_| {
                    invalid(
                        format!("{at}.{field}"),
                        format!("{ip}/{}", a.length),
                        "prefix length out of range",
                    )
                })
            })
            .collect()
    };
    let ports = |v: Vec<u32>, field: &str| -> Result<Vec<LocalPort>, AuthzError> {
        v.into_iter()
            .map(|p| {
                u16::try_from(p).map(LocalPort).map_err(|_| {
                    invalid(
                        format!("{at}.{field}"),
                        p.to_string(),
                        "out of range 0-65535",
                    )
                })
            })
            .collect()
    };
    let mut unknown = BTreeMap::new();
    if !m.extensions.is_empty() {
        unknown.insert("extensions".to_string(), IgnoredAny);
    }
    Ok(LocalMatch {
        namespaces: strings(m.namespaces, "namespaces")?,
        not_namespaces: strings(m.not_namespaces, "notNamespaces")?,
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        principals: strings(m.principals, "principals")?,
        not_principals: strings(m.not_principals, "notPrincipals")?,
        source_ips: cidrs(m.source_ips, "sourceIps")?,
        not_source_ips: cidrs(m.not_source_ips, "notSourceIps")?,
        destination_ips: cidrs(m.destination_ips, "destinationIps")?,
        not_destination_ips: cidrs(m.not_destination_ips, "notDestinationIps")?,
        destination_ports: ports(m.destination_ports, "destinationPorts")?,
        not_destination_ports: ports(m.not_destination_ports, "notDestinationPorts")?,
        unknown,
    })
}

/// A raw IPv4 (4 bytes) or IPv6 (16 bytes) address, as Istio's protobufs carry them.
pub fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Action, Scope};

    fn m() -> pb::Match {
        pb::Match::default()
    }

    #[test]
    fn converts_scope_action_and_matches() {
        let a = pb::Authorization {
            name: "deny-other".into(),
            namespace: "shop".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Deny as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        principals: vec![pb::StringMatch {
                            match_type: Some(pb::string_match::MatchType::Exact(
                                "cluster.local/ns/shop/sa/other".into(),
                            )),
                        }],
                        source_ips: vec![pb::Address {
                            address: vec![10, 250, 0, 0],
                            length: 16,
                        }],
                        destination_ports: vec![80],
                        ..m()
                    }],
                }],
            }],
            dry_run: false,
            extensions: vec![],
        };
        let p = from_xds(a).expect("valid");
        assert_eq!(p.key(), "shop/deny-other");
        assert_eq!(p.action, Action::Deny);
        assert_eq!(p.scope, Scope::Namespace);
        let got = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            got.principals,
            vec![StringMatch::Exact("cluster.local/ns/shop/sa/other".into())]
        );
        assert_eq!(
            got.source_ips,
            vec!["10.250.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(got.destination_ports, vec![80]);
    }

    #[test]
    fn refuses_bad_fields_with_their_place() {
        let bad_ip = pb::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        source_ips: vec![pb::Address {
                            address: vec![1, 2, 3],
                            length: 8,
                        }],
                        ..m()
                    }],
                }],
            }],
            ..Default::default()
        };
        let e = from_xds(bad_ip).unwrap_err().to_string();
        assert!(
            e.contains("ns/p") && e.contains("rules[0].clauses[0].matches[0].sourceIps"),
            "{e}"
        );

        let bad_port = pb::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        destination_ports: vec![70000],
                        ..m()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert!(from_xds(bad_port)
            .unwrap_err()
            .to_string()
            .contains("70000"));

        let bad_action = pb::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: 7,
            ..Default::default()
        };
        assert!(matches!(
            from_xds(bad_action),
            Err(AuthzError::UnsupportedAction { .. })
        ));
    }

    #[test]
    fn extensions_make_an_allow_rule_never_match() {
        let a = pb::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: pb::Action::Allow as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        destination_ports: vec![80],
                        extensions: vec![crate::proto::workload::Extension {
                            name: "future".into(),
                            config: None,
                        }],
                        ..m()
                    }],
                }],
            }],
            ..Default::default()
        };
        let p = from_xds(a).expect("converted with a warning");
        // The rule is dropped: an ALLOW policy with no rule allows nothing.
        assert!(p.rules.is_empty(), "{:?}", p.rules);
        assert!(!p.warnings.is_empty(), "{:?}", p.warnings);
    }
}
