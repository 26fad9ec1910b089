//! What the DNS proxy answers from the state, for queries as a pod's resolver sends them.

use std::collections::BTreeMap;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{RData, RecordType};

use super::*;
use crate::state::{SourceData, StateStore};

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("test name")
}

fn service(ns: &str, host: &str, vips: &[&str]) -> Service {
    Service {
        name: host.split('.').next().unwrap_or(host).to_string(),
        namespace: ns.to_string(),
        hostname: host.to_string(),
        vips: vips.iter().map(|v| v.parse().expect("test VIP")).collect(),
        ports: BTreeMap::from([(80, 8080)]),
        subject_alt_names: Vec::new(),
        passthrough: false,
        visibility: Default::default(),
        waypoint: None,
    }
}

fn snapshot(services: Vec<Service>) -> Arc<Snapshot> {
    let store = StateStore::new("istio-system");
    store.replace_source(
        "test",
        SourceData {
            services,
            ..SourceData::default()
        },
    );
    store.snapshot()
}

fn mesh() -> Arc<Snapshot> {
    snapshot(vec![
        service(
            "shop",
            "backend.shop.svc.cluster.local",
            &["10.96.0.20", "fd00:96::20"],
        ),
        service("other", "backend.other.svc.cluster.local", &["10.96.0.30"]),
        service("shop", "v4only.shop.svc.cluster.local", &["10.96.0.21"]),
        service("shop", "db.example.internal", &["240.240.0.5"]),
        service("shop", "*.wild.example", &["240.240.0.6"]),
        service("shop", "headless.shop.svc.cluster.local", &[]),
    ])
}

fn query(qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(0x4242).set_recursion_desired(true);
    m.add_query(Query::query(name(qname), qtype));
    m
}

/// The pod's resolv.conf search list of a pod in `shop`.
fn ask(snap: &Snapshot, q: &Message) -> Lookup {
    let search = [
        name("shop.svc.cluster.local."),
        name("svc.cluster.local."),
        name("cluster.local."),
    ];
    let (svc, cluster) = (name("svc.cluster.local."), name("cluster.local."));
    lookup(
        snap,
        &Asker {
            namespace: "shop",
            search: &search,
            svc_domain: &svc,
            cluster_domain: &cluster,
        },
        q,
    )
}

fn answered(l: Lookup) -> Message {
    match l {
        Lookup::Answer(m) => m,
        Lookup::Forward => panic!("forwarded, expected an answer"),
    }
}

/// (owner, value) of each answer record.
fn records(m: &Message) -> Vec<(String, String)> {
    m.answers()
        .iter()
        .map(|r| {
            let v = match r.data() {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::CNAME(c) => format!("CNAME {}", c.0),
                other => format!("{other:?}"),
            };
            (r.name().to_ascii(), v)
        })
        .collect()
}

#[test]
fn a_service_fqdn_is_answered_with_its_vip_keeping_id_and_flags() {
    let snap = mesh();
    let q = query("backend.shop.svc.cluster.local.", RecordType::A);
    let m = answered(ask(&snap, &q));
    assert_eq!(m.id(), 0x4242);
    assert!(m.recursion_desired() && m.recursion_available() && m.authoritative());
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(m.queries(), q.queries());
    assert_eq!(
        records(&m),
        [(
            "backend.shop.svc.cluster.local.".into(),
            "10.96.0.20".into()
        )]
    );
    assert!(m.answers().iter().all(|r| r.ttl() == TTL_SECONDS));
    let m = answered(ask(
        &snap,
        &query("backend.shop.svc.cluster.local.", RecordType::AAAA),
    ));
    assert_eq!(
        records(&m),
        [(
            "backend.shop.svc.cluster.local.".into(),
            "fd00:96::20".into()
        )]
    );
}

#[test]
fn names_built_from_the_search_list_are_answered_with_a_cname_to_the_real_one() {
    let snap = mesh();
    // `backend.other` with search domain shop.svc.cluster.local appended by the resolver.
    let m = answered(ask(
        &snap,
        &query("backend.other.shop.svc.cluster.local.", RecordType::A),
    ));
    assert_eq!(
        records(&m),
        [
            (
                "backend.other.shop.svc.cluster.local.".into(),
                "CNAME backend.other.".into()
            ),
            ("backend.other.".into(), "10.96.0.30".into())
        ]
    );
}

#[test]
fn short_names_expand_in_the_askers_namespace_and_prefer_it() {
    let snap = mesh();
    for short in ["backend.", "backend.shop.", "backend.shop.svc."] {
        let m = answered(ask(&snap, &query(short, RecordType::A)));
        assert_eq!(
            records(&m),
            [(short.into(), "10.96.0.20".into())],
            "{short}"
        );
    }
    let m = answered(ask(&snap, &query("backend.other.", RecordType::A)));
    assert_eq!(records(&m)[0].1, "10.96.0.30");
}

#[test]
fn hosts_without_a_dns_record_and_wildcard_hosts_are_answered() {
    let snap = mesh();
    let m = answered(ask(&snap, &query("DB.Example.Internal.", RecordType::A)));
    assert_eq!(records(&m)[0].1, "240.240.0.5", "case does not matter");
    let m = answered(ask(&snap, &query("api.wild.example.", RecordType::A)));
    assert_eq!(
        records(&m),
        [("api.wild.example.".into(), "240.240.0.6".into())]
    );
}

#[test]
fn a_known_name_without_the_asked_family_is_noerror_with_no_records() {
    let snap = mesh();
    let m = answered(ask(
        &snap,
        &query("v4only.shop.svc.cluster.local.", RecordType::AAAA),
    ));
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn everything_else_is_forwarded() {
    let snap = mesh();
    for (n, t) in [
        ("example.org.", RecordType::A),
        ("backend.shop.svc.cluster.local.", RecordType::MX),
        ("backend.shop.svc.cluster.local.", RecordType::SRV),
        ("headless.shop.svc.cluster.local.", RecordType::A),
        ("nothere.shop.svc.cluster.local.", RecordType::A),
    ] {
        assert!(
            matches!(ask(&snap, &query(n, t)), Lookup::Forward),
            "{n} {t}"
        );
    }
    // Two questions in one message: not weft's to interpret.
    let mut two = query("backend.shop.svc.cluster.local.", RecordType::A);
    two.add_query(Query::query(name("db.example.internal."), RecordType::A));
    assert!(matches!(ask(&snap, &two), Lookup::Forward));
}

#[test]
fn a_headless_service_is_answered_with_its_healthy_endpoints() {
    use crate::state::{HealthStatus, Workload};
    let pod = |uid: &str, ips: &[&str], status| Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "shop".into(),
        workload_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        status,
        ..Workload::default()
    };
    let headless = service("shop", "headless.shop.svc.cluster.local", &[]);
    // A ServiceEntry host with no address is not a headless service: the real DNS answers it.
    let unallocated = service("shop", "ext.example.com", &[]);
    let store = StateStore::new("istio-system");
    let endpoint = |uid: &str, s: &Service| (s.key(), uid.to_string(), BTreeMap::new());
    store.replace_source(
        "test",
        SourceData {
            endpoints: vec![
                endpoint("p1", &headless),
                endpoint("p2", &headless),
                endpoint("sick", &headless),
                endpoint("p1", &unallocated),
            ],
            workloads: vec![
                pod("p1", &["10.250.1.2", "fd00:250::2"], HealthStatus::Healthy),
                pod("p2", &["10.250.1.3"], HealthStatus::Healthy),
                pod("sick", &["10.250.1.4"], HealthStatus::Unhealthy),
            ],
            services: vec![headless, unallocated],
            ..SourceData::default()
        },
    );
    let snap = store.snapshot();
    let a = answered(ask(
        &snap,
        &query("headless.shop.svc.cluster.local.", RecordType::A),
    ));
    let mut got: Vec<String> = records(&a).into_iter().map(|(_, v)| v).collect();
    got.sort();
    assert_eq!(got, vec!["10.250.1.2", "10.250.1.3"]);
    let aaaa = answered(ask(
        &snap,
        &query("headless.shop.svc.cluster.local.", RecordType::AAAA),
    ));
    assert_eq!(
        records(&aaaa),
        vec![(
            "headless.shop.svc.cluster.local.".into(),
            "fd00:250::2".into()
        )]
    );
    assert!(matches!(
        ask(&snap, &query("ext.example.com.", RecordType::A)),
        Lookup::Forward
    ));
}

#[test]
fn a_namespace_scoped_service_is_answered_only_in_its_namespace() {
    let mut scoped = service("shop", "db.example.internal", &["240.240.0.5"]);
    scoped.visibility = crate::state::Visibility::Namespace;
    let snap = snapshot(vec![scoped]);
    let q = query("db.example.internal.", RecordType::A);
    assert_eq!(
        records(&answered(ask(&snap, &q))),
        vec![("db.example.internal.".into(), "240.240.0.5".into())]
    );
    let search = [name("other.svc.cluster.local.")];
    let (svc, cluster) = (name("svc.cluster.local."), name("cluster.local."));
    let from_other = Asker {
        namespace: "other",
        search: &search,
        svc_domain: &svc,
        cluster_domain: &cluster,
    };
    assert!(matches!(lookup(&snap, &from_other, &q), Lookup::Forward));
}

#[test]
fn an_answer_too_big_for_udp_is_truncated() {
    let vips: Vec<String> = (1..=60).map(|i| format!("10.97.0.{i}")).collect();
    let vips: Vec<&str> = vips.iter().map(String::as_str).collect();
    let snap = snapshot(vec![service("shop", "big.shop.svc.cluster.local", &vips)]);
    let m = answered(ask(
        &snap,
        &query("big.shop.svc.cluster.local.", RecordType::A),
    ));
    assert_eq!(m.answers().len(), 60);
    let udp = encode_within(&m, 512).unwrap();
    let back = Message::from_vec(&udp).unwrap();
    assert!(back.truncated() && back.answers().is_empty() && udp.len() <= 512);
    let tcp = encode_within(&m, 65535).unwrap();
    let back = Message::from_vec(&tcp).unwrap();
    assert!(!back.truncated());
    assert_eq!(back.answers().len(), 60);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("backend".to_string()),
            Just("shop".to_string()),
            Just("svc".to_string()),
            Just("cluster".to_string()),
            Just("local".to_string()),
            Just("wild".to_string()),
            Just("example".to_string()),
            "[a-zA-Z0-9-]{1,20}",
        ]
    }

    proptest! {
        /// Whatever arrives, parsing and deciding never panic; an answer keeps the query's id
        /// and question and fits the client's UDP size once encoded.
        #[test]
        fn any_packet_is_refused_or_answered_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let snap = mesh();
            if let Ok(q) = Message::from_vec(&bytes) {
                if let Lookup::Answer(m) = ask(&snap, &q) {
                    prop_assert_eq!(m.id(), q.id());
                    let wire = encode_within(&m, 512).expect("encodes");
                    prop_assert!(wire.len() <= 512 || m.queries().len() > 1);
                }
            }
        }

        #[test]
        fn any_name_is_answered_only_with_state_addresses(labels in proptest::collection::vec(label(), 1..7), aaaa in any::<bool>()) {
            let snap = mesh();
            let qname = format!("{}.", labels.join("."));
            // Not every generated text is a name (a label may not start with "-").
            prop_assume!(Name::from_ascii(&qname).is_ok());
            let t = if aaaa { RecordType::AAAA } else { RecordType::A };
            if let Lookup::Answer(m) = ask(&snap, &query(&qname, t)) {
                let vips: Vec<String> = snap
                    .services
                    .values()
                    .flat_map(|s| s.vips.iter().map(|v| v.to_string()))
                    .collect();
                for (_, v) in records(&m) {
                    prop_assert!(v.starts_with("CNAME ") || vips.contains(&v), "{} answered {}", qname, v);
                }
            }
        }
    }
}
