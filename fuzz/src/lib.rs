//! The fuzz targets' bodies: one function per target, taking the fuzzer's bytes.
//!
//! They live here rather than in `fuzz_targets/` so that weft's own test suite compiles this
//! file too (tests/fuzz_regressions.rs) and replays every saved crash and seed through exactly
//! the code the fuzzer ran, on stable and without libFuzzer. So this file uses only crates
//! weft depends on; where a target wants structure (a request from parts), it reads it with
//! [`Reader`] instead of `arbitrary`.
//!
//! A target panics only on a bug: a parser that panics, or an accepted value that breaks what
//! weft does next with it. Parsed values are pushed one step further, through the code that
//! consumes them (the state store, the policy evaluator, the client-side request builder), so a
//! parser letting through what its consumer cannot handle shows up here rather than on a node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use prost::Message;
use serde::de::DeserializeOwned;
use serde_json::Value;
use weft::authz::{ConnFacts, Policy, PolicySet, Scope, Target};
use weft::cni::plugin::{run, Invocation, Outcome};
use weft::cni::wire::{CaptureReply, CaptureRequest, MAX_REQUEST};
use weft::hbone::wire::{self, canonical, ConnectRequest};
use weft::k8s::translate::{translate, ClusterFacts, ClusterView};
use weft::proto::security::Authorization;
use weft::proto::workload::Address;
use weft::proto::zds::{workload_request::Payload, WorkloadRequest, WorkloadResponse, ZdsHello};
use weft::state::local::{self, Defaults};
use weft::state::{SourceData, StateStore};
use weft::xds::translate::{self as xds, Translated};

/// One target's body.
pub type Body = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/<name>.rs`, `fuzz/seeds/<name>/` and
/// `fuzz/regressions/<name>/`.
pub const TARGETS: &[(&str, Body)] = &[
    ("local_config", local_config),
    ("k8s_policy_yaml", k8s_policy_yaml),
    ("k8s_policy_json", k8s_policy_json),
    ("k8s_translate", k8s_translate),
    ("connect_validate", connect_validate),
    ("xds_address", xds_address),
    ("xds_authorization", xds_authorization),
    ("zds_request", zds_request),
    ("cni_plugin", cni_plugin),
    ("cni_wire", cni_wire),
    ("dns_query", dns_query),
];

/// Istio's default root namespace, so that a policy there is promoted to mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

const TRUST_DOMAIN: &str = "cluster.local";
const CLUSTER_ID: &str = "Kubernetes";

// ---------------------------------------------------------------------------------------------
// Configuration files and the Kubernetes source.

/// The local configuration file (`weft::state::local::parse`): ztunnel's local-config YAML,
/// optionally with Kubernetes-form AuthorizationPolicy documents. The bytes are read as `load`
/// reads the file (lossy UTF-8); what parses goes into a state store and the evaluator, as a
/// reload would.
pub fn local_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let defaults = Defaults {
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: CLUSTER_ID.into(),
    };
    match local::parse(&text, Path::new("/etc/weft/config.yaml"), &defaults) {
        Ok(file) => {
            for w in &file.data.workloads {
                assert!(
                    !w.namespace.is_empty(),
                    "workload {} without namespace",
                    w.uid
                );
                assert!(!w.uid.is_empty(), "a workload without a uid was accepted");
            }
            exercise_policies(file.data.policies.clone());
            exercise_state(file.data);
        }
        // The message is what an operator reads; building it must not fail either.
        Err(e) => drop(e.to_string()),
    }
}

/// A YAML stream of Kubernetes AuthorizationPolicy objects
/// (`weft::authz::parse_k8s_yaml_stream`): the document splitter, the YAML parser, and the
/// translation of each document. Accepted policies are evaluated.
pub fn k8s_policy_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut policies = Vec::new();
    for r in weft::authz::parse_k8s_yaml_stream(text) {
        match r {
            Ok(p) => policies.push(p),
            Err(e) => drop(e.to_string()),
        }
    }
    exercise_policies(policies);
}

/// One AuthorizationPolicy object as the Kubernetes watcher hands it over, as JSON
/// (`weft::authz::from_k8s_value`): any JSON value reaches the field walker.
pub fn k8s_policy_json(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match weft::authz::from_k8s_value(&v) {
        Ok(p) => exercise_policies(vec![p]),
        Err(e) => drop(e.to_string()),
    }
}

/// The Kubernetes source's translation (`weft::k8s::translate::translate`): namespaces, pods,
/// services, EndpointSlices and AuthorizationPolicies as the watches hold them, to weft's state.
///
/// The input is a JSON object `{"namespaces": [..], "pods": [..], "services": [..],
/// "endpointSlices": [..], "policies": [..]}`; each element is deserialised on its own into its
/// k8s-openapi type (the API server's schema, as the watcher does), and one that does not fit
/// is left out, so the translation sees every shape the schema allows.
pub fn k8s_translate(data: &[u8]) {
    fn objects<T: DeserializeOwned>(v: &Value, field: &str) -> Vec<Arc<T>> {
        v.get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|o| serde_json::from_value(o.clone()).ok())
            .map(Arc::new)
            .collect()
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let view = ClusterView {
        namespaces: objects(&v, "namespaces"),
        pods: objects(&v, "pods"),
        services: objects(&v, "services"),
        endpoint_slices: objects(&v, "endpointSlices"),
        policies: objects(&v, "policies"),
        peer_authentications: objects(&v, "peerAuthentications"),
        service_entries: objects(&v, "serviceEntries"),
        workload_entries: objects(&v, "workloadEntries"),
    };
    let facts = ClusterFacts {
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: CLUSTER_ID.into(),
        domain_suffix: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        auto_allocate_vips: true,
    };
    // Every pod "on this node", with a namespace path that is never opened here.
    let out = translate(
        &view,
        &facts,
        |_| true,
        |w| Some(PathBuf::from(format!("/run/netns/{}", w.name))),
    );
    for r in &out.rejected {
        assert!(
            !r.error.is_empty(),
            "policy {} rejected without a reason",
            r.key
        );
    }
    exercise_policies(out.data.policies.clone());
    exercise_state(out.data);
}

// ---------------------------------------------------------------------------------------------
// Wire formats.

/// The HBONE CONNECT request check (`weft::hbone::wire::validate`) and the `forwarded` reader
/// (`forwarded_for`), on a request built from fuzzed parts: method, URI (whole, or only an
/// authority, or a real address as weft's client writes it), headers, and the address the
/// tunnel arrived on. Also the client's side: what weft builds for any destination and client
/// must pass weft's own check and give the client back.
pub fn connect_validate(data: &[u8]) {
    let mut r = Reader(data);
    let arrived_on = r.ip();
    let method = r.bytes();
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(method).unwrap_or(Method::CONNECT);
    let uri = match r.byte() % 3 {
        0 => Uri::try_from(r.bytes()).ok(),
        1 => Uri::builder().authority(r.bytes()).build().ok(),
        _ => {
            let addr = SocketAddr::new(r.ip(), r.u16());
            Uri::builder().authority(wire::host_port(addr)).build().ok()
        }
    };
    if let Some(uri) = uri {
        *req.uri_mut() = uri;
    }
    for _ in 0..r.byte() % 8 {
        let (name, value) = (r.bytes(), r.bytes());
        // A "forwarded" header more often than chance would give one.
        let name = if name.first() == Some(&b'F') {
            HeaderName::from_static("forwarded")
        } else {
            match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            req.headers_mut().append(name, v);
        }
    }

    match wire::validate(&req, arrived_on) {
        Ok(wire::Authority::Addr(dest)) => {
            // Accepted only as documented: a CONNECT to `ip:port` of the address it came on,
            // or to a DNS name and a port.
            assert_eq!(req.method(), Method::CONNECT);
            assert_eq!(canonical(dest.ip()), canonical(arrived_on));
            let authority = req.uri().authority().expect("accepted without authority");
            assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(dest));
        }
        Ok(wire::Authority::Service { host, port }) => {
            assert_eq!(req.method(), Method::CONNECT);
            let authority = req.uri().authority().expect("accepted without authority");
            assert!(authority.as_str().parse::<SocketAddr>().is_err());
            assert_eq!(
                authority.as_str().to_ascii_lowercase(),
                format!("{host}:{port}")
            );
            assert!(!host.is_empty() && host.parse::<std::net::IpAddr>().is_err());
            assert!(host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
        }
        Err(refusal) => {
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
            drop(refusal.to_string());
        }
    }
    if wire::forwarded_for(&req).is_some() {
        let header = req
            .headers()
            .get("forwarded")
            .expect("an address, yet no header");
        assert!(header.to_str().is_ok_and(|h| h.contains("for=")));
    }

    let dest = SocketAddr::new(r.ip(), r.u16());
    let client = SocketAddr::new(r.ip(), r.u16());
    let baggage = String::from_utf8_lossy(r.bytes()).into_owned();
    let service_host = Some(String::from_utf8_lossy(r.bytes()).into_owned());
    let origin_network = Some(String::from_utf8_lossy(r.bytes()).into_owned());
    let built = wire::connect_request(&ConnectRequest {
        authority: dest.into(),
        client,
        baggage,
        service_host,
        origin_network,
    });
    assert_eq!(wire::validate(&built, dest.ip()).ok(), Some(dest.into()));
    assert_eq!(wire::forwarded_for(&built), Some(client));
}

/// istiod's `Address` resource (a Workload or a Service) as it comes in an xDS response:
/// decoded with prost and translated (`weft::xds::translate::address`), as the xDS client does
/// for each resource; the result goes into a state store.
pub fn xds_address(data: &[u8]) {
    let Ok(a) = Address::decode(data) else {
        return;
    };
    // What decodes re-encodes to the same message (weft's /config_dump relies on nothing
    // else, but a generated type that could not would be a codegen bug worth knowing).
    let again = Address::decode(a.encode_to_vec().as_slice()).expect("re-encoded Address");
    assert_eq!(a, again);
    let defaults = xds::Defaults {
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: CLUSTER_ID.into(),
    };
    match xds::address(a, &defaults) {
        Ok(Translated::Workload(w, endpoints)) => {
            assert!(!w.uid.is_empty(), "a workload without a uid was accepted");
            let mut data = SourceData::default();
            for (key, ports) in endpoints {
                data.endpoints.push((key, w.uid.clone(), ports));
            }
            data.workloads.push(*w);
            exercise_state(data);
        }
        Ok(Translated::Service(s)) => {
            assert!(!s.hostname.is_empty() && !s.namespace.is_empty());
            exercise_state(SourceData {
                services: vec![s],
                ..SourceData::default()
            });
        }
        Err(e) => drop(e.to_string()),
    }
}

/// istiod's L4 `Authorization` resource as it comes in an xDS response: decoded with prost and
/// converted (`weft::authz::from_xds`); an accepted policy is evaluated.
pub fn xds_authorization(data: &[u8]) {
    let Ok(a) = Authorization::decode(data) else {
        return;
    };
    let key = format!("{}/{}", a.namespace, a.name);
    match weft::authz::from_xds(a) {
        Ok(p) => {
            assert_eq!(p.key(), key);
            exercise_policies(vec![p]);
        }
        Err(e) => drop(e.to_string()),
    }
}

/// A ZDS packet from the CNI node agent: one protobuf `WorkloadRequest`, decoded with prost as
/// `weft::zds` decodes it. What weft then does with a request (its checks of the payload and
/// the descriptors, and the capture) is the private, async `handle`, entangled with the
/// enroller and the descriptors that come with the packet: not reached here.
pub fn zds_request(data: &[u8]) {
    if let Ok(req) = WorkloadRequest::decode(data) {
        let again = WorkloadRequest::decode(req.encode_to_vec().as_slice())
            .expect("re-encoded WorkloadRequest");
        assert_eq!(req, again);
        let uid = match &req.payload {
            Some(Payload::Add(add)) => Some(&add.uid),
            Some(Payload::Keep(k)) => Some(&k.uid),
            Some(Payload::Del(d)) => Some(&d.uid),
            Some(Payload::SnapshotSent(_)) | None => None,
        };
        // weft logs and answers with the uid; it is valid UTF-8 by prost's check.
        drop(uid.map(|u| format!("{u:?}")));
    }
    // The messages weft sends, read as the agent reads them: the same bytes must not upset
    // their decoders either.
    let _ = ZdsHello::decode(data);
    let _ = WorkloadResponse::decode(data);
}

/// The request weft-cni sends to weft (`weft::cni::wire::CaptureRequest`: one JSON object,
/// which weft's server reads with `serde_json::from_slice` up to `MAX_REQUEST` bytes) and the
/// reply the plugin reads back (`CaptureReply`).
pub fn cni_wire(data: &[u8]) {
    if data.len() > MAX_REQUEST {
        // The server refuses a longer request before parsing it.
        return;
    }
    if let Ok(req) = serde_json::from_slice::<CaptureRequest>(data) {
        let key = req.pod_key();
        assert!(
            key == req.container_id || Some(key) == req.pod_uid.as_deref(),
            "pod key {key:?} is neither the uid nor the container id"
        );
        // The plugin serialises what the server parses: the round trip is exact.
        let bytes = serde_json::to_vec(&req).expect("a request serialises");
        let again: CaptureRequest = serde_json::from_slice(&bytes).expect("re-parsed request");
        assert_eq!(req, again);
    }
    if let Ok(reply) = serde_json::from_slice::<CaptureReply>(data) {
        let bytes = serde_json::to_vec(&reply).expect("a reply serialises");
        let again: CaptureReply = serde_json::from_slice(&bytes).expect("re-parsed reply");
        assert_eq!(reply, again);
    }
}

/// Where the `cni_plugin` target points the plugin: a directory that does not exist, so that
/// connecting fails at once and no socket on this machine is ever reached.
pub const MISSING_SOCKET: &str = "/nonexistent-weft-fuzz/cni.sock";

/// weft-cni, the chained CNI plugin (`weft::cni::plugin::run`): the network configuration on
/// stdin and the runtime's environment.
///
/// The plugin's only I/O is connecting to weft's socket, which the configuration names. So
/// each input runs twice:
/// - stdin as given, with an environment that cannot lead to a connection (no pod in
///   `CNI_ARGS`; STATUS, which always connects, turned into GC): the configuration decoder,
///   version checks and `prevResult` handling on raw bytes;
/// - stdin that is a JSON object or array, with its socket rewritten to [`MISSING_SOCKET`], and
///   the environment as given: the request building and failing closed or open.
pub fn cni_plugin(data: &[u8]) {
    let mut r = Reader(data);
    let command = match r.byte() % 7 {
        0 => "ADD".to_string(),
        1 => "DEL".to_string(),
        2 => "CHECK".to_string(),
        3 => "STATUS".to_string(),
        4 => "GC".to_string(),
        5 => "VERSION".to_string(),
        _ => r.string(),
    };
    let container_id = r.opt_string();
    let netns = r.opt_string();
    let cni_args = r.opt_string();
    let stdin = r.rest().to_vec();
    let env = |command: &str, cni_args: Option<&str>| {
        let mut env = HashMap::new();
        env.insert("CNI_COMMAND".to_string(), command.to_string());
        for (k, v) in [
            ("CNI_CONTAINERID", container_id.as_deref()),
            ("CNI_NETNS", netns.as_deref()),
            ("CNI_ARGS", cni_args),
        ] {
            if let Some(v) = v {
                env.insert(k.to_string(), v.to_string());
            }
        }
        env
    };

    // Pass 1: raw stdin, an environment that names no pod. (The filter drops both
    // K8S_POD_NAME and K8S_POD_NAMESPACE.)
    let safe_args = cni_args.as_deref().map(|a| {
        a.split(';')
            .filter(|kv| !kv.starts_with("K8S_POD_NAME"))
            .collect::<Vec<_>>()
            .join(";")
    });
    let safe_command = if command == "STATUS" { "GC" } else { &command };
    let o = run(&Invocation {
        env: env(safe_command, safe_args.as_deref()),
        stdin: stdin.clone(),
    });
    check_cni_outcome(&o);

    // Pass 2: the socket pointed at nothing, the environment as given.
    let Ok(mut conf) = serde_json::from_slice::<Value>(&stdin) else {
        return;
    };
    match &mut conf {
        Value::Object(m) => {
            m.insert("socket".into(), Value::String(MISSING_SOCKET.into()));
        }
        // serde also takes a struct as a sequence of its fields in declaration order: the
        // socket is the third. A shorter sequence would mean the default socket, which may be
        // a real weft's, so it is padded.
        Value::Array(a) if !a.is_empty() => {
            if a.len() < 2 {
                a.push(Value::String(String::new()));
            }
            if a.len() < 3 {
                a.push(Value::Null);
            }
            a[2] = Value::String(MISSING_SOCKET.into());
        }
        _ => return,
    }
    let o = run(&Invocation {
        env: env(&command, cni_args.as_deref()),
        stdin: serde_json::to_vec(&conf).expect("a JSON value serialises"),
    });
    check_cni_outcome(&o);

    // Fail closed: with weft unreachable, ADD of a mesh pod succeeds only when told to fail
    // open, or for a pod the plugin does not ask about.
    if command == "ADD" && o.exit_code == 0 {
        let args: HashMap<&str, &str> = cni_args
            .as_deref()
            .into_iter()
            .flat_map(|a| a.split(';'))
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let excluded = |ns: &str| {
            conf.get("excludeNamespaces")
                .or_else(|| conf.get(4))
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().any(|n| n.as_str() == Some(ns)))
        };
        let asked = match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(_)) => !excluded(ns),
            _ => false,
        };
        let fail_open = conf.get("failOpen").or_else(|| conf.get(3)) == Some(&Value::Bool(true));
        assert!(
            !asked || fail_open,
            "ADD of a mesh pod succeeded with weft unreachable and failOpen unset: {:?}",
            o.stdout
        );
    }
}

/// The spec's contract for a failure: an error object with a code and a message on stdout.
/// (A success prints the previous plugin's result, which may be any JSON.)
fn check_cni_outcome(o: &Outcome) {
    if o.exit_code != 0 {
        let v = o.stdout.as_ref().expect("a failure prints its error");
        assert!(v.get("code").and_then(Value::as_u64).is_some(), "{v}");
        assert!(v.get("msg").and_then(Value::as_str).is_some(), "{v}");
    }
}

// ---------------------------------------------------------------------------------------------
// What accepted values go through next.

/// Evaluates connections against every policy's own target (its namespace, its selector's
/// labels, its name attached), from an identity and from plaintext, over IPv4 and IPv6, and
/// serialises each policy as `/config_dump` does.
///
/// Panics if a decision names a policy the set does not hold: the evaluator may only report
/// policies it was given.
pub fn exercise_policies(policies: Vec<Policy>) {
    for p in &policies {
        serde_json::to_string(p).expect("a policy serialises");
    }
    let targets: Vec<(String, BTreeMap<String, String>, Vec<String>)> = policies
        .iter()
        .map(|p| {
            let labels = match &p.scope {
                Scope::WorkloadSelector { match_labels } => match_labels.clone(),
                _ => BTreeMap::new(),
            };
            (p.namespace.clone(), labels, vec![p.key()])
        })
        .collect();
    let set = PolicySet::new(policies, ROOT_NAMESPACE.to_string());
    let sources = [
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    ];
    for (namespace, labels, names) in &targets {
        let target = Target {
            namespace,
            labels,
            policy_names: names,
        };
        let principal = format!("{TRUST_DOMAIN}/ns/{namespace}/sa/default");
        for source_ip in sources {
            for source_principal in [Some(principal.as_str()), None] {
                let conn = ConnFacts {
                    source_ip,
                    source_principal,
                    source_namespace: Some(namespace),
                    destination_ip: source_ip,
                    destination_port: 8080,
                };
                let decision = set.evaluate(&target, &conn);
                if let Some(by) = decision.policy() {
                    assert!(set.get(by).is_some(), "decision names unknown policy {by}");
                }
                for d in &decision.dry_run {
                    assert!(
                        set.get(&d.policy).is_some(),
                        "dry run of unknown {}",
                        d.policy
                    );
                }
            }
        }
    }
}

/// Applies one source's state to a fresh store twice (the second time must change nothing)
/// and then empties it, as a reload of the same file and then of an empty one would.
pub fn exercise_state(data: SourceData) {
    // Two objects under one key: the store keeps the last, so the one before it is neither
    // found nor "unchanged" on the next pass. Only state with unique keys is held to that.
    let unique = {
        let uids: BTreeSet<&str> = data.workloads.iter().map(|w| w.uid.as_str()).collect();
        let services: BTreeSet<_> = data.services.iter().map(|s| s.key()).collect();
        let policies: BTreeSet<_> = data.policies.iter().map(|p| p.key()).collect();
        uids.len() == data.workloads.len()
            && services.len() == data.services.len()
            && policies.len() == data.policies.len()
    };
    let store = StateStore::new(ROOT_NAMESPACE);
    store.replace_source("fuzz", data.clone());
    let first = store.snapshot();
    store.replace_source("fuzz", data.clone());
    let second = store.snapshot();
    if unique {
        assert_eq!(
            first.generation, second.generation,
            "re-applying the same state changed the snapshot"
        );
    }
    for w in &data.workloads {
        if unique {
            for ip in &w.workload_ips {
                assert!(
                    second.workload_by_ip(*ip).is_some(),
                    "{ip} of {} lost",
                    w.uid
                );
            }
        }
        let _ = second.services_of(&w.uid).count();
    }
    for s in &data.services {
        let _ = second.healthy_endpoints(&s.key()).count();
        for vip in &s.vips {
            let _ = second.service_by_vip(*vip);
        }
    }
    store.replace_source("fuzz", SourceData::default());
    let empty = store.snapshot();
    for w in &data.workloads {
        assert!(empty.workload_by_uid(&w.uid).is_none(), "{} kept", w.uid);
    }
    assert!(
        empty.policies.is_empty(),
        "policies kept after the source emptied"
    );
}

// ---------------------------------------------------------------------------------------------
// The DNS proxy.

/// The mesh the DNS target answers from: services with VIPs of both families, one in another
/// namespace, a wildcard host, and a headless service with endpoints of both families.
const DNS_STATE: &str = r#"
workloads:
- {name: h1, namespace: shop, workloadIps: ["10.250.9.1", "fd00:250::9:1"],
   services: {"shop/headless.shop.svc.cluster.local": {80: 80}}}
- {name: h2, namespace: shop, workloadIps: ["10.250.9.2"], status: Unhealthy,
   services: {"shop/headless.shop.svc.cluster.local": {80: 80}}}
services:
- {name: backend, namespace: shop, hostname: backend.shop.svc.cluster.local,
   vips: ["10.96.0.20", "fd00:96::20"], ports: {80: 8080}}
- {name: backend, namespace: other, hostname: backend.other.svc.cluster.local,
   vips: ["10.96.0.30"], ports: {80: 8080}}
- {name: wild, namespace: shop, hostname: "*.wild.example", vips: ["240.240.0.6"], ports: {80: 80}}
- {name: headless, namespace: shop, hostname: headless.shop.svc.cluster.local, ports: {80: 80}}
"#;

/// A DNS packet from a captured pod, decoded as the DNS proxy decodes it (hickory's
/// `Message::from_vec`) and decided by `weft::dns::answer::lookup` for a pod of `shop` with
/// Kubernetes' search list. An answer keeps the query's id, names only addresses the state
/// holds (or a CNAME to a name it holds), and encodes within a UDP response's 512 bytes
/// (truncated when it must be); SERVFAIL, the answer to a failed forward, is built for any
/// query.
pub fn dns_query(data: &[u8]) {
    use hickory_proto::op::Message as Dns;
    use hickory_proto::rr::{Name, RData};
    use weft::dns::answer::{self, Asker, Lookup};

    static SNAPSHOT: std::sync::OnceLock<Arc<weft::state::Snapshot>> = std::sync::OnceLock::new();
    let snap = SNAPSHOT.get_or_init(|| {
        let defaults = Defaults {
            trust_domain: TRUST_DOMAIN.into(),
            cluster_id: CLUSTER_ID.into(),
        };
        let file = local::parse(DNS_STATE, Path::new("dns.yaml"), &defaults)
            .expect("the DNS target's state parses");
        let store = StateStore::new(ROOT_NAMESPACE);
        store.replace_source("fuzz", file.data);
        store.snapshot()
    });
    let Ok(query) = Dns::from_vec(data) else {
        return;
    };
    let name = |s: &str| Name::from_ascii(s).expect("a fixed name");
    let search = [
        name("shop.svc.cluster.local."),
        name("svc.cluster.local."),
        name("cluster.local."),
    ];
    let (svc_domain, cluster_domain) = (name("svc.cluster.local."), name("cluster.local."));
    let asker = Asker {
        namespace: "shop",
        search: &search,
        svc_domain: &svc_domain,
        cluster_domain: &cluster_domain,
    };
    let _ = answer::query_type(&query);
    if let Lookup::Answer(reply) = answer::lookup(snap, &asker, &query) {
        assert_eq!(reply.id(), query.id(), "the answer keeps the query's id");
        let held: BTreeSet<IpAddr> = snap
            .services
            .values()
            .flat_map(|s| s.vips.iter().copied())
            .chain(
                snap.workloads
                    .values()
                    .flat_map(|w| w.workload_ips.iter().copied()),
            )
            .collect();
        for record in reply.answers() {
            match record.data() {
                RData::A(a) => assert!(held.contains(&IpAddr::V4(a.0)), "answered {a}"),
                RData::AAAA(a) => assert!(held.contains(&IpAddr::V6(a.0)), "answered {a}"),
                RData::CNAME(_) => {}
                other => panic!("answered a record weft never makes: {other:?}"),
            }
        }
        let udp = answer::encode_within(&reply, 512).expect("an answer encodes");
        assert!(
            udp.len() <= 512 || reply.queries().len() > 1,
            "{} bytes",
            udp.len()
        );
    }
    let _ = answer::encode_within(&answer::servfail(&query), 512);
}

// ---------------------------------------------------------------------------------------------

/// Reads structure out of fuzzer bytes: fixed-size integers (missing bytes read as zero) and
/// byte strings with a one-byte length. Every input means something, and a mutation of one
/// field leaves the others in place.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.byte())
    }

    /// IPv4, IPv6, or IPv4-mapped IPv6 (as a dual-stack listener reports an IPv4 peer).
    pub fn ip(&mut self) -> IpAddr {
        match self.byte() % 3 {
            0 => IpAddr::V4(Ipv4Addr::from(self.array::<4>())),
            1 => IpAddr::V6(Ipv6Addr::from(self.array::<16>())),
            _ => IpAddr::V6(Ipv4Addr::from(self.array::<4>()).to_ipv6_mapped()),
        }
    }

    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }

    pub fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    pub fn opt_string(&mut self) -> Option<String> {
        match self.byte() % 4 {
            0 => None,
            _ => Some(self.string()),
        }
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
