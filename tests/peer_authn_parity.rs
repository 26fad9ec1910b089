//! PeerAuthentication decides alike whichever source configures weft: a table of cases
//! (PeerAuthentications at mesh, namespace and workload scope, port-level modes) applied to a
//! real kube-apiserver with a real istiod beside it. For each case one weft state is built from
//! istiod's xDS (the Authorization resources and per-workload policy lists istiod derives) and
//! one from the Kubernetes objects directly (weft's own derivation); both must give the
//! expected verdict for plaintext and mTLS connections to every probed pod and port, and name
//! the same policies on each workload.
//!
//! No lab is needed: the decision is the evaluator's, on the state each source produced (the
//! data path enforcing it is tested in k8s_e2e.rs).

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::istio::Istiod;

use weft::admin::Readiness;
use weft::authz::{ConnFacts, Target};
use weft::grpc::{GrpcTarget, TokenFile};
use weft::k8s::translate::ClusterFacts;
use weft::k8s::KubeSettings;
use weft::metrics::Metrics;
use weft::state::StateStore;
use weft::xds::{translate::Defaults, NodeIdentity, XdsSettings};

/// The probed pods: (name, label app, IP).
const PODS: [(&str, &str, &str); 2] = [("a", "a", "10.250.9.2"), ("b", "b", "10.250.9.3")];
const PORTS: [u16; 2] = [8080, 9090];

fn objects() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: ztunnel\n  namespace: istio-system\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: ztunnel-a\n  namespace: istio-system\nspec:\n  serviceAccountName: ztunnel\n  nodeName: node-a\n  containers:\n  - name: z\n    image: z\n",
    );
    for (name, app, _) in PODS {
        y += &format!("---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: {app}\n  annotations:\n    ambient.istio.io/redirection: enabled\nspec:\n  nodeName: node-a\n  containers:\n  - name: app\n    image: app\n");
    }
    y
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

fn strict_ns() -> String {
    pa("shop", "default", "  mtls:\n    mode: STRICT\n")
}

/// One case: the PeerAuthentications in force, the pods/ports plaintext may reach (mTLS is
/// always admitted), and the derived policies the state holds (which also tells the case's
/// final state from one where an old object is deleted and the new one not yet seen).
struct Case {
    what: &'static str,
    objects: Vec<String>,
    plaintext_open: &'static [(&'static str, u16)],
    derived: &'static [&'static str],
}

const STATIC: &str = "istio-system/istio_converted_static_strict";
const A_PORTS: &str = "shop/converted_peer_authentication_a-ports";

fn cases() -> Vec<Case> {
    let all: &[(&str, u16)] = &[("a", 8080), ("a", 9090), ("b", 8080), ("b", 9090)];
    // Adjacent cases differ in their tables, so a case never passes on the previous state.
    vec![
        Case {
            what: "no PeerAuthentication: PERMISSIVE",
            objects: vec![],
            plaintext_open: all,
            derived: &[],
        },
        Case {
            what: "mesh STRICT",
            objects: vec![pa("istio-system", "default", "  mtls:\n    mode: STRICT\n")],
            plaintext_open: &[],
            derived: &[STATIC],
        },
        Case {
            what: "mesh STRICT, namespace PERMISSIVE",
            objects: vec![
                pa("istio-system", "default", "  mtls:\n    mode: STRICT\n"),
                pa("shop", "default", "  mtls:\n    mode: PERMISSIVE\n"),
            ],
            plaintext_open: all,
            derived: &[STATIC],
        },
        Case {
            what: "namespace STRICT, workload a STRICT with port 8080 DISABLE",
            objects: vec![
                strict_ns(),
                pa(
                    "shop",
                    "a-ports",
                    "  selector:\n    matchLabels:\n      app: a\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
                ),
            ],
            plaintext_open: &[("a", 8080)],
            derived: &[STATIC, A_PORTS],
        },
        Case {
            what: "namespace STRICT, workload a unset with port 9090 PERMISSIVE",
            objects: vec![
                strict_ns(),
                pa(
                    "shop",
                    "a-ports",
                    "  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n",
                ),
            ],
            plaintext_open: &[("a", 9090)],
            derived: &[STATIC, A_PORTS],
        },
        Case {
            // istiod attaches only its static STRICT policy here (it looks for PERMISSIVE
            // ports, not DISABLE ones, under an inherited STRICT), so the port stays closed.
            what: "namespace STRICT, workload a unset with port 9090 DISABLE",
            objects: vec![
                strict_ns(),
                pa(
                    "shop",
                    "a-ports",
                    "  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    9090:\n      mode: DISABLE\n",
                ),
            ],
            plaintext_open: &[],
            derived: &[STATIC, A_PORTS],
        },
        Case {
            what: "namespace PERMISSIVE, workload a PERMISSIVE with port 9090 STRICT",
            objects: vec![
                pa("shop", "default", "  mtls:\n    mode: PERMISSIVE\n"),
                pa(
                    "shop",
                    "a-ports",
                    "  selector:\n    matchLabels:\n      app: a\n  mtls:\n    mode: PERMISSIVE\n  portLevelMtls:\n    9090:\n      mode: STRICT\n",
                ),
            ],
            plaintext_open: &[("a", 8080), ("b", 8080), ("b", 9090)],
            derived: &[STATIC, A_PORTS],
        },
        Case {
            what: "workload b STRICT only",
            objects: vec![pa(
                "shop",
                "b-strict",
                "  selector:\n    matchLabels:\n      app: b\n  mtls:\n    mode: STRICT\n",
            )],
            plaintext_open: &[("a", 8080), ("a", 9090)],
            derived: &[STATIC],
        },
    ]
}

/// What one state decides: per (pod, port, mtls) whether admitted, and each pod's policy list.
#[derive(Debug, PartialEq, Eq)]
struct Decisions {
    verdicts: BTreeMap<(String, u16, bool), bool>,
    policy_lists: BTreeMap<String, Vec<String>>,
    derived: Vec<String>,
}

fn decide(store: &StateStore) -> Option<Decisions> {
    let snap = store.snapshot();
    let mut verdicts = BTreeMap::new();
    let mut policy_lists = BTreeMap::new();
    for (name, _, ip) in PODS {
        let ip: IpAddr = ip.parse().ok()?;
        let w = snap.workload_by_ip(ip)?;
        let mut names = w.authorization_policies.clone();
        names.sort();
        policy_lists.insert(name.to_string(), names);
        for port in PORTS {
            for mtls in [false, true] {
                let target = Target {
                    namespace: &w.namespace,
                    labels: &w.labels,
                    policy_names: &w.authorization_policies,
                };
                let facts = ConnFacts {
                    source_ip: "10.250.8.8".parse().ok()?,
                    source_principal: mtls.then_some("cluster.local/ns/other/sa/client"),
                    source_namespace: mtls.then_some("other"),
                    destination_ip: ip,
                    destination_port: port,
                };
                let ok = snap.policies.evaluate(&target, &facts).is_allowed();
                verdicts.insert((name.to_string(), port, mtls), ok);
            }
        }
    }
    let mut derived: Vec<String> = snap.policies.policies().map(|p| p.key()).collect();
    derived.sort();
    Some(Decisions {
        verdicts,
        policy_lists,
        derived,
    })
}

fn expected(case: &Case) -> BTreeMap<(String, u16, bool), bool> {
    let mut out = BTreeMap::new();
    for (name, _, _) in PODS {
        for port in PORTS {
            out.insert((name.to_string(), port, true), true);
            out.insert(
                (name.to_string(), port, false),
                case.plaintext_open.contains(&(name, port)),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_decides_alike_under_istiod_and_from_kubernetes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let api = ApiServer::start();
    let istiod = Istiod::start(&api);
    api.apply_yaml(&objects());
    api.set_pod_running("istio-system", "ztunnel-a", "10.250.0.1");
    for (name, _, ip) in PODS {
        api.set_pod_running("shop", name, ip);
    }

    // weft's state from istiod.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        api.token("istio-system", "ztunnel", "istio-ca", Some("ztunnel-a")),
    )
    .unwrap();
    let from_istiod = StateStore::new("istio-system");
    let xds = weft::xds::client::start(
        XdsSettings {
            target: GrpcTarget {
                address: istiod.xds_addr().to_string(),
                root_cert: istiod.root_cert(),
                server_name: Some(istiod.san()),
            },
            token: Some(TokenFile { path: token }),
            node: NodeIdentity {
                pod_name: "ztunnel-a".into(),
                pod_namespace: "istio-system".into(),
                pod_ip: "10.250.0.1".into(),
                node_name: "node-a".into(),
                cluster_id: "Kubernetes".into(),
                metadata: Default::default(),
            },
            defaults: Defaults {
                trust_domain: "cluster.local".into(),
                cluster_id: "Kubernetes".into(),
            },
            node_name: "node-a".into(),
            find_netns: false,
        },
        from_istiod.clone(),
        Arc::new(Readiness::default()),
        Arc::new(Metrics::new()),
    );

    // weft's state from the Kubernetes objects (weft's own derivation).
    let from_kubernetes = StateStore::new("istio-system");
    let client = weft::k8s::client(&KubeSettings {
        kubeconfig: Some(api.kubeconfig()),
        domain_suffix: "cluster.local".into(),
        auto_allocate_vips: true,
    })
    .await
    .expect("client");
    let kube_tasks = weft::k8s::start(
        client,
        ClusterFacts {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            auto_allocate_vips: true,
        },
        "node-a".into(),
        from_kubernetes.clone(),
        Arc::new(Readiness::default()),
        false,
    );

    let mut applied: Vec<String> = Vec::new();
    for case in cases() {
        // Replace the previous case's objects with this one's.
        let keep: Vec<&String> = case.objects.iter().collect();
        for old in applied.iter().filter(|o| !keep.contains(o)) {
            api.kubectl_stdin(&["delete", "-f", "-"], old);
        }
        for obj in &case.objects {
            api.apply_yaml(obj);
        }
        applied = case.objects.clone();

        let want = expected(&case);
        let mut want_derived: Vec<String> = case.derived.iter().map(|k| k.to_string()).collect();
        want_derived.sort();
        let t0 = Instant::now();
        let (mut got_istiod, mut got_kube) = (None, None);
        while t0.elapsed() < Duration::from_secs(45) {
            got_istiod = decide(&from_istiod);
            got_kube = decide(&from_kubernetes);
            let done = |d: &Option<Decisions>| {
                d.as_ref()
                    .is_some_and(|d| d.verdicts == want && d.derived == want_derived)
            };
            if done(&got_istiod) && done(&got_kube) && got_istiod == got_kube {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let done = |d: &Option<Decisions>| {
            d.as_ref()
                .is_some_and(|d| d.verdicts == want && d.derived == want_derived)
        };
        assert!(
            done(&got_istiod) && done(&got_kube) && got_istiod == got_kube,
            "case {:?}:\nwant {want:?}, policies {want_derived:?}\nfrom istiod: {got_istiod:?}\nfrom Kubernetes: {got_kube:?}\nistiod log: {}",
            case.what,
            istiod.log().display(),
        );
        eprintln!(
            "case {:?}: both sources agree after {:?}: {:?}",
            case.what,
            t0.elapsed(),
            got_kube.map(|d| d.policy_lists)
        );
    }

    xds.abort();
    for t in kube_tasks {
        t.abort();
    }
}
