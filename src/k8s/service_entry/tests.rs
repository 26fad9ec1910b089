//! ServiceEntry and WorkloadEntry objects as users write them → weft's services and workloads.

use serde_json::json;

use super::*;
use crate::state::ServiceKey;

fn facts() -> ClusterFacts {
    ClusterFacts::for_tests()
}

fn obj(v: serde_json::Value) -> Arc<DynamicObject> {
    Arc::new(serde_json::from_value(v).expect("object"))
}

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "shop", "labels": labels}}),
    )
    .unwrap()
}

fn run(
    ses: Vec<Arc<DynamicObject>>,
    wes: Vec<Arc<DynamicObject>>,
    pods: &[(Pod, String)],
) -> (SourceData, Vec<RejectedPolicy>) {
    let mut by_ns: HashMap<&str, Vec<(&Pod, String)>> = HashMap::new();
    for (p, uid) in pods {
        by_ns.entry("shop").or_default().push((p, uid.clone()));
    }
    let (mut data, mut rejected) = (SourceData::default(), Vec::new());
    translate(
        &ses,
        &wes,
        &by_ns,
        &HashMap::new(),
        &facts(),
        &mut data,
        &mut rejected,
    );
    (data, rejected)
}

fn vm(name: &str, ip: &str, enrolled: bool) -> Arc<DynamicObject> {
    let annotations = if enrolled {
        json!({"ambient.istio.io/redirection": "enabled"})
    } else {
        json!({})
    };
    obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations, "labels": {"team": "x"}},
        "spec": {"address": ip, "labels": {"app": "db"}, "serviceAccount": "db", "ports": {"tcp": 9000}}
    }))
}

fn db_entry(extra: serde_json::Value) -> Arc<DynamicObject> {
    let mut spec = json!({
        "hosts": ["db.example.internal"],
        "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP", "targetPort": 8080}],
        "location": "MESH_INTERNAL", "resolution": "STATIC",
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "db", "namespace": "shop"}, "spec": spec
    }))
}

fn key() -> ServiceKey {
    ServiceKey {
        namespace: "shop".into(),
        hostname: "db.example.internal".into(),
    }
}

#[test]
fn workload_entries_are_workloads_hbone_only_when_enrolled() {
    let (data, rejected) = run(
        vec![],
        vec![vm("vm1", "10.9.0.1", true), vm("vm2", "10.9.0.2", false)],
        &[],
    );
    assert!(rejected.is_empty());
    let w = |n: &str| data.workloads.iter().find(|w| w.name == n).unwrap();
    assert_eq!(w("vm1").protocol, Protocol::HBONE);
    assert_eq!(w("vm2").protocol, Protocol::TCP);
    assert_eq!(
        w("vm1").uid,
        "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm1"
    );
    assert_eq!(w("vm1").service_account, "db");
    assert_eq!(
        w("vm1").workload_ips,
        ["10.9.0.1".parse::<IpAddr>().unwrap()]
    );
    // Labels from the object and the spec, the spec's winning.
    assert_eq!(w("vm1").labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(w("vm1").labels.get("team").map(String::as_str), Some("x"));
    assert!(w("vm1").netns.is_none(), "never captured here");
}

#[test]
fn a_selector_service_entry_spreads_over_pods_and_workload_entries() {
    let pods = [
        (pod("db-1", json!({"app": "db"})), "uid-db-1".to_string()),
        (pod("web-1", json!({"app": "web"})), "uid-web-1".to_string()),
    ];
    let (data, rejected) = run(
        vec![db_entry(json!({
            "addresses": ["240.240.0.5"],
            "workloadSelector": {"labels": {"app": "db"}}
        }))],
        vec![vm("vm1", "10.9.0.1", false)],
        &pods,
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    let svc = &data.services[0];
    assert_eq!(svc.key(), key());
    assert_eq!(svc.name, "db");
    assert_eq!(svc.vips, ["240.240.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(svc.ports, BTreeMap::from([(5432, 8080)]));
    let eps: Vec<(&str, &BTreeMap<u16, u16>)> = data
        .endpoints
        .iter()
        .map(|(k, uid, p)| {
            assert_eq!(*k, key());
            (uid.as_str(), p)
        })
        .collect();
    // The pod takes the entry's target port; the WorkloadEntry its own port of that name.
    assert_eq!(
        eps,
        [
            ("uid-db-1", &BTreeMap::new()),
            (
                "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm1",
                &BTreeMap::from([(5432, 9000)])
            )
        ]
    );
}

#[test]
fn inline_endpoints_are_workloads_and_allocated_addresses_are_vips() {
    let mut se = db_entry(json!({
        "hosts": ["db.example.internal", "*.wild.example"],
        "endpoints": [{"address": "10.9.1.1"}, {"address": "10.9.1.2", "ports": {"tcp": 7000}}],
    }));
    Arc::get_mut(&mut se).unwrap().data["status"] = json!({"addresses": [
        {"host": "db.example.internal", "value": "240.240.10.1"},
        {"host": "db.example.internal", "value": "2001:2::1"},
    ]});
    let (data, rejected) = run(vec![se], vec![], &[]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let hosts: Vec<(&str, usize)> = data
        .services
        .iter()
        .map(|s| (s.hostname.as_str(), s.vips.len()))
        .collect();
    assert_eq!(hosts, [("db.example.internal", 2), ("*.wild.example", 0)]);
    let uids: Vec<&str> = data.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(
        uids,
        [
            "Kubernetes/networking.istio.io/ServiceEntry/shop/db/10.9.1.1",
            "Kubernetes/networking.istio.io/ServiceEntry/shop/db/10.9.1.2"
        ]
    );
    assert!(data.workloads.iter().all(|w| w.protocol == Protocol::TCP));
    // Two hosts × two endpoints.
    assert_eq!(data.endpoints.len(), 4);
    assert!(data
        .endpoints
        .iter()
        .any(|(_, uid, p)| uid.ends_with("10.9.1.2") && p == &BTreeMap::from([(5432, 7000)])));
}

#[test]
fn a_malformed_entry_is_refused_by_name_and_the_others_stay() {
    let bad = obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"hosts": "not-a-list"}
    }));
    let empty = obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "nohosts", "namespace": "shop"}, "spec": {}
    }));
    let badport = db_entry(json!({"ports": [{"number": 70000, "name": "x"}]}));
    let (data, rejected) = run(vec![bad, empty, badport, db_entry(json!({}))], vec![], &[]);
    let keys: Vec<&str> = rejected.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "shop/bad (ServiceEntry)",
            "shop/nohosts (ServiceEntry)",
            "shop/db (ServiceEntry)"
        ]
    );
    // The last, good one is there (the bad port alone was dropped from the other).
    assert!(data.services.iter().any(|s| s.ports.contains_key(&5432)));
}

#[test]
fn dns_resolution_without_endpoints_makes_each_host_its_own_endpoint_by_name() {
    let se = db_entry(json!({
        "hosts": ["db.example.internal", "cache.example.internal", "*.wild.example"],
        "resolution": "DNS",
    }));
    let (data, rejected) = run(vec![se], vec![], &[]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let named: Vec<(&str, &str, bool)> = data
        .workloads
        .iter()
        .map(|w| {
            (
                w.uid.as_str(),
                w.hostname.as_str(),
                w.workload_ips.is_empty(),
            )
        })
        .collect();
    // A wildcard has no name to look up.
    assert_eq!(
        named,
        [
            (
                "Kubernetes/networking.istio.io/ServiceEntry/shop/db/db.example.internal",
                "db.example.internal",
                true
            ),
            (
                "Kubernetes/networking.istio.io/ServiceEntry/shop/db/cache.example.internal",
                "cache.example.internal",
                true
            ),
        ]
    );
    // Each host's service has only its own name as endpoint.
    let eps: Vec<(&str, &str)> = data
        .endpoints
        .iter()
        .map(|(k, uid, _)| (k.hostname.as_str(), uid.rsplit('/').next().unwrap()))
        .collect();
    assert_eq!(
        eps,
        [
            ("db.example.internal", "db.example.internal"),
            ("cache.example.internal", "cache.example.internal")
        ]
    );
    // Hosts got addresses from weft's allocator (not the wildcard); none is passthrough.
    for s in &data.services {
        let want = if s.hostname.starts_with('*') { 0 } else { 2 };
        assert_eq!(s.vips.len(), want, "{}", s.hostname);
        assert!(!s.passthrough);
    }
    let v4 = |s: &Service| s.vips.iter().find(|v| v.is_ipv4()).copied();
    assert_ne!(v4(&data.services[0]), v4(&data.services[1]));
}

#[test]
fn allocation_yields_to_the_user_and_to_istiod_and_can_be_refused() {
    let named = |name: &str, extra: serde_json::Value, labels: serde_json::Value| {
        let mut spec = json!({"hosts": [format!("{name}.example.internal")], "resolution": "DNS",
            "ports": [{"number": 80, "name": "http"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        obj(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "shop", "labels": labels}, "spec": spec}),
        )
    };
    let mut by_istiod = named("istiod", json!({}), json!({}));
    Arc::get_mut(&mut by_istiod).unwrap().data["status"] = json!({"addresses": [
        {"host": "istiod.example.internal", "value": "240.240.9.9"}]});
    let (data, rejected) = run(
        vec![
            named("user", json!({"addresses": ["10.96.5.5"]}), json!({})),
            by_istiod,
            named(
                "optout",
                json!({}),
                json!({"networking.istio.io/enable-autoallocate-ip": "False"}),
            ),
            named("none", json!({"resolution": "NONE"}), json!({})),
        ],
        vec![],
        &[],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    let vips: BTreeMap<&str, Vec<String>> = data
        .services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.vips.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(vips["user"], ["10.96.5.5"]);
    assert_eq!(vips["istiod"], ["240.240.9.9"]);
    assert!(vips["optout"].is_empty());
    assert!(vips["none"].is_empty());

    // Switched off for the node: nothing allocated.
    let mut facts = facts();
    facts.auto_allocate_vips = false;
    let (mut off, mut rejected) = (SourceData::default(), Vec::new());
    translate(
        &[named("plain", json!({}), json!({}))],
        &[],
        &HashMap::new(),
        &HashMap::new(),
        &facts,
        &mut off,
        &mut rejected,
    );
    assert!(off.services[0].vips.is_empty());
}

#[test]
fn resolution_none_is_passthrough_and_unknown_enums_are_refused() {
    let (data, rejected) = run(
        vec![db_entry(
            json!({"resolution": "NONE", "addresses": ["10.250.2.3"]}),
        )],
        vec![],
        &[],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    assert!(data.services[0].passthrough);
    assert_eq!(
        data.services[0].vips,
        ["10.250.2.3".parse::<IpAddr>().unwrap()]
    );
    assert!(data.endpoints.is_empty());

    let (data, rejected) = run(
        vec![
            db_entry(json!({"resolution": "SOMETIMES"})),
            db_entry(json!({"location": "MESH_ELSEWHERE"})),
        ],
        vec![],
        &[],
    );
    assert!(data.services.is_empty());
    assert_eq!(rejected.len(), 2);
    assert!(rejected[0].error.contains("SOMETIMES"), "{:?}", rejected[0]);
    assert!(
        rejected[1].error.contains("MESH_ELSEWHERE"),
        "{:?}",
        rejected[1]
    );
}
