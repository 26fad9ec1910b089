//! Table-driven evaluation tests: policies written in the Kubernetes form
//! (as users write them), evaluated against connections.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;

const ROOT: &str = "istio-system";
/// The default destination: workload `web` in namespace `app`.
const DST: &str = "10.0.2.2";
/// The default mTLS client identity.
const CLIENT: &str = "cluster.local/ns/a/sa/client";

/// Wraps `spec` (YAML flow mapping body) into a policy document.
fn doc(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{spec}}}\n"
    )
}

fn parse(yaml: &str) -> Policy {
    let mut out = parse_k8s_yaml_stream(yaml);
    assert_eq!(out.len(), 1, "{yaml}");
    match out.remove(0) {
        Ok(p) => p,
        Err(e) => panic!("{e}\n{yaml}"),
    }
}

#[derive(Clone, Copy)]
struct Conn {
    src: &'static str,
    principal: Option<&'static str>,
    dst: &'static str,
    port: u16,
}

const MTLS: Conn = Conn {
    src: "10.0.1.5",
    principal: Some(CLIENT),
    dst: DST,
    port: 80,
};
const PLAIN: Conn = Conn {
    principal: None,
    ..MTLS
};

fn conn(src: &'static str, principal: Option<&'static str>, port: u16) -> Conn {
    Conn {
        src,
        principal,
        dst: DST,
        port,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

struct Case {
    name: &'static str,
    /// (namespace, name, spec) of each policy.
    policies: Vec<(&'static str, &'static str, String)>,
    /// Target namespace, labels, attached policy names.
    target: (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    ),
    conn: Conn,
    allowed: bool,
    by: Option<&'static str>,
}

const WEB: (&str, &[(&str, &str)], &[&str]) = ("app", &[("app", "web"), ("version", "v1")], &[]);

fn allow(rules: &str) -> String {
    format!("action: ALLOW, rules: {rules}")
}
fn deny(rules: &str) -> String {
    format!("action: DENY, rules: {rules}")
}
fn from(source: &str) -> String {
    allow(&format!("[{{from: [{{source: {{{source}}}}}]}}]"))
}
fn when(cond: &str) -> String {
    allow(&format!("[{{when: [{{{cond}}}]}}]"))
}

fn c(
    name: &'static str,
    policies: Vec<(&'static str, &'static str, String)>,
    conn: Conn,
    allowed: bool,
    by: Option<&'static str>,
) -> Case {
    Case {
        name,
        policies,
        target: WEB,
        conn,
        allowed,
        by,
    }
}

fn p(spec: String) -> Vec<(&'static str, &'static str, String)> {
    vec![("app", "p", spec)]
}

const P: Option<&str> = Some("app/p");

fn cases() -> Vec<Case> {
    vec![
        // --- principals
        c("principal exact", p(from("principals: [cluster.local/ns/a/sa/client]")), MTLS, true, P),
        c("principal exact miss", p(from("principals: [cluster.local/ns/a/sa/other]")), MTLS, false, None),
        c("principal prefix", p(from("principals: [cluster.local/ns/a/*]")), MTLS, true, P),
        c("principal prefix miss", p(from("principals: [cluster.local/ns/b/*]")), MTLS, false, None),
        c("principal suffix", p(from("principals: ['*/sa/client']")), MTLS, true, P),
        c("principal presence", p(from("principals: ['*']")), MTLS, true, P),
        c("principal presence plaintext", p(from("principals: ['*']")), PLAIN, false, None),
        // Istio compares the pattern as written with the principal, which has no spiffe://.
        c("principal with spiffe:// written never matches", p(from("principals: ['spiffe://cluster.local/ns/a/sa/client']")), MTLS, false, None),
        c("notPrincipals with spiffe:// written always holds", p(deny("[{from: [{source: {notPrincipals: ['spiffe://cluster.local/ns/a/sa/client']}}]}]")), MTLS, false, P),
        c("principal exact plaintext", p(from("principals: [cluster.local/ns/a/sa/client]")), PLAIN, false, None),
        c("notPrincipals other", p(from("notPrincipals: [cluster.local/ns/a/sa/other]")), MTLS, true, P),
        c("notPrincipals self", p(from("notPrincipals: [cluster.local/ns/a/sa/client]")), MTLS, false, None),
        // ztunnel and Envoy: no identity matches no pattern, so the negation holds.
        c("notPrincipals plaintext (ALLOW)", p(from("notPrincipals: [cluster.local/ns/a/sa/client]")), PLAIN, true, P),
        c("require mTLS: DENY notPrincipals * plaintext", p(deny("[{from: [{source: {notPrincipals: ['*']}}]}]")), PLAIN, false, P),
        c("require mTLS: DENY notPrincipals * mtls", p(deny("[{from: [{source: {notPrincipals: ['*']}}]}]")), MTLS, true, None),
        // --- namespaces and service accounts
        c("namespace exact", p(from("namespaces: [a]")), MTLS, true, P),
        c("namespace miss", p(from("namespaces: [b]")), MTLS, false, None),
        c("namespace suffix", p(from("namespaces: ['*a']")), MTLS, true, P),
        c("namespace plaintext", p(from("namespaces: [a]")), PLAIN, false, None),
        c("notNamespaces self", p(from("notNamespaces: [a]")), MTLS, false, None),
        c("notNamespaces other", p(from("notNamespaces: [b]")), MTLS, true, P),
        c("notNamespaces plaintext", p(from("notNamespaces: [a]")), PLAIN, true, P),
        c("serviceAccounts ns/sa", p(from("serviceAccounts: [a/client]")), MTLS, true, P),
        c("serviceAccounts relative to policy namespace", p(from("serviceAccounts: [client]")), MTLS, false, None),
        c("serviceAccounts relative, same namespace", p(from("serviceAccounts: [client]")), conn("10.0.1.5", Some("cluster.local/ns/app/sa/client"), 80), true, P),
        c("notServiceAccounts", p(from("notServiceAccounts: [a/client]")), MTLS, false, None),
        // --- IP blocks
        c("ipBlocks v4 CIDR", p(from("ipBlocks: [10.0.1.0/24]")), MTLS, true, P),
        c("ipBlocks v4 CIDR miss", p(from("ipBlocks: [10.0.9.0/24]")), MTLS, false, None),
        c("ipBlocks bare IP is /32", p(from("ipBlocks: [10.0.1.5]")), PLAIN, true, P),
        c("ipBlocks bare IP other host", p(from("ipBlocks: [10.0.1.6]")), PLAIN, false, None),
        c("ipBlocks v6 CIDR", p(from("ipBlocks: ['fd00:1::/64']")), conn("fd00:1::7", None, 80), true, P),
        c("ipBlocks v6 bare miss", p(from("ipBlocks: ['fd00:1::8']")), conn("fd00:1::7", None, 80), false, None),
        c("ipBlocks v4 vs v6 source", p(from("ipBlocks: [0.0.0.0/0]")), conn("fd00:1::7", None, 80), false, None),
        c("notIpBlocks", p(from("notIpBlocks: [10.0.1.0/24]")), MTLS, false, None),
        // Not L4 attributes: an ALLOW rule using them never matches, a DENY rule applies
        // without them.
        c("remoteIpBlocks is not L4 (ALLOW)", p(from("remoteIpBlocks: [10.0.1.0/24]")), PLAIN, false, None),
        c("notRemoteIpBlocks is not L4 (ALLOW)", p(from("notRemoteIpBlocks: [10.0.1.9]")), PLAIN, false, None),
        c("remoteIpBlocks is not L4 (DENY)", p(deny("[{from: [{source: {remoteIpBlocks: [192.0.2.0/24], namespaces: [a]}}]}]")), MTLS, false, P),
        c("ipBlocks AND principals", p(from("ipBlocks: [10.0.1.0/24], principals: [cluster.local/ns/a/sa/other]")), MTLS, false, None),
        // --- ports
        c("ports", p(allow("[{to: [{operation: {ports: ['80']}}]}]")), MTLS, true, P),
        c("ports miss", p(allow("[{to: [{operation: {ports: ['8080']}}]}]")), MTLS, false, None),
        c("notPorts", p(allow("[{to: [{operation: {notPorts: ['80']}}]}]")), MTLS, false, None),
        c("notPorts other", p(allow("[{to: [{operation: {notPorts: ['8080']}}]}]")), PLAIN, true, P),
        // --- when
        c("when source.ip", p(when("key: source.ip, values: [10.0.0.0/16]")), PLAIN, true, P),
        c("when source.ip notValues", p(when("key: source.ip, notValues: [10.0.0.0/16]")), PLAIN, false, None),
        c("when source.namespace", p(when("key: source.namespace, values: [a]")), MTLS, true, P),
        c("when source.namespace notValues", p(when("key: source.namespace, notValues: [a]")), MTLS, false, None),
        c("when source.principal", p(when("key: source.principal, values: ['cluster.local/*']")), MTLS, true, P),
        c("when source.principal plaintext", p(when("key: source.principal, values: ['*']")), PLAIN, false, None),
        c("when destination.port", p(when("key: destination.port, values: ['80', '443']")), MTLS, true, P),
        c("when destination.port miss", p(when("key: destination.port, values: ['443']")), MTLS, false, None),
        c("when destination.ip", p(when("key: destination.ip, values: [10.0.2.0/24]")), MTLS, true, P),
        c("when remote.ip is not L4 (ALLOW)", p(when("key: remote.ip, values: [10.0.1.5]")), MTLS, false, None),
        c("when remote.ip is not L4 (DENY)", p(deny("[{when: [{key: remote.ip, values: [192.0.2.1]}, {key: source.namespace, values: [a]}]}]")), MTLS, false, P),
        c("when values AND notValues", p(when("key: destination.port, values: ['80'], notValues: ['80']")), MTLS, false, None),
        c("two when conditions are ANDed", p(allow("[{when: [{key: destination.port, values: ['80']}, {key: source.namespace, values: [b]}]}]")), MTLS, false, None),
        // --- OR / AND structure
        c("sources are ORed", p(from("principals: [x]}}, {source: {namespaces: [a]")), MTLS, true, P),
        c("from AND to", p(allow("[{from: [{source: {namespaces: [a]}}], to: [{operation: {ports: ['443']}}]}]")), MTLS, false, None),
        c("rules are ORed", p(allow("[{from: [{source: {namespaces: [b]}}]}, {to: [{operation: {ports: ['80']}}]}]")), MTLS, true, P),
        // --- scopes
        c("global via root namespace", vec![(ROOT, "g", from("namespaces: [b]"))], MTLS, false, None),
        c("global via root namespace, match", vec![(ROOT, "g", from("namespaces: [a]"))], MTLS, true, Some("istio-system/g")),
        c("other namespace does not apply", vec![("other", "p", from("namespaces: [b]"))], MTLS, true, None),
        c("selector matches labels", p(format!("selector: {{matchLabels: {{app: web}}}}, {}", from("namespaces: [b]"))), MTLS, false, None),
        c("selector needs every label", p(format!("selector: {{matchLabels: {{app: web, version: v2}}}}, {}", from("namespaces: [b]"))), MTLS, true, None),
        c("selector other workload", p(format!("selector: {{matchLabels: {{app: db}}}}, {}", from("namespaces: [b]"))), MTLS, true, None),
        c("root selector applies in every namespace", vec![(ROOT, "s", format!("selector: {{matchLabels: {{app: web}}}}, {}", from("namespaces: [b]")))], MTLS, false, None),
        c("selector in other namespace does not apply", vec![("other", "s", format!("selector: {{matchLabels: {{app: web}}}}, {}", from("namespaces: [b]")))], MTLS, true, None),
        c("empty selector = whole namespace", p(format!("selector: {{}}, {}", from("namespaces: [b]"))), MTLS, false, None),
        // --- order
        c("DENY beats ALLOW", vec![("app", "a", from("namespaces: [a]")), ("app", "d", deny("[{from: [{source: {namespaces: [a]}}]}]"))], MTLS, false, Some("app/d")),
        c("no ALLOW: allow", vec![("app", "d", deny("[{from: [{source: {namespaces: [b]}}]}]"))], MTLS, true, None),
        c("ALLOW exists, none matches: deny", vec![("app", "a1", from("namespaces: [b]")), ("app", "a2", from("namespaces: [c]"))], MTLS, false, None),
        c("second ALLOW matches", vec![("app", "a1", from("namespaces: [b]")), ("app", "a2", from("namespaces: [a]"))], MTLS, true, Some("app/a2")),
        // --- HTTP-only attributes
        c("ALLOW methods: rule never matches", p(allow("[{to: [{operation: {methods: [GET]}}]}]")), MTLS, false, None),
        c("ALLOW methods + ports: rule never matches", p(allow("[{to: [{operation: {methods: [GET], ports: ['80']}}]}]")), MTLS, false, None),
        c("ALLOW L7 rule beside L4 rule", p(allow("[{to: [{operation: {paths: [/x]}}]}, {from: [{source: {namespaces: [a]}}]}]")), MTLS, true, P),
        c("ALLOW requestPrincipals", p(from("requestPrincipals: ['*']")), MTLS, false, None),
        c("ALLOW when request.auth.claims", p(when("key: 'request.auth.claims[iss]', values: [x]")), MTLS, false, None),
        c("ALLOW unknown source field", p(from("namespaces: [a], bogus: [x]")), MTLS, false, None),
        c("DENY methods only: denies all", p(deny("[{to: [{operation: {methods: [GET]}}]}]")), MTLS, false, P),
        c("DENY methods + ports: other port allowed", p(deny("[{to: [{operation: {methods: [GET], ports: ['8080']}}]}]")), MTLS, true, None),
        c("DENY methods + ports: that port denied", p(deny("[{to: [{operation: {methods: [GET], ports: ['80']}}]}]")), MTLS, false, P),
        c("DENY when request.headers ignored", p(deny("[{from: [{source: {namespaces: [a]}}], when: [{key: 'request.headers[x]', values: [v]}]}]")), MTLS, false, P),
        c("DENY L7 source beside L4 source: whole from matches", p(deny("[{from: [{source: {namespaces: [b]}}, {source: {requestPrincipals: ['*']}}]}]")), PLAIN, false, P),
        // --- empty rules
        c("ALLOW rules: [] allows nothing", p(allow("[]")), MTLS, false, None),
        c("ALLOW spec {} allows nothing", p(String::new()), MTLS, false, None),
        c("ALLOW - {} allows all", p(allow("[{}]")), PLAIN, true, P),
        c("DENY - {} denies all", p(deny("[{}]")), MTLS, false, P),
        c("DENY rules: [] has no effect", p(deny("[]")), MTLS, true, None),
        c("DENY without rules has no effect", p("action: DENY".to_owned()), MTLS, true, None),
    ]
}

fn run(case: &Case) -> Decision {
    let policies: Vec<Policy> = case
        .policies
        .iter()
        .map(|(ns, name, spec)| parse(&doc(ns, name, spec)))
        .collect();
    let set = PolicySet::new(policies, ROOT.to_owned());
    let (ns, labels, names) = case.target;
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let target = Target {
        namespace: ns,
        labels: &labels,
        policy_names: &names,
    };
    let facts = ConnFacts {
        source_ip: ip(case.conn.src),
        source_principal: case.conn.principal,
        // Deliberately set even for plaintext: it must be ignored then.
        source_namespace: Some("a"),
        destination_ip: ip(case.conn.dst),
        destination_port: case.conn.port,
    };
    evaluate(&set, &target, &facts)
}

#[test]
fn evaluation_table() {
    let cases = cases();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in &cases {
        let d = run(case);
        if d.is_allowed() != case.allowed || d.policy() != case.by {
            failures.push(format!(
                "{}: got {:?}, want allowed={} by={:?}",
                case.name, d.verdict, case.allowed, case.by
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn local_policies(yaml: &str) -> Vec<Policy> {
    #[derive(serde::Deserialize)]
    struct Cfg {
        policies: Vec<LocalPolicy>,
    }
    let cfg: Cfg = serde_saphyr::from_str(yaml).expect("local yaml");
    cfg.policies
        .into_iter()
        .map(|p| Policy::try_from(p).expect("local policy"))
        .collect()
}

#[test]
fn selector_policy_attached_by_name() {
    let policies = local_policies(
        "policies:\n- {name: sel, namespace: app, scope: WorkloadSelector, action: Deny, rules: [[[{destinationPorts: [80]}]]]}\n",
    );
    let set = PolicySet::new(policies, ROOT.to_owned());
    // A label-less selector never selects by labels ...
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let mut target = Target {
        namespace: "app",
        labels: &labels,
        policy_names: &[],
    };
    let facts = ConnFacts {
        source_ip: ip("10.0.1.5"),
        source_principal: None,
        source_namespace: None,
        destination_ip: ip(DST),
        destination_port: 80,
    };
    assert!(evaluate(&set, &target, &facts).is_allowed());
    // ... only when the workload names it.
    let names = ["app/sel".to_owned(), "app/unknown".to_owned()];
    target.policy_names = &names;
    let d = evaluate(&set, &target, &facts);
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            by: Some("app/sel".to_owned())
        }
    );
    // Named in another namespace's workload: still applies (ztunnel semantics).
    target.namespace = "elsewhere";
    assert!(!evaluate(&set, &target, &facts).is_allowed());
}

#[test]
fn local_global_scope_applies_everywhere() {
    let policies = local_policies(
        "policies:\n- {name: g, namespace: anywhere, scope: Global, action: Deny, rules: [[]]}\n",
    );
    let set = PolicySet::new(policies, ROOT.to_owned());
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "app",
        labels: &labels,
        policy_names: &[],
    };
    let facts = ConnFacts {
        source_ip: ip("10.0.1.5"),
        source_principal: None,
        source_namespace: None,
        destination_ip: ip(DST),
        destination_port: 80,
    };
    assert_eq!(
        evaluate(&set, &target, &facts).verdict,
        Verdict::Deny {
            by: Some("anywhere/g".to_owned())
        }
    );
}

#[test]
fn dry_run_is_reported_not_enforced() {
    let dry = "metadata:\n  name: d\n  namespace: app\n  annotations: {istio.io/dry-run: \"true\"}\nspec: {action: DENY, rules: [{}]}\n";
    let dry_allow = "metadata:\n  name: da\n  namespace: app\n  annotations: {istio.io/dry-run: \"true\"}\nspec: {rules: [{from: [{source: {namespaces: [b]}}]}]}\n";
    let policies = vec![parse(dry), parse(dry_allow)];
    assert!(policies.iter().all(|p| p.dry_run));
    let set = PolicySet::new(policies, ROOT.to_owned());
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "app",
        labels: &labels,
        policy_names: &[],
    };
    let facts = ConnFacts {
        source_ip: ip("10.0.1.5"),
        source_principal: Some(CLIENT),
        source_namespace: Some("a"),
        destination_ip: ip(DST),
        destination_port: 80,
    };
    let d = evaluate(&set, &target, &facts);
    // A dry-run ALLOW does not count as "an ALLOW policy applies".
    assert_eq!(d.verdict, Verdict::Allow { by: None });
    assert_eq!(
        d.dry_run,
        vec![
            DryRun {
                policy: "app/d".to_owned(),
                would_allow: false
            },
            DryRun {
                policy: "app/da".to_owned(),
                would_allow: false
            },
        ]
    );
}

#[test]
fn dry_run_beside_enforced_policy() {
    let enforced = parse(&doc("app", "a", &from("namespaces: [a]")));
    let mut shadow = parse(&doc("app", "s", &from("namespaces: [a]")));
    shadow.dry_run = true;
    let set = PolicySet::new(vec![enforced, shadow], ROOT.to_owned());
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "app",
        labels: &labels,
        policy_names: &[],
    };
    let facts = ConnFacts {
        source_ip: ip("10.0.1.5"),
        source_principal: Some(CLIENT),
        source_namespace: None,
        destination_ip: ip(DST),
        destination_port: 80,
    };
    let d = evaluate(&set, &target, &facts);
    assert_eq!(
        d.verdict,
        Verdict::Allow {
            by: Some("app/a".to_owned())
        }
    );
    assert_eq!(
        d.dry_run,
        vec![DryRun {
            policy: "app/s".to_owned(),
            would_allow: true
        }]
    );
}

#[test]
fn each_applicable_policy_counts_once() {
    // In scope three ways at once: by root selector, by name, and named twice.
    let mut shadow = parse(&doc(
        ROOT,
        "s",
        "selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]",
    ));
    shadow.dry_run = true;
    let mut ns_wide = parse(&doc(ROOT, "g", "action: DENY, rules: [{}]"));
    ns_wide.dry_run = true;
    let set = PolicySet::new(vec![shadow, ns_wide], ROOT.to_owned());
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let names = [
        "istio-system/s".to_owned(),
        "istio-system/s".to_owned(),
        "istio-system/g".to_owned(),
    ];
    for ns in [ROOT, "app"] {
        let target = Target {
            namespace: ns,
            labels: &labels,
            policy_names: &names,
        };
        let facts = ConnFacts {
            source_ip: ip("10.0.1.5"),
            source_principal: None,
            source_namespace: None,
            destination_ip: ip(DST),
            destination_port: 80,
        };
        let d = evaluate(&set, &target, &facts);
        let got: Vec<&str> = d.dry_run.iter().map(|r| r.policy.as_str()).collect();
        assert_eq!(
            got,
            ["istio-system/g", "istio-system/s"],
            "target namespace {ns}"
        );
    }
}

#[test]
fn duplicate_keys_keep_the_later_policy_and_root_promotion() {
    let first = parse(&doc("app", "p", &from("namespaces: [a]")));
    let second = parse(&doc("app", "p", &from("namespaces: [b]")));
    let root = parse(&doc(ROOT, "mesh", &allow("[{}]")));
    assert_eq!(root.scope, Scope::Namespace);
    let set = PolicySet::new(vec![first, second.clone(), root], ROOT.to_owned());
    assert_eq!(set.len(), 2);
    assert_eq!(set.get("app/p"), Some(&second));
    assert_eq!(
        set.get("istio-system/mesh").map(|p| &p.scope),
        Some(&Scope::Global)
    );
}

#[test]
fn config_dump_serialization() {
    let pol = parse(&doc(
        "app",
        "p",
        "selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: ['cluster.local/ns/a/*'], ipBlocks: [10.0.0.1]}}], to: [{operation: {ports: ['80'], methods: [GET]}}]}], action: DENY",
    ));
    let set = PolicySet::new(vec![pol], ROOT.to_owned());
    let v = serde_json::to_value(&set).expect("serializable");
    let expected = serde_json::json!({
        "rootNamespace": "istio-system",
        "policies": [{
            "name": "p",
            "namespace": "app",
            "scope": {"workloadSelector": {"matchLabels": {"app": "web"}}},
            "action": "Deny",
            "rules": [[
                [{"principals": [{"Prefix": "cluster.local/ns/a/"}], "sourceIps": ["10.0.0.1/32"]}],
                [{"destinationPorts": [80]}]
            ]],
            "dryRun": false,
            "warnings": ["spec.rules[0]: HTTP-only attributes (methods) cannot be enforced at L4; this DENY rule is applied without them (fail closed)"]
        }]
    });
    assert_eq!(v, expected);
}
