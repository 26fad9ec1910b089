//! Property tests of the parsers the fuzz targets cover (fuzz/, scripts/fuzz.sh), run in the
//! normal suite on stable: every parser survives arbitrary input, and inputs generated valid
//! give exactly what they describe (round trips, counts, the decision and its status code).
//! Case counts are modest so the whole file takes seconds in a debug build; the fuzzers are
//! where the long searches happen.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use http::{Method, Request, StatusCode, Uri};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};

use weft::authz::{self, Action, AuthzError, Scope, StringMatch};
use weft::cni::plugin::{run, Invocation};
use weft::cni::wire::{CaptureCommand, CaptureRequest};
use weft::hbone::wire::{self, ConnectRequest};
use weft::proto::security as spb;
use weft::proto::workload as wpb;
use weft::proto::zds as zpb;
use weft::state::local::{self, Defaults, LocalConfigError};
use weft::state::Protocol;
use weft::xds::translate::{self as xds, Translated};

/// 48 cases a property unless `PROPTEST_CASES` asks for more (a longer search by hand).
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48);
    ProptestConfig {
        cases,
        // A failure is shrunk, but not for minutes.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn defaults() -> Defaults {
    Defaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    }
}

// --- strategies ------------------------------------------------------------------------------

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![ipv4().prop_map(IpAddr::V4), ipv6().prop_map(IpAddr::V6)]
}

/// A DNS-label-like name, as Kubernetes names are.
fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,14}"
}

/// Any printable text (names in a local file are not checked against Kubernetes' rules).
fn text() -> impl Strategy<Value = String> {
    "\\PC{1,16}"
}

/// YAML-ish noise: the characters YAML gives meaning to, plus the words weft looks for.
fn yamlish() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            Just("\n".to_string()),
            Just("---\n".to_string()),
            Just("...\n".to_string()),
            Just("  ".to_string()),
            Just("- ".to_string()),
            Just(": ".to_string()),
            "[{}\\[\\],:&*!|>'\"%@`#?-]".prop_map(String::from),
            prop_oneof![
                Just("workloads"),
                Just("services"),
                Just("policies"),
                Just("kind"),
                Just("apiVersion"),
                Just("AuthorizationPolicy"),
                Just("security.istio.io/v1"),
                Just("metadata"),
                Just("name"),
                Just("namespace"),
                Just("spec"),
                Just("rules"),
                Just("from"),
                Just("source"),
                Just("principals"),
                Just("workloadIps"),
                Just("vips"),
                Just("10.0.0.1"),
                Just("fd00::1"),
                Just("null"),
                Just("~"),
                Just("<<"),
            ]
            .prop_map(String::from),
            "[a-z0-9]{1,6}",
        ],
        0..60,
    )
    .prop_map(|parts| parts.concat())
}

/// Arbitrary JSON, its keys biased towards the fields of an AuthorizationPolicy so that the
/// walker is reached below the top level.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("apiVersion".to_string()),
        Just("kind".to_string()),
        Just("metadata".to_string()),
        Just("name".to_string()),
        Just("namespace".to_string()),
        Just("annotations".to_string()),
        Just("spec".to_string()),
        Just("action".to_string()),
        Just("selector".to_string()),
        Just("matchLabels".to_string()),
        Just("rules".to_string()),
        Just("from".to_string()),
        Just("to".to_string()),
        Just("when".to_string()),
        Just("source".to_string()),
        Just("operation".to_string()),
        Just("principals".to_string()),
        Just("notPrincipals".to_string()),
        Just("ipBlocks".to_string()),
        Just("ports".to_string()),
        Just("key".to_string()),
        Just("values".to_string()),
        "[a-zA-Z.]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![
            Just("security.istio.io/v1".to_string()),
            Just("AuthorizationPolicy".to_string()),
            Just("ALLOW".to_string()),
            Just("DENY".to_string()),
            Just("*".to_string()),
            Just("10.0.0.0/8".to_string()),
            Just("8080".to_string()),
            Just("source.ip".to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key.clone(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

// --- the local configuration file --------------------------------------------------------------

#[derive(Debug, Clone)]
struct GenWorkload {
    name: String,
    namespace: String,
    service_account: Option<String>,
    ips: Vec<IpAddr>,
    hbone: bool,
}

#[derive(Debug, Clone)]
struct GenService {
    name: String,
    namespace: String,
    /// (network, vip): written `network/vip`, or bare when the network is empty.
    vips: Vec<(String, IpAddr)>,
    ports: BTreeMap<u16, u16>,
}

/// Workloads with unique addresses: the i-th gets addresses whose first bytes say i.
fn workloads() -> impl Strategy<Value = Vec<GenWorkload>> {
    vec(
        (
            text(),
            text(),
            proptest::option::of(name()),
            vec(ip(), 0..3),
            any::<bool>(),
        ),
        0..6,
    )
    .prop_map(|ws| {
        ws.into_iter()
            .enumerate()
            .map(|(i, (name, namespace, service_account, ips, hbone))| {
                let ips = ips
                    .into_iter()
                    .enumerate()
                    .map(|(j, ip)| unique_ip(ip, i, j))
                    .collect();
                GenWorkload {
                    // The index keeps the (namespace, name) pairs, so the uids, apart.
                    name: format!("{name}-{i}"),
                    namespace,
                    service_account,
                    ips,
                    hbone,
                }
            })
            .collect()
    })
}

/// `ip` with its leading bytes replaced by (i, j), so that no two generated addresses are equal.
fn unique_ip(ip: IpAddr, i: usize, j: usize) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(Ipv4Addr::new(i as u8, j as u8, o[2], o[3]))
        }
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[0] = 0xfd00 | i as u16;
            s[1] = j as u16;
            IpAddr::V6(Ipv6Addr::from(s))
        }
    }
}

fn services() -> impl Strategy<Value = Vec<GenService>> {
    vec(
        (
            name(),
            name(),
            vec(("[a-z0-9]{0,6}", ip()), 0..3),
            btree_map(any::<u16>(), any::<u16>(), 0..4),
        ),
        0..4,
    )
    .prop_map(|ss| {
        ss.into_iter()
            .enumerate()
            .map(|(i, (name, namespace, vips, ports))| GenService {
                name: format!("{name}-{i}"),
                namespace,
                vips,
                ports,
            })
            .collect()
    })
}

/// A YAML double-quoted scalar: JSON's string syntax is a subset of it.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The file as a person would write it, and the line each workload's entry starts on.
fn config_text(ws: &[GenWorkload], ss: &[GenService]) -> (String, Vec<usize>) {
    let mut out = String::new();
    let mut lines = Vec::new();
    let line = |out: &String| out.matches('\n').count() + 1;
    if !ws.is_empty() {
        out.push_str("workloads:\n");
    }
    for w in ws {
        lines.push(line(&out));
        out.push_str(&format!(
            "- name: {}\n  namespace: {}\n",
            q(&w.name),
            q(&w.namespace)
        ));
        if let Some(sa) = &w.service_account {
            out.push_str(&format!("  serviceAccount: {sa}\n"));
        }
        let ips: Vec<String> = w.ips.iter().map(|ip| q(&ip.to_string())).collect();
        out.push_str(&format!("  workloadIps: [{}]\n", ips.join(", ")));
        let protocol = if w.hbone { "HBONE" } else { "TCP" };
        out.push_str(&format!("  protocol: {protocol}\n"));
    }
    if !ss.is_empty() {
        out.push_str("services:\n");
    }
    for s in ss {
        out.push_str(&format!(
            "- name: {}\n  namespace: {}\n  hostname: {}.{}.svc.cluster.local\n",
            s.name, s.namespace, s.name, s.namespace
        ));
        let vips: Vec<String> = s
            .vips
            .iter()
            .map(|(net, ip)| match net.as_str() {
                "" => q(&ip.to_string()),
                net => q(&format!("{net}/{ip}")),
            })
            .collect();
        out.push_str(&format!("  vips: [{}]\n", vips.join(", ")));
        let ports: Vec<String> = s.ports.iter().map(|(p, t)| format!("{p}: {t}")).collect();
        out.push_str(&format!("  ports: {{{}}}\n", ports.join(", ")));
    }
    (out, lines)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn local_config_never_panics(s in prop_oneof![yamlish(), "\\PC{0,200}"]) {
        let _ = local::parse(&s, Path::new("c.yaml"), &defaults()).map_err(|e| e.to_string());
    }

    #[test]
    fn local_config_gives_what_it_says(ws in workloads(), ss in services()) {
        let (text, _) = config_text(&ws, &ss);
        let file = local::parse(&text, Path::new("c.yaml"), &defaults())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let d = file.data;
        prop_assert!(file.rejected_policies.is_empty());
        prop_assert_eq!(d.workloads.len(), ws.len());
        for (got, want) in d.workloads.iter().zip(&ws) {
            prop_assert_eq!(&got.name, &want.name);
            prop_assert_eq!(&got.namespace, &want.namespace);
            prop_assert_eq!(
                &got.uid,
                &format!("Kubernetes//Pod/{}/{}", want.namespace, want.name)
            );
            prop_assert_eq!(&got.workload_ips, &want.ips);
            prop_assert_eq!(
                got.service_account.as_str(),
                want.service_account.as_deref().unwrap_or("default")
            );
            prop_assert_eq!(&got.trust_domain, "cluster.local");
            let protocol = if want.hbone { Protocol::HBONE } else { Protocol::TCP };
            prop_assert_eq!(got.protocol, protocol);
        }
        prop_assert_eq!(d.services.len(), ss.len());
        for (got, want) in d.services.iter().zip(&ss) {
            let vips: Vec<IpAddr> = want.vips.iter().map(|(_, ip)| *ip).collect();
            prop_assert_eq!(&got.vips, &vips);
            prop_assert_eq!(&got.ports, &want.ports);
        }
    }

    /// Two workloads may not share an address; the error names the second one's line.
    #[test]
    fn local_config_refuses_a_shared_address(
        ws in workloads().prop_filter("two workloads, the first with an address", |ws| {
            ws.len() >= 2 && !ws[0].ips.is_empty()
        }),
        k in any::<prop::sample::Index>(),
    ) {
        let mut ws = ws;
        let second = 1 + k.index(ws.len() - 1);
        let shared = ws[0].ips[0];
        ws[second].ips.push(shared);
        let (text, lines) = config_text(&ws, &[]);
        match local::parse(&text, Path::new("c.yaml"), &defaults()) {
            Err(LocalConfigError::Invalid { line, message, .. }) => {
                prop_assert_eq!(line as usize, lines[second], "{}", text);
                prop_assert!(message.contains(&shared.to_string()), "{}", message);
            }
            other => prop_assert!(false, "expected Invalid, got {:?}", other.map(|_| ())),
        }
    }
}

/// Names that need YAML's quoting keep every character: YAML 1.2 has only `\n` and `\r` as
/// line breaks, so a Unicode line or paragraph separator, a no-break space or a tab inside a
/// quoted name is part of the name.
#[test]
fn local_config_keeps_unusual_names() {
    for name in [
        "a\u{2028}b",
        "a\u{2029}b",
        "a\u{a0}b",
        "a\tb",
        " lead",
        "trail ",
        "# not a comment",
        "key: value",
        "quote\"d",
        "null",
        "yes",
        "~",
        "*alias",
        "&anchor",
        "- item",
        "10.0.0.1",
        "0x1F",
        "1e3",
    ] {
        let ws = [GenWorkload {
            name: name.to_string(),
            namespace: name.to_string(),
            service_account: None,
            ips: Vec::new(),
            hbone: false,
        }];
        let (text, _) = config_text(&ws, &[]);
        let d = local::parse(&text, Path::new("c.yaml"), &defaults())
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .data;
        assert_eq!(d.workloads[0].name, name, "{text}");
        assert_eq!(d.workloads[0].namespace, name, "{text}");
    }
}

// --- Kubernetes AuthorizationPolicy ------------------------------------------------------------

#[derive(Debug, Clone)]
struct GenRule {
    principals: Vec<String>,
    ip_blocks: Vec<String>,
    ports: Vec<u16>,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    name: String,
    namespace: String,
    deny: bool,
    labels: BTreeMap<String, String>,
    rules: Vec<GenRule>,
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        (ipv4(), 0u8..=32).prop_map(|(ip, len)| format!("{ip}/{len}")),
        (ipv6(), 0u8..=128).prop_map(|(ip, len)| format!("{ip}/{len}")),
        ip().prop_map(|ip| ip.to_string()),
    ]
}

fn k8s_policy() -> impl Strategy<Value = GenPolicy> {
    let rule = (
        vec(
            (name(), name()).prop_map(|(ns, sa)| format!("cluster.local/ns/{ns}/sa/{sa}")),
            0..3,
        ),
        vec(cidr(), 0..3),
        vec(any::<u16>(), 0..3),
    )
        .prop_map(|(principals, ip_blocks, ports)| GenRule {
            principals,
            ip_blocks,
            ports,
        });
    (
        name(),
        name(),
        any::<bool>(),
        btree_map("[a-z]{1,8}", name(), 0..3),
        vec(rule, 0..6),
    )
        .prop_map(|(name, namespace, deny, labels, rules)| GenPolicy {
            name,
            namespace,
            deny,
            labels,
            rules,
        })
}

fn k8s_json(p: &GenPolicy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let mut rule = serde_json::Map::new();
            let mut source = serde_json::Map::new();
            if !r.principals.is_empty() {
                source.insert("principals".into(), json!(r.principals));
            }
            if !r.ip_blocks.is_empty() {
                source.insert("ipBlocks".into(), json!(r.ip_blocks));
            }
            if !source.is_empty() {
                rule.insert("from".into(), json!([{ "source": source }]));
            }
            if !r.ports.is_empty() {
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                rule.insert("to".into(), json!([{ "operation": { "ports": ports } }]));
            }
            Value::Object(rule)
        })
        .collect();
    let mut spec = json!({
        "action": if p.deny { "DENY" } else { "ALLOW" },
        "rules": rules,
    });
    if !p.labels.is_empty() {
        spec["selector"] = json!({ "matchLabels": p.labels });
    }
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": p.name, "namespace": p.namespace },
        "spec": spec,
    })
}

fn check_translated(got: &authz::Policy, want: &GenPolicy) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.key(), format!("{}/{}", want.namespace, want.name));
    let action = if want.deny {
        Action::Deny
    } else {
        Action::Allow
    };
    prop_assert_eq!(got.action, action);
    match &got.scope {
        Scope::WorkloadSelector { match_labels } => prop_assert_eq!(match_labels, &want.labels),
        Scope::Namespace => prop_assert!(want.labels.is_empty()),
        Scope::Global => prop_assert!(false, "namespace policy became global before the set"),
    }
    prop_assert_eq!(got.rules.len(), want.rules.len());
    for (g, w) in got.rules.iter().zip(&want.rules) {
        // `from` is one clause, `to` another; an empty rule has none (it matches everything).
        let from = !(w.principals.is_empty() && w.ip_blocks.is_empty());
        let clauses = usize::from(from) + usize::from(!w.ports.is_empty());
        prop_assert_eq!(g.clauses.len(), clauses);
        if from {
            let m = &g.clauses[0].matches[0];
            let principals: Vec<StringMatch> = w
                .principals
                .iter()
                .map(|p| StringMatch::Exact(p.clone()))
                .collect();
            prop_assert_eq!(&m.principals, &principals);
            prop_assert_eq!(m.source_ips.len(), w.ip_blocks.len());
        }
        if !w.ports.is_empty() {
            let m = &g.clauses[clauses - 1].matches[0];
            prop_assert_eq!(&m.destination_ports, &w.ports);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn k8s_yaml_never_panics(s in prop_oneof![yamlish(), "\\PC{0,200}"]) {
        for r in authz::parse_k8s_yaml_stream(&s) {
            let _ = r.map_err(|e| e.to_string());
        }
    }

    #[test]
    fn k8s_value_never_panics(v in json_value()) {
        let _ = authz::from_k8s_value(&v).map_err(|e| e.to_string());
    }

    /// A generated policy with N rules is one policy with N rules, as JSON and as YAML.
    #[test]
    fn k8s_policy_gives_what_it_says(p in k8s_policy()) {
        let v = k8s_json(&p);
        let got = authz::from_k8s_value(&v)
            .map_err(|e| TestCaseError::fail(format!("{e}: {v}")))?;
        check_translated(&got, &p)?;
        prop_assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    /// A stream of K documents (JSON is YAML) gives K policies, in order.
    #[test]
    fn k8s_stream_keeps_every_document(ps in vec(k8s_policy(), 1..5)) {
        let text: String = ps
            .iter()
            .map(|p| format!("---\n{}\n", serde_json::to_string_pretty(&k8s_json(p)).unwrap()))
            .collect();
        let got = authz::parse_k8s_yaml_stream(&text);
        prop_assert_eq!(got.len(), ps.len());
        for (g, want) in got.iter().zip(&ps) {
            let g = g.as_ref().map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            check_translated(g, want)?;
        }
    }

    /// One bad document is rejected alone, with its own number; the others load.
    #[test]
    fn k8s_stream_rejects_a_bad_port_alone(
        ps in vec(k8s_policy(), 2..5),
        k in any::<prop::sample::Index>(),
        port in 65536u32..1_000_000,
    ) {
        let bad = k.index(ps.len());
        let docs: Vec<String> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut v = k8s_json(p);
                if i == bad {
                    v["spec"]["rules"] = json!([{ "to": [{ "operation": { "ports": [port.to_string()] } }] }]);
                }
                format!("---\n{}\n", serde_json::to_string(&v).unwrap())
            })
            .collect();
        let got = authz::parse_k8s_yaml_stream(&docs.concat());
        prop_assert_eq!(got.len(), ps.len());
        for (i, r) in got.iter().enumerate() {
            if i == bad {
                match r {
                    Err(AuthzError::InDocument { index, .. }) => prop_assert_eq!(*index, i + 1),
                    other => prop_assert!(false, "document {} gave {:?}", i + 1, other),
                }
                let e = r.as_ref().unwrap_err().to_string();
                prop_assert!(e.contains(&port.to_string()), "{}", e);
            } else {
                prop_assert!(r.is_ok(), "document {}: {:?}", i + 1, r);
            }
        }
    }
}

// --- the HBONE CONNECT request -----------------------------------------------------------------

fn connect(method: Method, authority: &str) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = Uri::builder()
        .authority(authority)
        .build()
        .expect("a valid authority");
    r
}

proptest! {
    #![proptest_config(config())]

    /// A CONNECT to `ip:port` of the address the tunnel came on gives that destination, also
    /// when the listener reports an IPv4 peer as IPv4-mapped IPv6.
    #[test]
    fn connect_to_the_arrival_address_is_accepted(ip in ip(), port in any::<u16>()) {
        let dest = SocketAddr::new(ip, port);
        let r = connect(Method::CONNECT, &wire::host_port(dest));
        prop_assert_eq!(wire::validate(&r, ip).ok(), Some(dest.into()));
        if let IpAddr::V4(v4) = ip {
            prop_assert_eq!(wire::validate(&r, IpAddr::V6(v4.to_ipv6_mapped())).ok(), Some(dest.into()));
        }
    }

    /// A DNS name and a port (double HBONE's authority) is accepted as a service, lowercased;
    /// what the receiver maps it to is admission's business.
    #[test]
    fn connect_to_a_service_name_is_accepted(
        ip in ip(),
        host in "[a-zA-Z][a-zA-Z0-9-]{0,8}[a-z](\\.[a-z][a-z0-9]{0,9}){0,3}",
        port in any::<u16>(),
    ) {
        let r = connect(Method::CONNECT, &format!("{host}:{port}"));
        prop_assert_eq!(
            wire::validate(&r, ip).ok(),
            Some(wire::Authority::Service { host: host.to_ascii_lowercase(), port })
        );
    }

    /// Anything else is a 400: another address, another method, a name without a port, no
    /// port.
    #[test]
    fn connect_elsewhere_is_refused_with_400(
        ip in ip(),
        other in ip(),
        port in any::<u16>(),
        host in "[a-z]{1,10}(\\.[a-z]{1,10}){0,2}",
        method in prop_oneof![
            Just(Method::GET), Just(Method::POST), Just(Method::PUT), Just(Method::OPTIONS)
        ],
    ) {
        prop_assume!(wire::canonical(ip) != wire::canonical(other));
        let dest = wire::host_port(SocketAddr::new(ip, port));
        let bare = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        for r in [
            connect(Method::CONNECT, &wire::host_port(SocketAddr::new(other, port))),
            connect(method.clone(), &dest),
            connect(Method::CONNECT, &host),
            connect(Method::CONNECT, &bare),
        ] {
            let e = wire::validate(&r, ip).expect_err("refused");
            prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        // Not even an authority.
        let mut r = Request::new(());
        *r.method_mut() = Method::CONNECT;
        prop_assert_eq!(wire::validate(&r, ip).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    /// What weft's client builds, weft's server accepts, and it reads the client back.
    #[test]
    fn connect_request_round_trips(
        dest in ip(), dport in any::<u16>(), client in ip(), cport in any::<u16>(),
        baggage in "\\PC{0,40}",
    ) {
        let (dest, client) = (SocketAddr::new(dest, dport), SocketAddr::new(client, cport));
        let r = wire::connect_request(&ConnectRequest { authority: dest.into(), client, baggage, service_host: None, origin_network: None });
        prop_assert_eq!(wire::validate(&r, dest.ip()).ok(), Some(dest.into()));
        prop_assert_eq!(wire::forwarded_for(&r), Some(client));
    }

    /// `forwarded` finds the first well-formed `for=` among other pairs and elements.
    #[test]
    fn forwarded_for_finds_the_client(
        client in ip(), port in any::<u16>(),
        before in vec("(proto|by|host)=[a-z0-9.]{1,10}", 0..3),
        after in vec("(for=garbage|proto=https)", 0..3),
        sep in prop_oneof![Just(";"), Just(","), Just(", ")],
    ) {
        let addr = SocketAddr::new(client, port);
        let mut parts = before;
        parts.push(format!("for=\"{}\"", wire::host_port(addr)));
        parts.extend(after);
        let mut r = connect(Method::CONNECT, "10.0.0.1:80");
        r.headers_mut().insert("forwarded", parts.join(sep).parse().unwrap());
        prop_assert_eq!(wire::forwarded_for(&r), Some(addr));
    }

    #[test]
    fn forwarded_never_panics(v in "[ -~]{0,80}") {
        let mut r = connect(Method::CONNECT, "10.0.0.1:80");
        if let Ok(h) = v.parse() {
            r.headers_mut().insert("forwarded", h);
        }
        let _ = wire::forwarded_for(&r);
    }
}

// --- xDS -------------------------------------------------------------------------------------------

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn xds_defaults() -> xds::Defaults {
    xds::Defaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    }
}

#[derive(Debug, Clone)]
struct GenXdsWorkload {
    uid: String,
    ips: Vec<IpAddr>,
    hbone: bool,
    services: BTreeMap<String, BTreeMap<u16, u16>>,
}

fn xds_workload() -> impl Strategy<Value = GenXdsWorkload> {
    (
        "[a-zA-Z0-9/._-]{1,30}",
        vec(ip(), 0..4),
        any::<bool>(),
        btree_map(
            (name(), name()).prop_map(|(ns, h)| format!("{ns}/{h}.{ns}.svc.cluster.local")),
            btree_map(any::<u16>(), any::<u16>(), 0..3),
            0..3,
        ),
    )
        .prop_map(|(uid, ips, hbone, services)| GenXdsWorkload {
            uid,
            ips,
            hbone,
            services,
        })
}

fn encode_workload(w: &GenXdsWorkload) -> Vec<u8> {
    let services: HashMap<String, wpb::PortList> = w
        .services
        .iter()
        .map(|(k, ports)| {
            let ports = ports
                .iter()
                .map(|(s, t)| wpb::Port {
                    service_port: u32::from(*s),
                    target_port: u32::from(*t),
                    app_protocol: 0,
                })
                .collect();
            (k.clone(), wpb::PortList { ports })
        })
        .collect();
    wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            uid: w.uid.clone(),
            name: "n".into(),
            namespace: "ns".into(),
            addresses: w.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            tunnel_protocol: if w.hbone {
                wpb::TunnelProtocol::Hbone as i32
            } else {
                wpb::TunnelProtocol::None as i32
            },
            services,
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn xds_decoders_never_panic(b in vec(any::<u8>(), 0..300)) {
        if let Ok(a) = wpb::Address::decode(b.as_slice()) {
            let _ = xds::address(a, &xds_defaults());
        }
        if let Ok(a) = spb::Authorization::decode(b.as_slice()) {
            let _ = authz::from_xds(a);
        }
    }

    /// A workload off the wire is the workload that was sent.
    #[test]
    fn xds_workload_round_trips(w in xds_workload()) {
        let bytes = encode_workload(&w);
        let a = wpb::Address::decode(bytes.as_slice()).expect("decodes");
        let Ok(Translated::Workload(got, endpoints)) = xds::address(a, &xds_defaults()) else {
            return Err(TestCaseError::fail("not translated to a workload"));
        };
        prop_assert_eq!(&got.uid, &w.uid);
        prop_assert_eq!(&got.workload_ips, &w.ips);
        prop_assert_eq!(got.protocol, if w.hbone { Protocol::HBONE } else { Protocol::TCP });
        prop_assert_eq!(got.service_account.as_str(), "default");
        let endpoints: BTreeMap<String, BTreeMap<u16, u16>> =
            endpoints.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        prop_assert_eq!(endpoints, w.services);
    }

    /// A port over 65535 or an address of another length than 4 or 16 refuses the resource,
    /// naming the value.
    #[test]
    fn xds_workload_refuses_what_it_cannot_hold(
        w in xds_workload(),
        port in 65536u32..,
        len in (0usize..40).prop_filter("not 4 or 16", |n| *n != 4 && *n != 16),
    ) {
        let a = wpb::Address::decode(encode_workload(&w).as_slice()).unwrap();
        let Some(wpb::address::Type::Workload(mut base)) = a.r#type else { unreachable!() };

        let mut bad_port = base.clone();
        bad_port.services.insert(
            "ns/h.ns.svc.cluster.local".into(),
            wpb::PortList { ports: vec![wpb::Port { service_port: 80, target_port: port, app_protocol: 0 }] },
        );
        let e = xds::address(
            wpb::Address { r#type: Some(wpb::address::Type::Workload(bad_port)) },
            &xds_defaults(),
        )
        .expect_err("refused");
        prop_assert!(e.reason.contains(&port.to_string()), "{}", e);

        base.addresses.push(vec![7; len]);
        let i = base.addresses.len() - 1;
        let e = xds::address(
            wpb::Address { r#type: Some(wpb::address::Type::Workload(base)) },
            &xds_defaults(),
        )
        .expect_err("refused");
        prop_assert!(e.what.ends_with(&format!("addresses[{i}]")), "{}", e);
    }
}

#[derive(Debug, Clone)]
struct GenXdsRule {
    /// Clauses of matches, each match with one principal, a CIDR and a port.
    clauses: Vec<Vec<(String, IpAddr, u8, u16)>>,
}

fn xds_rules() -> impl Strategy<Value = Vec<GenXdsRule>> {
    let one = ("[a-z./]{1,20}", ip(), any::<u8>(), any::<u16>());
    vec(
        vec(vec(one, 1..3), 1..3).prop_map(|clauses| GenXdsRule { clauses }),
        0..5,
    )
}

fn authorization(name: &str, ns: &str, deny: bool, rules: &[GenXdsRule]) -> spb::Authorization {
    spb::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: spb::Scope::Namespace as i32,
        action: if deny {
            spb::Action::Deny
        } else {
            spb::Action::Allow
        } as i32,
        rules: rules
            .iter()
            .map(|r| spb::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| spb::Clause {
                        matches: c
                            .iter()
                            .map(|(p, ip, len, port)| spb::Match {
                                principals: vec![spb::StringMatch {
                                    match_type: Some(spb::string_match::MatchType::Exact(
                                        p.clone(),
                                    )),
                                }],
                                source_ips: vec![spb::Address {
                                    address: ip_bytes(*ip),
                                    length: u32::from(*len),
                                }],
                                destination_ports: vec![u32::from(*port)],
                                ..Default::default()
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        ..Default::default()
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

proptest! {
    #![proptest_config(config())]

    /// An Authorization with N rules is a policy with N rules, clause for clause; a prefix
    /// longer than the address refuses it.
    #[test]
    fn xds_authorization_gives_what_it_says(
        name in name(), ns in name(), deny in any::<bool>(), rules in xds_rules(),
    ) {
        let too_long = rules
            .iter()
            .flat_map(|r| r.clauses.iter().flatten())
            .find(|(_, ip, len, _)| *len > max_prefix(*ip));
        let bytes = authorization(&name, &ns, deny, &rules).encode_to_vec();
        let a = spb::Authorization::decode(bytes.as_slice()).expect("decodes");
        match (authz::from_xds(a), too_long) {
            (Err(e), Some(_)) => prop_assert!(e.to_string().contains("prefix length"), "{}", e),
            (Ok(p), None) => {
                prop_assert_eq!(p.key(), format!("{ns}/{name}"));
                prop_assert_eq!(p.action, if deny { Action::Deny } else { Action::Allow });
                prop_assert_eq!(p.rules.len(), rules.len());
                for (g, w) in p.rules.iter().zip(&rules) {
                    prop_assert_eq!(g.clauses.len(), w.clauses.len());
                    for (gc, wc) in g.clauses.iter().zip(&w.clauses) {
                        prop_assert_eq!(gc.matches.len(), wc.len());
                        for (m, (_, ip, len, port)) in gc.matches.iter().zip(wc) {
                            prop_assert_eq!(&m.destination_ports, &vec![*port]);
                            prop_assert_eq!(m.source_ips[0].addr(), *ip);
                            prop_assert_eq!(m.source_ips[0].prefix_len(), *len);
                        }
                    }
                }
            }
            (r, too_long) => prop_assert!(false, "{:?} with too long a prefix {:?}", r, too_long),
        }
    }
}

// --- ZDS ---------------------------------------------------------------------------------------

fn zds_request() -> impl Strategy<Value = zpb::WorkloadRequest> {
    use zpb::workload_request::Payload;
    let uid = "\\PC{0,20}";
    prop_oneof![
        (uid, proptest::option::of((name(), name(), name()))).prop_map(|(uid, info)| {
            Payload::Add(zpb::AddWorkload {
                uid,
                workload_info: info.map(|(name, namespace, service_account)| zpb::WorkloadInfo {
                    name,
                    namespace,
                    service_account,
                }),
            })
        }),
        uid.prop_map(|uid| Payload::Keep(zpb::KeepWorkload { uid })),
        uid.prop_map(|uid| Payload::Del(zpb::DelWorkload { uid })),
        Just(Payload::SnapshotSent(zpb::SnapshotSent {})),
    ]
    .prop_map(|p| zpb::WorkloadRequest { payload: Some(p) })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn zds_request_round_trips(req in zds_request()) {
        let got = zpb::WorkloadRequest::decode(req.encode_to_vec().as_slice()).expect("decodes");
        prop_assert_eq!(got, req);
    }

    #[test]
    fn zds_decoder_never_panics(b in vec(any::<u8>(), 0..200)) {
        let _ = zpb::WorkloadRequest::decode(b.as_slice());
    }
}

// --- CNI -----------------------------------------------------------------------------------------

fn capture_request() -> impl Strategy<Value = CaptureRequest> {
    (
        prop_oneof![
            Just(CaptureCommand::Add),
            Just(CaptureCommand::Del),
            Just(CaptureCommand::Check)
        ],
        "\\PC{1,20}",
        proptest::option::of("/[a-z/-]{1,20}"),
        name(),
        name(),
        proptest::option::of("\\PC{0,12}"),
        vec(ip(), 0..3),
    )
        .prop_map(
            |(command, container_id, netns, pod_namespace, pod_name, pod_uid, ips)| {
                CaptureRequest {
                    command,
                    container_id,
                    netns,
                    pod_namespace,
                    pod_name,
                    pod_uid,
                    ips,
                }
            },
        )
}

/// weft's socket for the plugin tests: in a directory that does not exist, so weft is never
/// reachable and nothing on this machine is asked.
const MISSING_SOCKET: &str = "/nonexistent-weft-prop/cni.sock";

fn invocation(command: &str, args: &str, conf: &Value) -> Invocation {
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "sandbox-1"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_ARGS", args),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Invocation {
        env,
        stdin: serde_json::to_vec(conf).unwrap(),
    }
}

proptest! {
    #![proptest_config(config())]

    /// What the plugin writes, weft reads back as it was; its pod key is the uid when there is
    /// one, else the sandbox.
    #[test]
    fn capture_request_round_trips(req in capture_request()) {
        let bytes = serde_json::to_vec(&req).unwrap();
        let got: CaptureRequest = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&got, &req);
        let want = match req.pod_uid.as_deref() {
            Some(u) if !u.is_empty() => u,
            _ => req.container_id.as_str(),
        };
        prop_assert_eq!(got.pod_key(), want);
    }

    #[test]
    fn capture_request_parser_never_panics(b in vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_slice::<CaptureRequest>(&b);
    }

    /// ADD of a mesh pod with weft unreachable: fails closed with "try again later" (11)
    /// unless the configuration says fail open, when the previous result passes through with
    /// the configuration's version; a pod of an excluded namespace is never asked about.
    #[test]
    fn cni_add_fails_closed_unless_told(
        ns in name(),
        pod in name(),
        fail_open in any::<bool>(),
        excluded in any::<bool>(),
        version in prop_oneof![Just("0.4.0"), Just("1.0.0"), Just("1.1.0")],
        ips in vec(ip(), 0..3),
    ) {
        let prev = json!({
            "cniVersion": "1.0.0",
            "ips": ips.iter().map(|ip| json!({"address": format!("{ip}/24")})).collect::<Vec<_>>(),
        });
        let conf = json!({
            "cniVersion": version,
            "name": "net",
            "type": "weft-cni",
            "socket": MISSING_SOCKET,
            "failOpen": fail_open,
            "excludeNamespaces": if excluded { vec![ns.clone()] } else { vec![] },
            "prevResult": prev,
        });
        let o = run(&invocation("ADD", &format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"), &conf));
        let out = o.stdout.expect("ADD prints");
        if fail_open || excluded {
            prop_assert_eq!(o.exit_code, 0, "{}", out);
            let mut want = prev.clone();
            want["cniVersion"] = json!(version);
            prop_assert_eq!(out, want);
        } else {
            prop_assert_eq!(o.exit_code, 1);
            prop_assert_eq!(&out["code"], &json!(11), "{}", out);
            prop_assert_eq!(&out["cniVersion"], &json!(version));
        }
    }

    /// An unsupported version is refused with code 1, undecodable configuration with code 6,
    /// whatever the command.
    #[test]
    fn cni_refuses_bad_configuration(
        version in "[0-9]\\.[0-9]\\.[0-9]".prop_filter("unsupported", |v| {
            !["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].contains(&v.as_str())
        }),
        garbage in vec(any::<u8>(), 0..40),
        command in prop_oneof![Just("ADD"), Just("DEL"), Just("CHECK"), Just("STATUS")],
    ) {
        let conf = json!({"cniVersion": version, "name": "n", "socket": MISSING_SOCKET});
        let o = run(&invocation(command, "", &conf));
        prop_assert_eq!(o.exit_code, 1);
        prop_assert_eq!(&o.stdout.unwrap()["code"], &json!(1));

        let mut inv = invocation(command, "", &Value::Null);
        inv.stdin = garbage;
        let o = run(&inv);
        if serde_json::from_slice::<Value>(&inv.stdin).map_or(true, |v| !v.is_object()) {
            prop_assert_eq!(o.exit_code, 1);
            prop_assert_eq!(&o.stdout.unwrap()["code"], &json!(6));
        }
    }
}

// --- the Kubernetes source -------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// A running pod with addresses is a workload with those addresses, HBONE exactly when its
    /// namespace is ambient and the pod does not opt out; a pod without addresses is none.
    #[test]
    fn k8s_pods_become_workloads(
        pods in vec((name(), vec(ip(), 0..3), any::<bool>(), any::<bool>()), 0..6),
    ) {
        use weft::k8s::translate::{translate, ClusterFacts, ClusterView};
        let namespaces = vec![
            serde_json::from_value(json!({
                "metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}
            }))
            .unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "plain"}})).unwrap(),
        ];
        let pods_json: Vec<Value> = pods
            .iter()
            .enumerate()
            .map(|(i, (name, ips, in_mesh_ns, opt_out))| {
                let mut labels = serde_json::Map::new();
                if *opt_out {
                    labels.insert("istio.io/dataplane-mode".into(), json!("none"));
                }
                let ips: Vec<Value> = ips
                    .iter()
                    .enumerate()
                    .map(|(j, ip)| json!({"ip": unique_ip(*ip, i, j).to_string()}))
                    .collect();
                json!({
                    "metadata": {
                        "name": format!("{name}-{i}"),
                        "namespace": if *in_mesh_ns { "mesh" } else { "plain" },
                        "labels": labels,
                    },
                    "spec": {"containers": []},
                    "status": {"phase": "Running", "podIPs": ips},
                })
            })
            .collect();
        let view = ClusterView {
            namespaces,
            pods: pods_json
                .iter()
                .map(|p| serde_json::from_value(p.clone()).unwrap())
                .collect(),
            ..ClusterView::default()
        };
        let facts = ClusterFacts {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            auto_allocate_vips: true,
        };
        let out = translate(&view, &facts, |_| false, |_| None);
        let expected: Vec<_> = pods.iter().enumerate().filter(|(_, p)| !p.1.is_empty()).collect();
        prop_assert_eq!(out.data.workloads.len(), expected.len());
        for (w, (i, (name, ips, in_mesh_ns, opt_out))) in out.data.workloads.iter().zip(expected) {
            prop_assert_eq!(&w.name, &format!("{name}-{i}"));
            let want: Vec<IpAddr> =
                ips.iter().enumerate().map(|(j, ip)| unique_ip(*ip, i, j)).collect();
            prop_assert_eq!(&w.workload_ips, &want);
            let mesh = *in_mesh_ns && !*opt_out;
            prop_assert_eq!(w.protocol, if mesh { Protocol::HBONE } else { Protocol::TCP });
        }
    }
}
