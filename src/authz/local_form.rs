//! ztunnel's local-config policy shape (`policies:` in its local YAML file).
//!
//! The serde types accept what ztunnel's own types accept, so a ztunnel local
//! config loads unchanged: `rules` is a list of rules, each a list of clauses
//! (ANDed), each a list of matches (ORed); strings are `{Exact: ..}`,
//! `{Prefix: ..}`, `{Suffix: ..}` or `{Presence: []}`. weft is lenient where
//! ztunnel is strict for no safety reason: `rules` and `dryRun` may be
//! omitted, IPs may be bare addresses, ports may be quoted, and `Presence`
//! takes any value (`[]`, `{}`, nothing).

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::de::{self, Deserializer, EnumAccess, IgnoredAny, VariantAccess, Visitor};
use serde::Deserialize;

use super::error::AuthzError;
use super::matcher::{parse_ip_block, parse_port, ServiceAccountMatch, StringMatch};
use super::model::{Action, Clause, Match, Policy, Rule, Scope};

/// One entry of a ztunnel local config's `policies:` list.
///
/// Exists so the local config loader can embed it in its own
/// `#[derive(Deserialize)]` struct (`policies: Vec<LocalPolicy>`) and then
/// convert each with [`Policy::try_from`] / [`from_local`], rejecting a bad
/// policy on its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: LocalScope,
    pub action: LocalAction,
    #[serde(default)]
    pub rules: Vec<Vec<Vec<LocalMatch>>>,
    #[serde(default)]
    pub dry_run: bool,
}

/// ztunnel's `RbacScope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LocalScope {
    Global,
    Namespace,
    WorkloadSelector,
}

/// ztunnel's `RbacAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LocalAction {
    Allow,
    Deny,
}

/// ztunnel's `RbacMatch`. Keys weft does not know are collected rather than
/// dropped (ztunnel ignores them silently), so that they can be reported.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalMatch {
    #[serde(default)]
    pub namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub service_accounts: Vec<LocalServiceAccount>,
    #[serde(default)]
    pub not_service_accounts: Vec<LocalServiceAccount>,
    #[serde(default)]
    pub principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub source_ips: Vec<LocalIpBlock>,
    #[serde(default)]
    pub not_source_ips: Vec<LocalIpBlock>,
    #[serde(default)]
    pub destination_ips: Vec<LocalIpBlock>,
    #[serde(default)]
    pub not_destination_ips: Vec<LocalIpBlock>,
    #[serde(default)]
    pub destination_ports: Vec<LocalPort>,
    #[serde(default)]
    pub not_destination_ports: Vec<LocalPort>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, IgnoredAny>,
}

/// ztunnel's `ServiceAccountMatch`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalServiceAccount {
    pub namespace: String,
    pub service_account: String,
}

/// ztunnel's externally tagged `StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStringMatch(pub StringMatch);

impl<'de> Deserialize<'de> for LocalStringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VARIANTS: &[&str] = &["Exact", "Prefix", "Suffix", "Presence"];
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LocalStringMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a string match: {Exact: ..}, {Prefix: ..}, {Suffix: ..} or {Presence: []}",
                )
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
                // A String tag rather than a derived identifier enum: the YAML
                // deserializer hands variant names over as plain strings.
                let (tag, value) = data.variant::<String>()?;
                let m = match tag.as_str() {
                    "Exact" => StringMatch::Exact(value.newtype_variant()?),
                    "Prefix" => StringMatch::Prefix(value.newtype_variant()?),
                    "Suffix" => StringMatch::Suffix(value.newtype_variant()?),
                    "Presence" => {
                        value.newtype_variant::<IgnoredAny>()?;
                        StringMatch::Presence
                    }
                    other => return Err(de::Error::unknown_variant(other, VARIANTS)),
                };
                Ok(LocalStringMatch(m))
            }
        }
        d.deserialize_enum("StringMatch", VARIANTS, V)
    }
}

/// A CIDR, or a bare address meaning a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalIpBlock(pub IpNet);

impl<'de> Deserialize<'de> for LocalIpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_ip_block(&s)
            .map(LocalIpBlock)
            .map_err(|reason| de::Error::custom(format!("{s:?}: {reason}")))
    }
}

/// A port number; a quoted decimal string is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPort(pub u16);

impl<'de> Deserialize<'de> for LocalPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => u16::try_from(n)
                .map(LocalPort)
                .map_err(|_| de::Error::custom(format!("port {n} is out of range 0-65535"))),
            Raw::Str(s) => parse_port(&s)
                .map(LocalPort)
                .map_err(|reason| de::Error::custom(format!("{s:?}: {reason}"))),
        }
    }
}

/// Converts one ztunnel-shaped policy. Same as `Policy::try_from(p)`.
pub fn from_local(p: LocalPolicy) -> Result<Policy, AuthzError> {
    Policy::try_from(p)
}

impl TryFrom<LocalPolicy> for Policy {
    type Error = AuthzError;

    fn try_from(p: LocalPolicy) -> Result<Self, Self::Error> {
        let key = format!("{}/{}", p.namespace, p.name);
        if p.name.is_empty() {
            return Err(AuthzError::Missing {
                policy: key,
                field: "name".to_owned(),
            });
        }
        if p.namespace.is_empty() {
            return Err(AuthzError::Missing {
                policy: key,
                field: "namespace".to_owned(),
            });
        }
        let action = match p.action {
            LocalAction::Allow => Action::Allow,
            LocalAction::Deny => Action::Deny,
        };
        let scope = match p.scope {
            LocalScope::Global => Scope::Global,
            LocalScope::Namespace => Scope::Namespace,
            LocalScope::WorkloadSelector => Scope::WorkloadSelector {
                match_labels: BTreeMap::new(),
            },
        };
        let mut warnings = Vec::new();
        let mut rules = Vec::with_capacity(p.rules.len());
        'rule: for (i, rule) in p.rules.into_iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.len());
            for (j, clause) in rule.into_iter().enumerate() {
                let mut matches = Vec::with_capacity(clause.len());
                let mut matches_all = false;
                for (k, m) in clause.into_iter().enumerate() {
                    let at = format!("rules[{i}][{j}][{k}]");
                    if !m.unknown.is_empty() {
                        let names: Vec<&str> = m.unknown.keys().map(String::as_str).collect();
                        let names = names.join(", ");
                        if action == Action::Allow {
                            warnings.push(format!(
                                "{at}: unknown field(s) {names} cannot be enforced; in an ALLOW policy rule {i} never matches"
                            ));
                            continue 'rule;
                        }
                        warnings.push(format!(
                            "{at}: unknown field(s) {names} ignored; the DENY rule applies without them (fail closed)"
                        ));
                        let converted = convert_match(m);
                        if converted.is_empty() {
                            // Only unknown conditions: what is left matches
                            // everything, which the empty match cannot say.
                            matches_all = true;
                        } else {
                            matches.push(converted);
                        }
                        continue;
                    }
                    let converted = convert_match(m);
                    if converted.is_empty() {
                        warnings.push(format!("{at}: empty match never matches (as in ztunnel)"));
                    }
                    warnings.extend(converted.spiffe_uri_warnings(&at));
                    matches.push(converted);
                }
                if !matches_all {
                    clauses.push(Clause { matches });
                }
            }
            rules.push(Rule { clauses });
        }
        Ok(Policy {
            name: p.name,
            namespace: p.namespace,
            scope,
            action,
            rules,
            dry_run: p.dry_run,
            warnings,
        })
    }
}

fn convert_match(m: LocalMatch) -> Match {
    let strings = |v: Vec<LocalStringMatch>| v.into_iter().map(|s| s.0).collect::<Vec<_>>();
    let ips = |v: Vec<LocalIpBlock>| v.into_iter().map(|b| b.0).collect::<Vec<_>>();
    let ports = |v: Vec<LocalPort>| v.into_iter().map(|p| p.0).collect::<Vec<_>>();
    let accounts = |v: Vec<LocalServiceAccount>| {
        v.into_iter()
            .map(|a| ServiceAccountMatch {
                namespace: a.namespace,
                service_account: a.service_account,
            })
            .collect::<Vec<_>>()
    };
    Match {
        principals: strings(m.principals),
        not_principals: strings(m.not_principals),
        namespaces: strings(m.namespaces),
        not_namespaces: strings(m.not_namespaces),
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        source_ips: ips(m.source_ips),
        not_source_ips: ips(m.not_source_ips),
        destination_ips: ips(m.destination_ips),
        not_destination_ips: ips(m.not_destination_ips),
        destination_ports: ports(m.destination_ports),
        not_destination_ports: ports(m.not_destination_ports),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a local config loader does: embed `LocalPolicy` in its own struct.
    #[derive(Deserialize)]
    struct LocalConfig {
        #[serde(default)]
        policies: Vec<LocalPolicy>,
    }

    fn load(yaml: &str) -> Result<Vec<Policy>, String> {
        let cfg: LocalConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        cfg.policies
            .into_iter()
            .map(|p| Policy::try_from(p).map_err(|e| e.to_string()))
            .collect()
    }

    fn net(s: &str) -> IpNet {
        parse_ip_block(s).expect("test CIDR")
    }

    const ZTUNNEL_CONFIG: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  services: {}
policies:
- name: allow-a
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals:
        - Exact: cluster.local/ns/a/sa/client
        - Prefix: cluster.local/ns/b/
      - namespaces:
        - Presence: []
        - Suffix: -prod
    - - destinationPorts: [80, "8080"]
  dryRun: false
- name: deny-ip
  namespace: default
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - sourceIps: ["10.0.0.0/8", "192.168.1.1"]
        notDestinationPorts: [22]
        serviceAccounts: [{namespace: a, serviceAccount: client}]
  dryRun: true
- name: mesh
  namespace: istio-system
  scope: Global
  action: Deny
  rules:
  - - - notPrincipals:
        - !Presence []
        - Presence: {}
        - Presence:
services: []
"#;

    #[test]
    fn ztunnel_local_config_loads() {
        let got = load(ZTUNNEL_CONFIG).expect("loads");
        assert_eq!(got.len(), 3);

        let allow = &got[0];
        assert_eq!(
            (allow.key(), allow.scope.clone(), allow.action),
            (
                "default/allow-a".to_owned(),
                Scope::Namespace,
                Action::Allow
            )
        );
        assert!(!allow.dry_run && allow.warnings.is_empty());
        assert_eq!(allow.rules.len(), 1);
        let clauses = &allow.rules[0].clauses;
        assert_eq!(clauses.len(), 2);
        assert_eq!(
            clauses[0].matches[0].principals,
            vec![
                StringMatch::Exact("cluster.local/ns/a/sa/client".into()),
                StringMatch::Prefix("cluster.local/ns/b/".into()),
            ]
        );
        assert_eq!(
            clauses[0].matches[1].namespaces,
            vec![StringMatch::Presence, StringMatch::Suffix("-prod".into())]
        );
        assert_eq!(clauses[1].matches[0].destination_ports, vec![80, 8080]);

        let deny = &got[1];
        assert_eq!(
            deny.scope,
            Scope::WorkloadSelector {
                match_labels: BTreeMap::new()
            }
        );
        assert!(deny.dry_run);
        let m = &deny.rules[0].clauses[0].matches[0];
        assert_eq!(m.source_ips, vec![net("10.0.0.0/8"), net("192.168.1.1/32")]);
        assert_eq!(m.not_destination_ports, vec![22]);
        assert_eq!(
            m.service_accounts,
            vec![ServiceAccountMatch {
                namespace: "a".into(),
                service_account: "client".into()
            }]
        );

        let mesh = &got[2];
        assert_eq!(mesh.scope, Scope::Global);
        assert_eq!(
            mesh.rules[0].clauses[0].matches[0].not_principals,
            vec![StringMatch::Presence; 3]
        );
    }

    #[test]
    fn ztunnel_required_fields_and_typos() {
        // Unknown policy-level fields are refused (as ztunnel does), with the line.
        let err = load("policies:\n- name: p\n  namespace: n\n  scope: Global\n  action: Allow\n  dryrun: true\n")
            .expect_err("unknown field");
        assert!(err.contains("dryrun") && err.contains("line 6"), "{err}");
        // `rules` and `dryRun` may be left out.
        let got = load("policies:\n- {name: p, namespace: n, scope: Namespace, action: Allow}\n")
            .expect("loads");
        assert!(got[0].rules.is_empty() && !got[0].dry_run);
        // Bad enum values and bad IPs are errors that quote the value.
        let err = load("policies:\n- {name: p, namespace: n, scope: Cluster, action: Allow}\n")
            .expect_err("scope");
        assert!(err.contains("Cluster"), "{err}");
        let err = load("policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{sourceIps: [10.0.0.300]}]]]}\n")
            .expect_err("ip");
        assert!(err.contains("10.0.0.300"), "{err}");
        let err = load("policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{destinationPorts: [http]}]]]}\n")
            .expect_err("port");
        assert!(err.contains("http"), "{err}");
        let err = load("policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [{Regex: x}]}]]]}\n")
            .expect_err("string match");
        assert!(err.contains("Regex"), "{err}");
        let err = load("policies:\n- {name: '', namespace: n, scope: Global, action: Allow}\n")
            .expect_err("name");
        assert!(err.contains("missing required field name"), "{err}");
    }

    #[test]
    fn unknown_match_fields_are_reported() {
        let allow = load("policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{namespaces: [{Exact: a}], sourcePorts: [1]}]], [[{namespaces: [{Exact: b}]}]]]}\n")
            .expect("loads");
        // The rule with the unknown field is dropped, the other stays.
        assert_eq!(allow[0].rules.len(), 1);
        assert_eq!(
            allow[0].rules[0].clauses[0].matches[0].namespaces,
            vec![StringMatch::Exact("b".into())]
        );
        assert!(
            allow[0].warnings[0].contains("sourcePorts"),
            "{:?}",
            allow[0].warnings
        );

        let deny = load("policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{sourcePorts: [1]}], [{destinationPorts: [80]}]]]}\n")
            .expect("loads");
        // Only the unknown field was in the first clause: it is gone (matches all).
        assert_eq!(deny[0].rules[0].clauses.len(), 1);
        assert_eq!(
            deny[0].rules[0].clauses[0].matches[0].destination_ports,
            vec![80]
        );
        assert!(
            deny[0].warnings[0].contains("fail closed"),
            "{:?}",
            deny[0].warnings
        );
    }

    #[test]
    fn empty_match_is_kept_and_reported() {
        let got = load(
            "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{}]]]}\n",
        )
        .expect("loads");
        assert_eq!(got[0].rules[0].clauses[0].matches, vec![Match::default()]);
        assert!(got[0].warnings[0].contains("never matches"));
    }
}
