//! weft driven by a real Kubernetes API server (etcd + kube-apiserver from
//! scripts/k8s-testenv.sh): namespaces, pods, a service and AuthorizationPolicies are API
//! objects; each pod is backed by a network namespace of the lab with a process in it, as on a
//! node. No kubelet runs, so the test sets pod status itself.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::Client;
use serde_json::{json, Value};

use common::apiserver::ApiServer;
use common::hbone_hop::Upstream;
use common::lab::{self, Lab};
use common::*;
use weft::k8s::KubeSettings;
use weft::node::{Node, Sources};

/// The mesh's certificates come from `weft ca serve`, which alone holds the signing key; a
/// node's weft gets only the root bundle (the `weft-ca-root` ConfigMap's file) and its pod's
/// bound token.
struct MeshCa {
    service: weft::ca_service::CaService,
    /// What a node sees: root-cert.pem and nothing else.
    roots_dir: tempfile::TempDir,
    tokens_dir: tempfile::TempDir,
    key_dir: tempfile::TempDir,
}

impl MeshCa {
    async fn start(api: &ApiServer) -> MeshCa {
        let key_dir = tempfile::tempdir().unwrap();
        weft::identity::CertificateAuthority::init(key_dir.path(), "cluster.local").unwrap();
        let roots_dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            key_dir.path().join("root-cert.pem"),
            roots_dir.path().join("root-cert.pem"),
        )
        .unwrap();
        let client = weft::k8s::client(&KubeSettings {
            kubeconfig: Some(api.kubeconfig()),
            domain_suffix: String::new(),
            auto_allocate_vips: true,
        })
        .await
        .unwrap();
        let kube = std::sync::Arc::new(weft::ca_service::authn::KubeApi { client });
        let service = weft::ca_service::CaService::start(
            weft::ca_service::CaServiceSettings {
                ca_dir: key_dir.path().to_owned(),
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: "127.0.0.1:0".parse().unwrap(),
                server_names: vec!["weft-ca.weft-system.svc".into()],
                trust_domain: "cluster.local".into(),
                audience: "istio-ca".into(),
                node_agents: vec!["weft-system/weft".into()],
                max_ttl: Duration::from_secs(86400),
                rate_per_second: 100.0,
                burst: 1000,
            },
            kube.clone(),
            kube,
        )
        .await
        .expect("CA service starts");
        MeshCa {
            service,
            roots_dir,
            tokens_dir: tempfile::tempdir().unwrap(),
            key_dir,
        }
    }

    /// The signer of the weft whose pod is `pod`: the CA service, with that pod's token.
    fn signer(
        &self,
        api: &ApiServer,
        pod: &str,
    ) -> std::sync::Arc<dyn weft::identity::CertificateSigner> {
        let token = self.tokens_dir.path().join(pod);
        std::fs::write(
            &token,
            api.token("weft-system", "weft", "istio-ca", Some(pod)),
        )
        .unwrap();
        std::sync::Arc::new(
            weft::identity::istio_ca::IstioCa::new(weft::identity::istio_ca::IstioCaSettings {
                target: weft::grpc::GrpcTarget {
                    address: format!("https://127.0.0.1:{}", self.service.addr.port()),
                    root_cert: self.roots_dir.path().join("root-cert.pem"),
                    server_name: Some("weft-ca.weft-system.svc".into()),
                },
                token: Some(weft::grpc::TokenFile { path: token }),
                cluster_id: "Kubernetes".into(),
                node_identity: Some(weft::identity::Identity::new(
                    "cluster.local",
                    "weft-system",
                    "weft",
                )),
                trust_domain: "cluster.local".into(),
            })
            .expect("CA client"),
        )
    }
}

/// weft's own resolver in this test (see `NodeResolver`): loopback, so it is reachable from
/// the test's namespace, where the in-process wefts make their own lookups.
const NODE_RESOLVER: &str = "127.0.250.53";

async fn start_k8s_node(
    node: &str,
    kubeconfig: &Path,
    signer: std::sync::Arc<dyn weft::identity::CertificateSigner>,
    resolv_conf: &Path,
) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut settings = settings(node);
    settings.dns.own_resolv_conf = resolv_conf.to_owned();
    // The unpooled cross-network mode is run by hand for BENCHMARKS.md's figures.
    settings.pool_cross_network =
        std::env::var("WEFT_TEST_POOL_CROSS_NETWORK").as_deref() != Ok("false");
    // No CA key anywhere a node can read: the built-in CA's directory does not exist.
    settings.ca_dir = "/nonexistent/weft-ca".into();
    let node = Node::start(
        settings,
        Sources {
            config_file: None,
            kubernetes: Some(KubeSettings {
                kubeconfig: Some(kubeconfig.to_owned()),
                auto_allocate_vips: true,
                domain_suffix: "cluster.local".into(),
            }),
            ..Sources::default()
        },
        Some(signer),
        None,
    )
    .await
    .expect("node starts");
    for _ in 0..200 {
        if node.readiness.is_ready() {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "weft on {node:?} never became ready",
        node = node.admin_addr
    );
}

async fn create<K>(api: &Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create")
}

/// A pod as the API would show it once the kubelet has run it: scheduled, Running, Ready.
async fn run_pod(client: &Client, ns: &str, name: &str, sa: &str, node: &str, ip: &str, app: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    create(
        &pods,
        json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]}
        }),
    )
    .await;
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("set pod status");
}

async fn label_ambient(client: &Client, ns: &str, on: bool) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let value = if on { json!("ambient") } else { Value::Null };
    let patch = json!({"metadata": {"labels": {"istio.io/dataplane-mode": value}}});
    namespaces
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label namespace");
}

/// Istio objects of `group` (`security`, `networking`) in namespace shop.
fn istio_api(client: &Client, group: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let group = format!("{group}.istio.io");
    let ar = ApiResource {
        api_version: format!("{group}/v1"),
        group,
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client.clone(), "shop", &ar)
}

fn policies(client: &Client) -> Api<DynamicObject> {
    istio_api(
        client,
        "security",
        "AuthorizationPolicy",
        "authorizationpolicies",
    )
}

fn peer_authns(client: &Client) -> Api<DynamicObject> {
    istio_api(
        client,
        "security",
        "PeerAuthentication",
        "peerauthentications",
    )
}

fn service_entries(client: &Client) -> Api<DynamicObject> {
    istio_api(client, "networking", "ServiceEntry", "serviceentries")
}

fn workload_entries(client: &Client) -> Api<DynamicObject> {
    istio_api(client, "networking", "WorkloadEntry", "workloadentries")
}

/// The CRDs of daemonset/crds, applied and served.
async fn apply_crds(client: &Client) {
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiextensions.k8s.io/v1".into(),
            kind: "CustomResourceDefinition".into(),
            plural: "customresourcedefinitions".into(),
        },
    );
    for file in [
        "authorizationpolicies.security.istio.io.yaml",
        "peerauthentications.security.istio.io.yaml",
        "serviceentries.networking.istio.io.yaml",
        "workloadentries.networking.istio.io.yaml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("daemonset/crds")
            .join(file);
        let text = std::fs::read_to_string(path).expect("CRD manifest");
        let crd: Value = serde_saphyr::from_str(&text).expect("CRD yaml");
        create(&crds, crd).await;
    }
    // Served once the CRDs are Established.
    for _ in 0..100 {
        if policies(client).list(&Default::default()).await.is_ok()
            && peer_authns(client).list(&Default::default()).await.is_ok()
            && service_entries(client)
                .list(&Default::default())
                .await
                .is_ok()
            && workload_entries(client)
                .list(&Default::default())
                .await
                .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the Istio CRDs of daemonset/crds were never served");
}

/// Connections b1 accepted from a1 (shop/frontend) in mTLS, as node-b counts them.
const FROM_FRONTEND_TO_B1: [&str; 4] = [
    "reporter=\"destination\"",
    "destination_workload=\"b1\"",
    "source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\"",
    "connection_security_policy=\"mutual_tls\"",
];
const OPENED: &str = "istio_tcp_connections_opened_total";

async fn opened_from_frontend(metrics: SocketAddr) -> Option<f64> {
    metric(&scrape(metrics).await, OPENED, &FROM_FRONTEND_TO_B1)
}

/// Polls a lab round trip until it gives `want` (bounded): config from the API server arrives
/// asynchronously.
async fn eventually_send(lab: &Lab, from: &str, to: &str, port: u16, want_ok: bool) {
    for _ in 0..60 {
        let r = lab.send(from, to, port, "probe");
        if r.is_ok() == want_ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "{from} -> {to}:{port} never became {}",
        if want_ok { "allowed" } else { "denied" }
    );
}

/// The weft metric `weft_hbone_handshakes_total{direction}` of a node.
async fn handshakes(metrics: SocketAddr, direction: &str) -> f64 {
    let want = format!("direction=\"{direction}\"");
    metric(
        &scrape(metrics).await,
        "weft_hbone_handshakes_total",
        &[&want],
    )
    .unwrap_or(0.0)
}

/// Two networks in the lab: b1 labelled onto network `west`, a1 onto `east`. West's
/// east-west gateway is the test hop in b2's namespace, behind Service legacy/eastwest
/// (labelled with the network, an HBONE port, b2's address as its external IP); it forwards a
/// CONNECT for the backend service to b1's HBONE port untouched. a1's connections to the
/// backend VIP then go in double HBONE: the outer CONNECT to the gateway, the inner one with
/// a1's identity to b1's weft, both pooled.
async fn cross_network(
    lab: &Lab,
    client: &Client,
    a: &Node,
    b: &Node,
    b1: &lab::AppServer,
    ca: &weft::identity::CertificateAuthority,
    vip: &str,
) {
    let gateway_addr: SocketAddr = "10.250.2.3:15008".parse().unwrap();
    let route = Upstream::ByAuthority(vec![(
        "backend.shop.svc.cluster.local:80".into(),
        "10.250.2.2:15008".parse().unwrap(),
    )]);
    let gateway = common::hbone_hop::TestHop::start(
        &lab.netns_path("b2"),
        gateway_addr,
        ca,
        &weft::identity::Identity::new("cluster.local", "legacy", "default"),
        route.clone(),
    )
    .await;
    let gateway_svc = create(
        &Api::<Service>::namespaced(client.clone(), "legacy"),
        json!({"metadata": {"name": "eastwest", "labels": {"topology.istio.io/network": "west"}},
            "spec": {"selector": {"app": "legacy"}, "externalIPs": ["10.250.2.3"],
                     "ports": [{"name": "tls-hbone", "port": 15008}]}}),
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    let on_network =
        |n: Option<&str>| json!({"metadata": {"labels": {"topology.istio.io/network": n}}});
    for (pod, network) in [("a1", "east"), ("b1", "west")] {
        pods.patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(on_network(Some(network))),
        )
        .await
        .expect("label the pod's network");
    }
    let b1_ip: std::net::IpAddr = "10.250.2.2".parse().unwrap();
    let a1_ip: std::net::IpAddr = "10.250.1.2".parse().unwrap();
    let sees_two_networks = |node: &Node| {
        let snap = node.ctx.state.snapshot();
        let b1_west = snap
            .workload_by_ip(b1_ip)
            .is_some_and(|w| w.network == "west" && w.network_gateway.is_some());
        let a1_east = snap
            .workload_by_ip(a1_ip)
            .is_some_and(|w| w.network == "east");
        let gateway_known = snap.service_by_vip(gateway_addr.ip()).is_some();
        b1_west && a1_east && gateway_known
    };
    eventually("both nodes see two networks and west's gateway", || {
        sees_two_networks(a) && sees_two_networks(b)
    })
    .await;

    let (a_out, b_in) = (
        handshakes(a.metrics_addr, "outbound").await,
        handshakes(b.metrics_addr, "inbound").await,
    );
    let through = [
        "reporter=\"destination\"",
        "source_workload=\"a1\"",
        "source_workload_namespace=\"shop\"",
        "source_cluster=\"Kubernetes\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\"",
        "destination_workload=\"b1\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let from_a = [
        "reporter=\"source\"",
        "source_workload=\"a1\"",
        "destination_workload=\"b1\"",
        "destination_workload_namespace=\"shop\"",
        "destination_service=\"backend.shop.svc.cluster.local\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/backend\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    // a1 reached b1 directly before: the same series (as in ztunnel), so count from here.
    let opened_before = metric(&scrape(b.metrics_addr).await, OPENED, &through).unwrap_or(0.0);
    let from_a_before = metric(&scrape(a.metrics_addr).await, OPENED, &from_a).unwrap_or(0.0);
    assert_eq!(lab.send("a1", vip, 80, "across"), Ok("across".into()));
    assert_eq!(
        b1.next_peer(),
        "10.250.2.3",
        "b1 is reached from the gateway"
    );
    for i in 0..100 {
        let msg = format!("across-{i}");
        assert_eq!(lab.send("a1", vip, 80, &msg), Ok(msg), "connection {i}");
        assert_eq!(b1.next_peer(), "10.250.2.3");
    }
    // The outer CONNECT: to the service by name, a1's identity, the client and the service
    // in `forwarded`, no network header (that is for the destination).
    // Pooled, the 101 connections share one inner connection, so one outer stream; unpooled,
    // each has its own inner connection, each on a stream of the one pooled outer connection.
    let pooled = a.ctx.settings.pool_cross_network;
    let inner = if pooled { 1 } else { 101 };
    let seen = gateway.seen();
    assert_eq!(
        seen.len(),
        inner,
        "one outer stream per inner connection: {seen:?}"
    );
    for s in &seen {
        assert_eq!(s.authority, "backend.shop.svc.cluster.local:80");
        assert_eq!(s.client, "spiffe://cluster.local/ns/shop/sa/frontend");
        assert!(
            s.forwarded.starts_with("for=\"10.250.1.2:")
                && s.forwarded
                    .ends_with(";host=backend.shop.svc.cluster.local"),
            "{s:?}"
        );
        assert_eq!(s.network, None);
        // Byte for byte what ztunnel writes for this pod under istiod (empty keys left out,
        // the workload key named by its type: `pod`, as istiod sends every pod).
        assert_eq!(
            s.baggage,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=a1,\
             service.name=frontend,service.version=latest"
        );
    }
    let ordering = std::sync::atomic::Ordering::SeqCst;
    assert_eq!(
        gateway.handshakes.load(ordering),
        1,
        "one outer TLS handshake"
    );
    assert_eq!(gateway.upstream_connects.load(ordering), inner);
    assert_eq!(
        handshakes(b.metrics_addr, "inbound").await - b_in,
        inner as f64,
        "the destination's handshakes: one per inner connection"
    );
    assert_eq!(
        handshakes(a.metrics_addr, "outbound").await - a_out,
        1.0 + inner as f64,
        "the client's: the outer and each inner"
    );
    // The destination saw a1's identity through the gateway and, told by the inner request
    // that it came from network east, did not take the gateway's address for the source: it
    // names the source as the baggage describes it.
    let m = scrape(b.metrics_addr).await;
    assert_eq!(
        metric(&m, OPENED, &through),
        Some(opened_before + 101.0),
        "{m}"
    );
    // The gateway picks the endpoint: the client knows the service and (all of its endpoints
    // on west sharing one) the identity, and names the workload from the `baggage` of the
    // destination's answer, as ztunnel does.
    let m = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(&m, OPENED, &from_a),
        Some(from_a_before + 101.0),
        "{m}"
    );
    let target: SocketAddr = format!("{vip}:80").parse().unwrap();
    let per_connection = lab.time_connections("a1", target, 300).await;
    println!(
        "figure: cross-network connections (pool_cross_network={pooled}): {:.0}/s, {per_connection:?} each",
        1.0 / per_connection.as_secs_f64()
    );
    b1.drain();

    // A gateway presenting another identity than its service's endpoints is refused.
    gateway.stop().await;
    let impostor = common::hbone_hop::TestHop::start(
        &lab.netns_path("b2"),
        gateway_addr,
        ca,
        &weft::identity::Identity::new("cluster.local", "legacy", "impostor"),
        route,
    )
    .await;
    assert!(
        lab.send("a1", vip, 80, "to-impostor").is_err(),
        "a gateway with the wrong identity is refused"
    );
    assert!(impostor.seen().is_empty(), "nothing was sent through it");
    impostor.stop().await;

    // One network again: direct.
    for pod in ["a1", "b1"] {
        pods.patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(on_network(None)),
        )
        .await
        .expect("unlabel the pod's network");
    }
    Api::<Service>::namespaced(client.clone(), "legacy")
        .delete(
            gateway_svc.metadata.name.as_deref().unwrap_or("eastwest"),
            &DeleteParams::default(),
        )
        .await
        .expect("delete the gateway service");
    eventually("node a sees one network again", || {
        let snap = a.ctx.state.snapshot();
        let b1_local = snap
            .workload_by_ip(b1_ip)
            .is_some_and(|w| w.network.is_empty());
        let a1_local = snap
            .workload_by_ip(a1_ip)
            .is_some_and(|w| w.network.is_empty());
        b1_local && a1_local
    })
    .await;
    assert_eq!(
        lab.send("a1", vip, 80, "one-network"),
        Ok("one-network".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2", "direct again: b1 sees a1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_labelled_ambient_are_captured_policed_and_released() {
    let logs = logs();
    let api = ApiServer::start();
    let mut lab = Lab::up(&["a1"]);
    lab.hold(&["a1", "a2", "b1", "b2"]);
    let client = weft::k8s::client(&KubeSettings {
        auto_allocate_vips: true,
        kubeconfig: Some(api.kubeconfig()),
        domain_suffix: "cluster.local".into(),
    })
    .await
    .expect("client");
    apply_crds(&client).await;
    // weft runs as its DaemonSet's service account, with exactly the RBAC of daemonset/.
    api.apply(&[
        "daemonset/namespace.yaml",
        "daemonset/serviceaccount.yaml",
        "daemonset/rbac.yaml",
    ]);
    let weft_kubeconfig = api.kubeconfig_as("system:serviceaccount:weft-system:weft");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["shop", "legacy"] {
        create(&namespaces, json!({"metadata": {"name": ns}})).await;
    }
    run_pod(
        &client,
        "shop",
        "a1",
        "frontend",
        "a",
        "10.250.1.2",
        "frontend",
    )
    .await;
    run_pod(
        &client,
        "shop",
        "a2",
        "intruder",
        "a",
        "10.250.1.3",
        "intruder",
    )
    .await;
    run_pod(
        &client,
        "shop",
        "b1",
        "backend",
        "b",
        "10.250.2.2",
        "backend",
    )
    .await;
    run_pod(
        &client,
        "legacy",
        "b2",
        "default",
        "b",
        "10.250.2.3",
        "legacy",
    )
    .await;
    let svc = create(
        &Api::<Service>::namespaced(client.clone(), "shop"),
        json!({"metadata": {"name": "backend"},
            "spec": {"selector": {"app": "backend"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    )
    .await;
    let vip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("cluster IP allocated");

    // weft's own pods, whose bound tokens name their nodes to the CA service.
    api.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: weft-a, namespace: weft-system}\nspec: {nodeName: a, serviceAccountName: weft, containers: [{name: weft, image: weft}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: weft-b, namespace: weft-system}\nspec: {nodeName: b, serviceAccountName: weft, containers: [{name: weft, image: weft}]}\n",
    );
    let mesh_ca = MeshCa::start(&api).await;
    assert!(
        std::fs::read_dir(mesh_ca.roots_dir.path())
            .unwrap()
            .flatten()
            .all(|f| f.file_name() == "root-cert.pem"),
        "nodes see the root only"
    );
    let resolv_dir = tempfile::tempdir().unwrap();
    let resolv_conf = resolv_dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {NODE_RESOLVER}\n")).unwrap();
    let a = start_k8s_node(
        "a",
        &weft_kubeconfig,
        mesh_ca.signer(&api, "weft-a"),
        &resolv_conf,
    )
    .await;
    let b = start_k8s_node(
        "b",
        &weft_kubeconfig,
        mesh_ca.signer(&api, "weft-b"),
        &resolv_conf,
    )
    .await;
    let b1 = lab.serve("b1", 8080);
    let b2 = lab.serve("b2", 8080);

    // Not labelled yet: nothing captured, traffic flows as before.
    assert!(lab.ruleset("a1").is_none() && lab.ruleset("b1").is_none());
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "plain"),
        Ok("plain".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");

    // Label the namespace: shop's pods are captured on their own nodes, legacy's are not.
    label_ambient(&client, "shop", true).await;
    eventually("shop pods captured", || {
        ["a1", "a2", "b1"].iter().all(|p| lab.ruleset(p).is_some())
    })
    .await;
    assert!(lab.ruleset("b2").is_none(), "legacy is not ambient");
    let a1_rules = lab.ruleset("a1").expect("a1 captured");
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "via-hbone"),
        Ok("via-hbone".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2", "b1 sees a1's own IP");
    eventually_metric(b.metrics_addr, OPENED, &FROM_FRONTEND_TO_B1, 1.0).await;
    // The service VIP reaches b1 through its named target port.
    assert_eq!(
        lab.send("a1", &vip, 80, "via-service"),
        Ok("via-service".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(
        dump.contains("shop/a1") && dump.contains("/proc/"),
        "{dump}"
    );
    // The legacy pod is reached in plain TCP.
    assert_eq!(
        lab.send("a1", "10.250.2.3", 8080, "legacy"),
        Ok("legacy".into())
    );

    // A policy from the API: only shop/frontend may reach shop.
    create(
        &policies(&client),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "frontend-only"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]}}),
    )
    .await;
    eventually_send(&lab, "a2", "10.250.2.2", 8080, false).await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "allowed"),
        Ok("allowed".into())
    );
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_failed_total",
        &["source_workload=\"a2\"", "response_flags=\"DENY\""],
        1.0,
    )
    .await;
    // A policy weft cannot enforce is refused by name; the other stays in force.
    create(
        &policies(&client),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "broken"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["not-a-cidr"]}}]}]}}),
    )
    .await;
    eventually("broken policy reported", || {
        !logs.lines_with("shop/broken").is_empty()
    })
    .await;
    assert!(lab.send("a2", "10.250.2.2", 8080, "still-denied").is_err());

    // The API server goes away and comes back: capture and policy hold meanwhile, the watches
    // resume, and nothing is captured twice.
    let before = opened_from_frontend(b.metrics_addr).await.unwrap_or(0.0);
    api.restart(Duration::from_secs(1));
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "during"),
        Ok("during".into())
    );
    eventually_metric(b.metrics_addr, OPENED, &FROM_FRONTEND_TO_B1, before + 1.0).await;
    policies(&client)
        .delete("frontend-only", &DeleteParams::default())
        .await
        .expect("delete policy");
    eventually_send(&lab, "a2", "10.250.2.2", 8080, true).await;

    // PeerAuthentication from the API. STRICT in shop: plaintext into b1 (from legacy's b2,
    // outside the mesh, through b1's 15006) is refused, HBONE from a1 still admitted.
    assert_eq!(
        lab.send("b2", "10.250.2.2", 8080, "plain-in"),
        Ok("plain-in".into()),
        "PERMISSIVE without any PeerAuthentication"
    );
    let denied_plain = [
        "destination_workload=\"b1\"",
        "connection_security_policy=\"unknown\"",
        "response_flags=\"DENY\"",
    ];
    let denied_before = metric(
        &scrape(b.metrics_addr).await,
        "istio_tcp_connections_failed_total",
        &denied_plain,
    )
    .unwrap_or(0.0);
    create(
        &peer_authns(&client),
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}),
    )
    .await;
    eventually_send(&lab, "b2", "10.250.2.2", 8080, false).await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "strict-mtls"),
        Ok("strict-mtls".into())
    );
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_failed_total",
        &denied_plain,
        denied_before + 1.0,
    )
    .await;
    let dump = http_get(b.admin_addr, "/config_dump").await;
    assert!(dump.contains("istio_converted_static_strict"), "{dump}");
    // A workload policy for b1 reopens port 8080 to plaintext; the namespace's STRICT stays on
    // b1's other ports, which weft's derived policy shows.
    create(
        &peer_authns(&client),
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "backend-plain"},
            "spec": {"selector": {"matchLabels": {"app": "backend"}},
                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}}),
    )
    .await;
    eventually_send(&lab, "b2", "10.250.2.2", 8080, true).await;
    let dump = http_get(b.admin_addr, "/config_dump").await;
    assert!(
        dump.contains("shop/converted_peer_authentication_backend-plain"),
        "{dump}"
    );
    // A malformed one (a port that is no port) is refused by name; the others stay in force.
    create(
        &peer_authns(&client),
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "broken-port"},
            "spec": {"selector": {"matchLabels": {"app": "backend"}},
                "portLevelMtls": {"http": {"mode": "DISABLE"}}}}),
    )
    .await;
    eventually("broken PeerAuthentication reported", || {
        !logs.lines_with("shop/broken-port").is_empty()
    })
    .await;
    assert_eq!(
        lab.send("b2", "10.250.2.2", 8080, "still-open"),
        Ok("still-open".into())
    );
    for name in ["backend-plain", "broken-port"] {
        peer_authns(&client)
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete PeerAuthentication");
    }
    eventually_send(&lab, "b2", "10.250.2.2", 8080, false).await;
    peer_authns(&client)
        .delete("default", &DeleteParams::default())
        .await
        .expect("delete PeerAuthentication");
    eventually_send(&lab, "b2", "10.250.2.2", 8080, true).await;

    // A ServiceEntry over a pod and a WorkloadEntry: b1 (captured, app: backend) and vm-b2
    // (b2's address, not enrolled in the mesh). Its host resolves through a1's DNS proxy to
    // the entry's VIP, and connections to the VIP are spread over both: to b1 over HBONE, to
    // b2 in plain TCP.
    create(
        &workload_entries(&client),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "vm-b2"},
            "spec": {"address": "10.250.2.3", "labels": {"app": "backend"}, "serviceAccount": "vm"}}),
    )
    .await;
    create(
        &service_entries(&client),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "db"},
            "spec": {"hosts": ["db.example.internal"], "addresses": ["240.240.0.5"],
                "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP", "targetPort": 8080}],
                "location": "MESH_INTERNAL", "resolution": "STATIC",
                "workloadSelector": {"labels": {"app": "backend"}}}}),
    )
    .await;
    // Asked only once node a holds the entry: an unknown name would be forwarded to the
    // pod's resolver, which here is nothing the lab created.
    eventually("node a holds the ServiceEntry and its endpoints", || {
        let snap = a.ctx.state.snapshot();
        let held = snap
            .services_by_hostname("db.example.internal")
            .any(|s| snap.healthy_endpoints(&s.key()).count() == 2);
        held
    })
    .await;
    let udp = common::dns::pod_udp(&lab.netns_path("a1"), "10.250.2.3:53");
    assert_eq!(
        common::dns::resolve_a(&udp, 0x5e, "db.example.internal."),
        ["240.240.0.5"],
        "the entry's host through a1's DNS proxy"
    );
    while b1.peers.try_recv().is_ok() {}
    while b2.peers.try_recv().is_ok() {}
    let (mut at_b1, mut at_b2) = (0, 0);
    for i in 0..20 {
        assert_eq!(
            lab.send("a1", "240.240.0.5", 5432, &format!("se-{i}")),
            Ok(format!("se-{i}"))
        );
        while let Ok(peer) = b1.peers.recv_timeout(Duration::from_millis(50)) {
            assert_eq!(peer, "10.250.1.2");
            at_b1 += 1;
        }
        while let Ok(peer) = b2.peers.recv_timeout(Duration::from_millis(50)) {
            assert_eq!(peer, "10.250.1.2");
            at_b2 += 1;
        }
    }
    assert!(
        at_b1 > 0 && at_b2 > 0 && at_b1 + at_b2 == 20,
        "spread over both endpoints: b1 {at_b1}, b2 {at_b2}"
    );
    let m = scrape(a.metrics_addr).await;
    let to = |workload: &str, security: &str| {
        metric(
            &m,
            OPENED,
            &[
                "reporter=\"source\"",
                &format!("destination_workload=\"{workload}\""),
                "destination_service=\"db.example.internal\"",
                &format!("connection_security_policy=\"{security}\""),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (to("b1", "mutual_tls"), to("vm-b2", "unknown")),
        (at_b1 as f64, at_b2 as f64),
        "{m}"
    );
    service_entries(&client)
        .delete("db", &DeleteParams::default())
        .await
        .expect("delete ServiceEntry");
    workload_entries(&client)
        .delete("vm-b2", &DeleteParams::default())
        .await
        .expect("delete WorkloadEntry");

    // A ServiceEntry resolved by DNS, with no address and no endpoint: weft allocates its
    // host a VIP (a1's DNS proxy answers it) and, when a connection comes, looks the host up
    // with its own resolver (here: b2's address) and connects there in plain TCP.
    let node_resolver = common::dns::NodeResolver::start(
        &format!("{NODE_RESOLVER}:53"),
        &[("pg.external.test.", "10.250.2.3".parse().unwrap())],
    );
    create(
        &service_entries(&client),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "pg"},
            "spec": {"hosts": ["pg.external.test"], "resolution": "DNS",
                "ports": [{"number": 5432, "name": "tcp", "targetPort": 8080}]}}),
    )
    .await;
    // A ServiceEntry with resolution NONE over b2's own address: connections to it pass
    // through to that address (it has no endpoints, and needs none).
    create(
        &service_entries(&client),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "legacy"},
            "spec": {"hosts": ["legacy.example.internal"], "addresses": ["10.250.2.3"],
                "resolution": "NONE", "ports": [{"number": 8080, "name": "tcp"}]}}),
    )
    .await;
    eventually("node a holds both entries", || {
        let snap = a.ctx.state.snapshot();
        let pg = snap
            .services_by_hostname("pg.external.test")
            .any(|s| !s.vips.is_empty() && snap.healthy_endpoints(&s.key()).count() == 1);
        pg && snap
            .services_by_hostname("legacy.example.internal")
            .any(|s| s.passthrough)
    })
    .await;
    let pg_vips = common::dns::resolve_a(&udp, 0x5f, "pg.external.test.");
    let [pg_vip] = &pg_vips[..] else {
        panic!("one allocated address for the host, got {pg_vips:?}")
    };
    assert!(
        pg_vip.starts_with("240.240."),
        "allocated from Istio's range: {pg_vip}"
    );
    while b2.peers.try_recv().is_ok() {}
    for i in 0..3 {
        assert_eq!(
            lab.send("a1", pg_vip, 5432, &format!("pg-{i}")),
            Ok(format!("pg-{i}")),
            "through the allocated VIP to the host's looked-up address"
        );
        assert_eq!(b2.next_peer(), "10.250.1.2", "b2 sees a1's own address");
    }
    assert_eq!(
        node_resolver.times_asked("pg.external.test.", hickory_proto::rr::RecordType::A),
        1,
        "looked up once, then from the cache: {:?}",
        node_resolver.asked.lock().unwrap()
    );
    let m = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_on_demand_dns_total",
            &["hostname=\"pg.external.test\"", "source_workload=\"a1\""]
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            OPENED,
            &[
                "reporter=\"source\"",
                "destination_service=\"pg.external.test\"",
                "connection_security_policy=\"unknown\"",
            ],
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        lab.send("a1", "10.250.2.3", 8080, "legacy"),
        Ok("legacy".into()),
        "a passthrough entry's address is reached as dialled"
    );
    assert_eq!(b2.next_peer(), "10.250.1.2");
    let m = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            OPENED,
            &[
                "reporter=\"source\"",
                "destination_service=\"legacy.example.internal\"",
            ],
        ),
        Some(1.0),
        "{m}"
    );
    for name in ["pg", "legacy"] {
        service_entries(&client)
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete ServiceEntry");
    }
    drop(node_resolver);

    // A waypoint for the backend service: the test waypoint in b2's namespace (outside the
    // mesh), behind Service legacy/waypoint. With the service labelled to use it, a1's
    // connections to the VIP go over HBONE to the waypoint, the VIP as the authority and a1's
    // identity presented; the waypoint forwards them to b1. Unlabelled, they go direct again.
    let ca = weft::identity::CertificateAuthority::load(mesh_ca.key_dir.path()).unwrap();
    let waypoint_addr: SocketAddr = "10.250.2.3:15008".parse().unwrap();
    let waypoint_id = weft::identity::Identity::new("cluster.local", "legacy", "default");
    let waypoint = common::hbone_hop::TestHop::start(
        &lab.netns_path("b2"),
        waypoint_addr,
        &ca,
        &waypoint_id,
        Upstream::Fixed("10.250.2.2:8080".parse().unwrap()),
    )
    .await;
    create(
        &Api::<Service>::namespaced(client.clone(), "legacy"),
        json!({"metadata": {"name": "waypoint"},
            "spec": {"selector": {"app": "legacy"}, "ports": [{"name": "mesh", "port": 15008}]}}),
    )
    .await;
    let backend_svc = Api::<Service>::namespaced(client.clone(), "shop");
    let use_waypoint = |name: Option<&str>| {
        json!({"metadata": {"labels": {
            "istio.io/use-waypoint": name,
            "istio.io/use-waypoint-namespace": name.map(|_| "legacy"),
        }}})
    };
    backend_svc
        .patch(
            "backend",
            &PatchParams::default(),
            &Patch::Merge(use_waypoint(Some("waypoint"))),
        )
        .await
        .expect("label the service");
    eventually("node a routes backend through its waypoint", || {
        let snap = a.ctx.state.snapshot();
        let routed = snap
            .services_by_hostname("backend.shop.svc.cluster.local")
            .any(|s| s.waypoint.is_some())
            && snap
                .services_by_hostname("waypoint.legacy.svc.cluster.local")
                .any(|s| snap.healthy_endpoints(&s.key()).count() == 1);
        routed
    })
    .await;
    while b1.peers.try_recv().is_ok() {}
    for i in 0..3 {
        assert_eq!(
            lab.send("a1", &vip, 80, &format!("wp-{i}")),
            Ok(format!("wp-{i}")),
            "a1 → the service through the waypoint"
        );
        assert_eq!(
            b1.next_peer(),
            "10.250.2.3",
            "b1 is reached from the waypoint"
        );
    }
    let seen = waypoint.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!(
            s.authority,
            format!("{vip}:80"),
            "the VIP is the authority: {s:?}"
        );
        assert_eq!(
            s.client, "spiffe://cluster.local/ns/shop/sa/frontend",
            "a1's identity: {s:?}"
        );
        assert!(
            s.forwarded.starts_with("for=\"10.250.1.2:")
                && s.forwarded
                    .ends_with(";host=backend.shop.svc.cluster.local"),
            "forwarded names a1 and the service: {s:?}"
        );
    }
    assert_eq!(
        waypoint
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the three streams share one pooled connection"
    );
    let m = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            OPENED,
            &[
                "reporter=\"source\"",
                "destination_workload=\"b2\"",
                "destination_service=\"backend.shop.svc.cluster.local\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        ),
        Some(3.0),
        "{m}"
    );
    let target: SocketAddr = format!("{vip}:80").parse().unwrap();
    let through_waypoint = lab.time_connections("a1", target, 300).await;
    b1.drain();
    // A waypoint that presents another identity than its workload's is refused.
    waypoint.stop().await;
    let impostor = common::hbone_hop::TestHop::start(
        &lab.netns_path("b2"),
        waypoint_addr,
        &ca,
        &weft::identity::Identity::new("cluster.local", "legacy", "impostor"),
        Upstream::Fixed("10.250.2.2:8080".parse().unwrap()),
    )
    .await;
    assert!(
        lab.send("a1", &vip, 80, "to-impostor").is_err(),
        "a waypoint with the wrong identity is refused"
    );
    assert!(impostor.seen().is_empty(), "nothing was sent to it");
    impostor.stop().await;
    backend_svc
        .patch(
            "backend",
            &PatchParams::default(),
            &Patch::Merge(use_waypoint(None)),
        )
        .await
        .expect("unlabel the service");
    eventually("node a routes backend directly again", || {
        let snap = a.ctx.state.snapshot();
        let direct = snap
            .services_by_hostname("backend.shop.svc.cluster.local")
            .all(|s| s.waypoint.is_none());
        direct
    })
    .await;
    assert_eq!(lab.send("a1", &vip, 80, "direct"), Ok("direct".into()));
    assert_eq!(b1.next_peer(), "10.250.1.2", "direct again: b1 sees a1");
    let direct = lab.time_connections("a1", target, 300).await;
    b1.drain();
    println!(
        "figure: new connection + 16-byte echo, a1 → backend VIP: direct {direct:?}, through the waypoint {through_waypoint:?}"
    );

    cross_network(&lab, &client, &a, &b, &b1, &ca, &vip).await;

    assert_eq!(lab.ruleset("a1").as_deref(), Some(a1_rules.as_str()));
    assert_eq!(lab.ip_rules("a1").matches("fwmark").count(), 1);
    assert_eq!(
        metric(&scrape(a.metrics_addr).await, "weft_captured_pods", &[]),
        Some(2.0)
    );

    // Unlabel: released, and traffic still flows, uncaptured.
    label_ambient(&client, "shop", false).await;
    eventually("shop pods released", || {
        ["a1", "a2", "b1"].iter().all(|p| lab.ruleset(p).is_none())
    })
    .await;
    assert_eq!(lab.ip_rules("a1").matches("fwmark").count(), 0);
    let opened = opened_from_frontend(b.metrics_addr).await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "released"),
        Ok("released".into())
    );
    // b1 may have seen the probes of eventually_send; the last peer is a1.
    let mut last = String::new();
    while let Ok(p) = b1.peers.recv_timeout(Duration::from_millis(500)) {
        last = p;
    }
    assert_eq!(last, "10.250.1.2");
    assert_eq!(
        opened_from_frontend(b.metrics_addr).await,
        opened,
        "not tunnelled"
    );

    // Label again, then delete a pod: its capture goes with it.
    label_ambient(&client, "shop", true).await;
    eventually("a2 captured again", || lab.ruleset("a2").is_some()).await;
    Api::<Pod>::namespaced(client.clone(), "shop")
        .delete("a2", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    eventually("a2 released after deletion", || lab.ruleset("a2").is_none()).await;
    assert!(lab.ruleset("a1").is_some(), "a1 stays captured");

    // Deleting the namespace releases the rest (without a namespace controller here, it stays
    // Terminating: that alone must be enough).
    Api::<Namespace>::all(client.clone())
        .delete("shop", &DeleteParams::default())
        .await
        .expect("delete namespace");
    eventually("shop released after namespace deletion", || {
        ["a1", "b1"].iter().all(|p| lab.ruleset(p).is_none())
    })
    .await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "after"),
        Ok("after".into())
    );

    // Every workload certificate above came from the CA service, asked on the pods' behalf.
    let issued = metric(
        &http_get(mesh_ca.service.metrics_addr, "/metrics").await,
        "weft_ca_certificates_issued_total",
        &["impersonated=\"true\""],
    );
    assert!(issued.is_some_and(|n| n >= 2.0), "{issued:?}");

    a.shutdown(Duration::from_millis(200)).await;
    b.shutdown(Duration::from_millis(200)).await;
}
