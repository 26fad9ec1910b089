//! weft in ztunnel's place under a real istiod and a real kube-apiserver: configuration only
//! from istiod's xDS, certificates only from istiod's CA (no local file, no CA key anywhere),
//! traffic through real network namespaces.
//!
//! There is no kubelet and no istio-cni here: pods are API objects whose status the test sets
//! (IP, Ready) and which carry the annotation istio-cni would add once it has redirected the
//! pod (`ambient.istio.io/redirection: enabled`, what makes istiod serve the workload as HBONE);
//! each is backed by a lab netns with a sleeping process in it, found by weft's `/proc` scan.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::istio::{istioctl, Istiod};
use common::lab::Lab;
use common::*;

use weft::grpc::{GrpcTarget, TokenFile};
use weft::identity::istio_ca::{IstioCa, IstioCaSettings};
use weft::identity::{CertificateSigner, Identity};
use weft::node::{Node, Sources};
use weft::xds::{translate::Defaults, NodeIdentity, XdsSettings};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn objects() -> String {
    let pod = |ns: &str, name: &str, sa: &str, node: &str, app: &str, ambient: bool| {
        let annotation = if ambient {
            "  annotations:\n    ambient.istio.io/redirection: enabled\n"
        } else {
            ""
        };
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {app}\n{annotation}spec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers:\n  - name: app\n    image: app\n"
        )
    };
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    );
    for (ns, sa) in [
        ("istio-system", "ztunnel"),
        ("shop", "client"),
        ("shop", "server"),
    ] {
        y += &format!("---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n");
    }
    y += &pod(
        "istio-system",
        "ztunnel-a",
        "ztunnel",
        "node-a",
        "ztunnel",
        false,
    );
    y += &pod(
        "istio-system",
        "ztunnel-b",
        "ztunnel",
        "node-b",
        "ztunnel",
        false,
    );
    y += &pod("shop", "a1", "client", "node-a", "a1", true);
    y += &pod("shop", "b1", "server", "node-b", "b1", true);
    y
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).expect("token file");
    p
}

struct Weft {
    node: Node,
    ca: Arc<IstioCa>,
}

/// weft's own resolver in this test (see `NodeResolver`), on loopback: the in-process wefts
/// make their own lookups from the test's namespace.
const NODE_RESOLVER: &str = "127.0.250.54";

async fn start_weft(
    node: &str,
    pod: &str,
    istiod: &Istiod,
    token: &Path,
    resolv_conf: &Path,
) -> Weft {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let target = GrpcTarget {
        address: istiod.xds_addr().to_string(),
        root_cert: istiod.root_cert(),
        server_name: Some(istiod.san()),
    };
    let token = Some(TokenFile {
        path: token.to_owned(),
    });
    let ca = Arc::new(
        IstioCa::new(IstioCaSettings {
            target: target.clone(),
            token: token.clone(),
            cluster_id: "Kubernetes".into(),
            node_identity: Some(Identity::new("cluster.local", "istio-system", "ztunnel")),
            trust_domain: "cluster.local".into(),
        })
        .expect("CA client"),
    );
    let xds = XdsSettings {
        target,
        token,
        node: NodeIdentity {
            pod_name: pod.into(),
            pod_namespace: "istio-system".into(),
            pod_ip: "10.250.0.1".into(),
            node_name: node.into(),
            cluster_id: "Kubernetes".into(),
            metadata: Default::default(),
        },
        defaults: Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
        node_name: node.into(),
        find_netns: true,
    };
    let mut s = settings(node);
    s.dns.own_resolv_conf = resolv_conf.to_owned();
    // No CA directory at all: a signer that is not istiod's would fail to load.
    s.ca_dir = PathBuf::from("/nonexistent/no-ca-key-here");
    let signer: Arc<dyn CertificateSigner> = ca.clone();
    let node = Node::start(
        s,
        Sources {
            xds: Some(xds),
            ..Sources::default()
        },
        Some(signer),
        None,
    )
    .await
    .expect("node starts under istiod");
    Weft { node, ca }
}

/// Waits (bounded) until `f` holds, polling every 100 ms; panics with `what` otherwise.
async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out after {limit:?} waiting for {what}; last log lines:\n{}",
        logs().tail(60)
    );
}

fn captured(w: &Weft, uid_suffix: &str) -> bool {
    let snap = w.node.ctx.state.snapshot();
    snap.workloads
        .values()
        .any(|wl| wl.uid.ends_with(uid_suffix) && wl.netns.is_some())
        && w.node.enroller.summaries().iter().any(|s| {
            serde_json::to_string(s)
                .unwrap_or_default()
                .contains(uid_suffix)
        })
}

fn has_policy(w: &Weft, key: &str) -> bool {
    w.node.ctx.state.snapshot().policies.get(key).is_some()
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: shop
spec:
  selector:
    matchLabels:
      app: b1
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/client]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_runs_under_a_real_istiod() {
    let logs = logs();
    let api = ApiServer::start();
    let mut istiod = Istiod::start(&api);
    api.apply_yaml(&objects());
    let mut lab = Lab::up(&[]);
    lab.hold(&["a1", "b1"]);
    let created = Instant::now();
    api.set_pod_running("istio-system", "ztunnel-a", "10.250.0.1");
    api.set_pod_running("istio-system", "ztunnel-b", "10.250.0.2");
    api.set_pod_running("shop", "a1", "10.250.1.2");
    api.set_pod_running("shop", "b1", "10.250.2.2");

    let dir = tempfile::tempdir().unwrap();
    let token_a = write_token(
        dir.path(),
        "a",
        &api.token("istio-system", "ztunnel", "istio-ca", Some("ztunnel-a")),
    );
    let token_b = write_token(
        dir.path(),
        "b",
        &api.token("istio-system", "ztunnel", "istio-ca", Some("ztunnel-b")),
    );
    let resolv_conf = dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {NODE_RESOLVER}\n")).unwrap();
    let a = start_weft("node-a", "ztunnel-a", &istiod, &token_a, &resolv_conf).await;
    let b = start_weft("node-b", "ztunnel-b", &istiod, &token_b, &resolv_conf).await;

    // Ready only after istiod's first push; then each weft captures its own pod.
    let took = wait_for(
        "both wefts capture their pod",
        Duration::from_secs(60),
        || captured(&a, "/shop/a1") && captured(&b, "/shop/b1"),
    )
    .await;
    let from_creation = created.elapsed();
    eprintln!("FIGURE pod status set -> captured by weft via istiod: {from_creation:?} (after weft start: {took:?})");
    wait_for("node A ready", Duration::from_secs(10), || {
        a.node.readiness.is_ready()
    })
    .await;
    let b1_on_a = a
        .node
        .ctx
        .state
        .snapshot()
        .workload_by_ip("10.250.2.2".parse().unwrap())
        .cloned()
        .expect("node A knows b1 from istiod");
    assert_eq!(b1_on_a.protocol, weft::state::Protocol::HBONE);
    assert_eq!(b1_on_a.node, "node-b");
    assert_eq!(b1_on_a.service_account, "server");

    // A pod created in the API while weft runs: how long until node B holds it.
    let t0 = Instant::now();
    api.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a3\n  namespace: shop\n  labels:\n    app: a3\n  annotations:\n    ambient.istio.io/redirection: enabled\nspec:\n  serviceAccountName: client\n  nodeName: node-a\n  containers:\n  - name: app\n    image: app\n",
    );
    api.set_pod_running("shop", "a3", "10.250.1.4");
    let took = wait_for("node B holds a new pod", Duration::from_secs(30), || {
        b.node
            .ctx
            .state
            .snapshot()
            .workload_by_ip("10.250.1.4".parse().unwrap())
            .is_some_and(|w| w.protocol == weft::state::Protocol::HBONE)
    })
    .await;
    eprintln!("FIGURE pod created in the API -> held by weft (node B): {:?} (kubectl apply + status patch take {:?} of it)", t0.elapsed(), t0.elapsed() - took);

    // a1 → b1 over HBONE, the identity and source IP seen on b1's side.
    let b1 = lab.serve("b1", 8080);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "via-istiod"),
        Ok("via-istiod".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually_metric(
        b.node.metrics_addr,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            &format!("source_principal=\"{CLIENT}\""),
            "connection_security_policy=\"mutual_tls\"",
        ],
        1.0,
    )
    .await;
    assert!(
        logs.lines_with(CLIENT).iter().any(|l| l.contains("access")),
        "b1's access log names a1's identity"
    );

    // The certificates are istiod's: they chain to its root (and to nothing else).
    let client_cert = a
        .node
        .ctx
        .tls
        .cert_manager()
        .certificate(&Identity::new("cluster.local", "shop", "client"))
        .expect("node A holds a1's certificate");
    assert_chains_to(&client_cert.certified_key.cert, &istiod.root_cert());

    // A weft asking for the identity of a pod on another node is refused by istiod.
    let foreign = Identity::new("cluster.local", "shop", "server");
    let refused =
        a.ca.sign(&foreign, Duration::from_secs(3600))
            .await
            .expect_err("istiod must refuse node A a certificate for node B's pod");
    let refused = refused.to_string();
    // istiod answers a failed node check with an opaque Unauthenticated and logs the reason.
    assert!(
        refused.contains("Unauthenticated") && refused.contains("impersonation"),
        "{refused}"
    );
    let istiod_log = std::fs::read_to_string(istiod.log()).unwrap_or_default();
    assert!(
        istiod_log
            .contains("impersonation failed for identity spiffe://cluster.local/ns/shop/sa/server"),
        "istiod logs the node check that failed"
    );
    // And the node agent logs it when it asks through its certificate manager.
    let _ = a.node.ctx.tls.cert_manager().fetch(&foreign).await;
    assert!(
        !logs
            .lines_with("spiffe://cluster.local/ns/shop/sa/server")
            .is_empty(),
        "the refusal is logged"
    );

    // A policy created in the API reaches weft through istiod and denies; a live connection
    // it denies is closed.
    let held = lab.send_in_background("a1", "10.250.2.2", 8080, "held", 20.0);
    b1.next_peer();
    api.apply_yaml(DENY_CLIENT);
    let took = wait_for("the policy reaches node B", Duration::from_secs(30), || {
        has_policy(&b, "shop/deny-client")
    })
    .await;
    eprintln!("FIGURE AuthorizationPolicy created -> held by weft: {took:?}");
    let t0 = Instant::now();
    let r = held.join();
    assert!(r.is_err(), "the live connection must be closed: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "closed promptly");
    assert!(
        lab.send("a1", "10.250.2.2", 8080, "denied").is_err(),
        "new connections are denied"
    );

    // Deleting it allows again.
    api.kubectl(&["delete", "authorizationpolicy", "deny-client", "-n", "shop"]);
    wait_for("the policy leaves node B", Duration::from_secs(30), || {
        !has_policy(&b, "shop/deny-client")
    })
    .await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "allowed"),
        Ok("allowed".into())
    );
    b1.next_peer();

    // A ServiceEntry resolved by DNS, as istiod sends it: a service with the entry's address
    // and, for its host, a workload known by name only. a1's DNS proxy answers the host from
    // that state; a connection to the address reaches what weft's own resolver gives for the
    // host (b2, outside the mesh), in plain TCP.
    let node_resolver = common::dns::NodeResolver::start(
        &format!("{NODE_RESOLVER}:53"),
        &[("pg.external.test.", "10.250.2.3".parse().unwrap())],
    );
    let b2 = lab.serve("b2", 8080);
    api.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: pg\n  namespace: shop\nspec:\n  hosts: [pg.external.test]\n  addresses: [240.240.7.7]\n  resolution: DNS\n  location: MESH_EXTERNAL\n  ports:\n  - {number: 5432, name: tcp, protocol: TCP, targetPort: 8080}\n",
    );
    let took = wait_for(
        "node A holds the entry from istiod",
        Duration::from_secs(30),
        || {
            let snap = a.node.ctx.state.snapshot();
            let held = snap.services_by_hostname("pg.external.test").any(|s| {
                snap.healthy_endpoints(&s.key())
                    .any(|e| e.workload.hostname == "pg.external.test")
            });
            held
        },
    )
    .await;
    eprintln!("FIGURE ServiceEntry created -> held by weft with its endpoint by name: {took:?}");
    let udp = common::dns::pod_udp(&lab.netns_path("a1"), "10.250.2.3:53");
    assert_eq!(
        common::dns::resolve_a(&udp, 0x60, "pg.external.test."),
        ["240.240.7.7"],
        "a1's DNS proxy answers the entry's host from istiod's state"
    );
    assert_eq!(
        lab.send("a1", "240.240.7.7", 5432, "pg-via-istiod"),
        Ok("pg-via-istiod".into())
    );
    assert_eq!(b2.next_peer(), "10.250.1.2");
    assert_eq!(
        node_resolver.times_asked("pg.external.test.", hickory_proto::rr::RecordType::A),
        1
    );
    api.kubectl(&["delete", "serviceentry", "pg", "-n", "shop"]);
    drop(node_resolver);

    // istiod goes away: weft keeps serving with what it has; a change made meanwhile arrives
    // once istiod is back, on a stream that resumes from the versions weft holds.
    let before = logs.lines_with("xDS stream open").len();
    let address_responses = || -> Vec<String> {
        logs.lines_with("xDS response applied")
            .into_iter()
            .filter(|l| l.contains("istio.workload.Address"))
            .collect()
    };
    let pushed_before = address_responses();
    // The first push held everything: its size is what a full resend would be.
    let full = pushed_before
        .first()
        .and_then(|l| l.split("received=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("the first push is logged with its size");
    assert!(full >= 4, "the first push holds the 4 pods: {full}");
    istiod.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "istiod-down"),
        Ok("istiod-down".into())
    );
    b1.next_peer();
    api.apply_yaml(DENY_CLIENT);
    istiod.start_again();
    wait_for("both wefts reconnect", Duration::from_secs(60), || {
        logs.lines_with("xDS stream open").len() >= before + 2
    })
    .await;
    wait_for(
        "the change made while istiod was away",
        Duration::from_secs(60),
        || has_policy(&b, "shop/deny-client"),
    )
    .await;
    assert!(lab.send("a1", "10.250.2.2", 8080, "denied-again").is_err());
    // The resumed stream did not resend the workloads weft already held.
    let resumed: Vec<String> = address_responses()[pushed_before.len()..].to_vec();
    eprintln!("xDS Address responses after the reconnect: {resumed:#?}");
    for l in &resumed {
        let n: usize = l
            .split("received=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("received count");
        assert!(
            n < full,
            "a reconnect resent the world ({n} of {full}): {l}"
        );
    }

    waypoint_from_istiod(&api, &a, &lab).await;

    // istioctl (the one built with istiod) reads weft's admin endpoint.
    let dump = http_get(a.node.admin_addr, "/config_dump").await;
    let body = dump.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(&dump);
    let file = dir.path().join("config_dump.json");
    std::fs::write(&file, body).unwrap();
    for (what, needles) in [
        ("workloads", vec!["a1", "b1", "10.250.2.2", "HBONE"]),
        ("services", vec![]),
        ("policies", vec!["deny-client"]),
        (
            "certificates",
            vec![
                "spiffe://cluster.local/ns/shop/sa/client",
                "Leaf",
                "Available",
            ],
        ),
    ] {
        let out = std::process::Command::new(istioctl())
            .args(["ztunnel-config", what, "--file"])
            .arg(&file)
            .arg("--kubeconfig")
            .arg(api.kubeconfig())
            .output()
            .expect("run istioctl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "istioctl ztunnel-config {what}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("istioctl ztunnel-config {what}:\n{text}");
        for n in needles {
            assert!(
                text.contains(n),
                "istioctl ztunnel-config {what} lacks {n:?}:\n{text}"
            );
        }
    }
    drop(lab);
}

/// A waypoint as istiod builds it for ambient: a Gateway of class `istio-waypoint` whose status
/// has an address (the test writes it, as istiod does once the waypoint's deployment has a ready
/// pod: there is no kubelet here), its instances the pods labelled with the Gateway's name (one,
/// running at 10.250.2.3 as service account `waypoint`), its Service, and a service labelled to
/// use it. From istiod's xDS alone, node A must route a1's connections to that service through
/// the waypoint's instance, the VIP as the authority and the waypoint's identity required.
async fn waypoint_from_istiod(api: &ApiServer, a: &Weft, lab: &Lab) {
    let crds = common::apiserver::cached_binary("gateway-api-crds");
    for crd in ["gatewayclasses", "gateways"] {
        let file = crds.join(format!("gateway.networking.k8s.io_{crd}.yaml"));
        api.kubectl(&["apply", "--server-side", "-f", &file.to_string_lossy()]);
    }
    api.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/gateways.gateway.networking.k8s.io",
    ]);
    api.apply_yaml(concat!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n",
        "spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: waypoint, namespace: shop}\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: waypoint-0\n  namespace: shop\n",
        "  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}\n",
        "spec:\n  serviceAccountName: waypoint\n  nodeName: node-b\n  containers: [{name: proxy, image: proxy}]\n",
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: backend, namespace: shop}\n",
        "spec:\n  selector: {app: b1}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    ));
    api.set_pod_running("shop", "waypoint-0", "10.250.2.3");
    // istiod's own gateway controller may have made the waypoint's Service; make sure it is
    // there with the instances as endpoints, as a deployed waypoint has it.
    if api
        .kubectl(&[
            "get",
            "service",
            "waypoint",
            "-n",
            "shop",
            "--ignore-not-found",
            "-o",
            "name",
        ])
        .trim()
        .is_empty()
    {
        api.apply_yaml(concat!(
            "apiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop}\n",
            "spec:\n  selector: {gateway.networking.k8s.io/gateway-name: waypoint}\n",
            "  ports: [{name: mesh, port: 15008}]\n",
        ));
    }
    api.kubectl(&[
        "patch",
        "gateway",
        "waypoint",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"addresses":[{"type":"Hostname","value":"waypoint.shop.svc.cluster.local"}]}}"#,
    ]);
    api.kubectl(&[
        "label",
        "service",
        "backend",
        "-n",
        "shop",
        "istio.io/use-waypoint=waypoint",
    ]);
    let took = wait_for(
        "node A holds the backend's waypoint from istiod",
        Duration::from_secs(60),
        || {
            let snap = a.node.ctx.state.snapshot();
            let named = snap
                .services_by_hostname("backend.shop.svc.cluster.local")
                .any(|s| s.waypoint.is_some());
            let instance = snap
                .services_by_hostname("waypoint.shop.svc.cluster.local")
                .any(|s| snap.healthy_endpoints(&s.key()).count() == 1);
            named && instance
        },
    )
    .await;
    eprintln!("FIGURE Gateway and use-waypoint label applied -> waypoint held by weft from istiod: {took:?}");
    let snap = a.node.ctx.state.snapshot();
    let backend = snap
        .services_by_hostname("backend.shop.svc.cluster.local")
        .next()
        .cloned()
        .expect("backend");
    assert_eq!(
        backend.waypoint,
        Some(weft::state::GatewayAddress {
            destination: weft::state::GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        }),
        "the waypoint as istiod names it"
    );
    let a1 = snap
        .workload_by_ip("10.250.1.2".parse().unwrap())
        .cloned()
        .expect("a1");
    let vip = std::net::SocketAddr::new(*backend.vips.first().expect("a VIP"), 80);
    let decision = weft::proxy::route::decide(&snap, &a1, vip, &a.node.ctx.settings.ports);
    let Ok(weft::proxy::route::Decision::Ready(route)) = decision else {
        panic!("no route to the backend: {decision:?}");
    };
    assert_eq!(
        route.transport,
        weft::proxy::route::Transport::Hbone {
            tunnel: "10.250.2.3:15008".parse().unwrap(),
            identities: vec![Identity::new("cluster.local", "shop", "waypoint")],
        },
        "to the waypoint's instance, its identity required"
    );
    assert_eq!(route.target, vip, "the VIP stays the authority");

    // And on the wire: the test hop in b2's namespace stands in for the waypoint's proxy, with
    // a certificate from istiod's own CA for the waypoint's identity, and relays to b2's app.
    let ca_dir = tempfile::tempdir().unwrap();
    for (key, file) in [
        ("ca-cert\\.pem", "ca-cert.pem"),
        ("ca-key\\.pem", "ca-key.pem"),
    ] {
        let b64 = api.kubectl(&[
            "get",
            "secret",
            "istio-ca-secret",
            "-n",
            "istio-system",
            "-o",
            &format!("jsonpath={{.data.{key}}}"),
        ]);
        let pem = base64_decode(b64.trim());
        std::fs::write(ca_dir.path().join(file), &pem).unwrap();
        if file == "ca-cert.pem" {
            std::fs::write(ca_dir.path().join("root-cert.pem"), &pem).unwrap();
        }
    }
    let istiod_ca = weft::identity::CertificateAuthority::load(ca_dir.path())
        .expect("istiod's self-signed CA as weft's CA type");
    let hop = common::hbone_hop::TestHop::start(
        &lab.netns_path("b2"),
        "10.250.2.3:15008".parse().unwrap(),
        &istiod_ca,
        &Identity::new("cluster.local", "shop", "waypoint"),
        common::hbone_hop::Upstream::Fixed("10.250.2.3:8080".parse().unwrap()),
    )
    .await;
    assert_eq!(
        lab.send("a1", &vip.ip().to_string(), 80, "via-istiod-waypoint"),
        Ok("via-istiod-waypoint".into())
    );
    let seen = hop.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, vip.to_string());
    assert_eq!(seen[0].client, CLIENT);
    assert!(
        seen[0]
            .forwarded
            .ends_with(";host=backend.shop.svc.cluster.local"),
        "{seen:?}"
    );
    hop.stop().await;
}

/// Standard base64 (what `kubectl get secret -o jsonpath` prints).
fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64 from kubectl")
}

/// The leaf verifies to the roots in `root_pem` (webpki, as a peer would check it).
fn assert_chains_to(chain: &[rustls::pki_types::CertificateDer<'static>], root_pem: &Path) {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(root_pem).expect("root");
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .expect("root PEM");
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .expect("anchor")
                .to_owned()
        })
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).expect("leaf parses");
    leaf.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("the workload certificate chains to istiod's root");
}
