//! weft under the real istio-cni node agent (built from the same Istio module as istiod, run
//! against the test API server inside the lab's node-a namespace): the agent's CNI plugin is
//! called as a container runtime calls it, the agent installs its redirection in the pod and
//! hands the pod's namespace to weft over ZDS; weft serves it, releases it when the pod goes
//! (Del, or absent from a snapshot), and keeps serving across the agent's restart. The agent's
//! DNS redirection (its chart default) brings the pod's DNS to weft's proxy.

mod common;

use std::time::Duration;

use common::apiserver::ApiServer;
use common::istio_cni::{CniPod, IstioCni, PodSandbox};
use common::lab::Lab;
use common::*;
use weft::node::{Node, Sources};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn pods_yaml() -> String {
    let pod = |name: &str, sa: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  nodeName: node-a\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app}}]\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: client, namespace: shop}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: other, namespace: shop}}\n{}{}",
        pod("a1", "client"),
        pod("a2", "other")
    )
}

fn set_running(api: &ApiServer, name: &str, ip: &str) -> String {
    api.set_pod_running("shop", name, ip);
    api.kubectl(&[
        "-n",
        "shop",
        "get",
        "pod",
        name,
        "-o",
        "jsonpath={.metadata.uid}",
    ])
    .trim()
    .to_string()
}

async fn start_weft(cfg: &std::path::Path, cni: &IstioCni) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Node::start(
        settings("node-a"),
        Sources {
            config_file: Some(cfg.to_owned()),
            zds: Some(cni.zds_socket()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("weft on node-a starts")
}

async fn config_dump(node: &Node) -> String {
    http_get(node.admin_addr, "/config_dump").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cni_hands_pods_to_weft_over_zds() {
    let logs = logs();
    let api = ApiServer::start();
    let mut lab = Lab::up(&[]);
    api.apply_yaml(&pods_yaml());
    let a1_uid = set_running(&api, "a1", "10.250.1.2");
    let a2_uid = set_running(&api, "a2", "10.250.1.3");
    // The pods' "pause" processes, in cgroups named after the pod UIDs: how the agent finds a
    // running pod's namespace again for its snapshot.
    let _sandboxes = [
        PodSandbox::start(&lab.ns("a1"), &a1_uid),
        PodSandbox::start(&lab.ns("a2"), &a2_uid),
    ];
    let mut cni = IstioCni::start(&api, &lab.ns("na"), "node-a");

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "workloads:\n- uid: b1\n  name: b1\n  namespace: shop\n  serviceAccount: server\n  workloadIps: [\"10.250.2.2\"]\n  protocol: HBONE\n  node: node-b\n  netns: {}\n  services:\n    shop/backend.shop.svc.cluster.local: {{80: 8080}}\nservices:\n- name: backend\n  namespace: shop\n  hostname: backend.shop.svc.cluster.local\n  vips: [\"/10.96.0.20\"]\n  ports: {{80: 8080}}\n",
            lab.netns_path("b1")
        ),
    );
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let a = start_weft(&cfg, &cni).await;
    let _b = start_node("node-b", &cfg).await;
    let b1 = lab.serve("b1", 8080);
    eventually("weft ready after the agent's first snapshot", || {
        a.readiness.is_ready()
    })
    .await;

    // The runtime's ADD: returns once the agent has its rules in and weft acked the hand-off.
    let a1 = CniPod::new(
        "shop",
        "a1",
        &a1_uid,
        &lab.netns_path("a1"),
        "10.250.1.2/24",
        "10.250.1.1",
    );
    let a2 = CniPod::new(
        "shop",
        "a2",
        &a2_uid,
        &lab.netns_path("a2"),
        "10.250.1.3/24",
        "10.250.1.1",
    );
    cni.cni_add_retrying(&a1, Duration::from_secs(20))
        .expect_ok("ADD a1");
    cni.cni_add_retrying(&a2, Duration::from_secs(20))
        .expect_ok("ADD a2");
    let rules = cni.ruleset(&lab.ns("a1"));
    assert!(
        rules.contains("15001") && rules.contains("15006"),
        "agent's redirection: {rules}"
    );
    assert!(
        lab.ruleset("a1").is_none(),
        "weft installs no rules of its own under istio-cni"
    );

    // Captured from the first connection: HBONE with a1's identity at b1.
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "cni-1"),
        Ok("cni-1".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually("a1's first connection arrives with its identity", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 1
    })
    .await;
    let dump = config_dump(&a).await;
    assert!(dump.contains(&a1_uid) && dump.contains(&a2_uid), "{dump}");

    // DNS under istio-cni: the agent's rules send a1's DNS to weft's proxy in a1, which
    // answers the mesh's name from the state; the VIP then carries a1 to b1 over HBONE.
    assert!(rules.contains("15053"), "agent's DNS redirection: {rules}");
    let udp = dns::pod_udp(&lab.netns_path("a1"), "10.250.2.3:53");
    let (answer, _) = dns::ask_udp(
        &udp,
        0x0a1,
        "backend.shop.svc.cluster.local.",
        hickory_proto::rr::RecordType::A,
        Duration::from_secs(5),
    )
    .expect("weft answers a1's DNS");
    assert_eq!(dns::a_records(&answer), ["10.96.0.20"]);
    assert_eq!(
        lab.send("a1", "10.96.0.20", 80, "cni-dns"),
        Ok("cni-dns".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually(
        "a1's connection to the VIP arrives with its identity",
        || logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 2,
    )
    .await;

    // The agent restarts while a1 holds a connection open: weft reconnects, the snapshot keeps
    // both pods, and the held connection carries on.
    let held = lab.send_in_background("a1", "10.250.2.2", 8080, "held", 4.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snapshots = || logs.lines_with("ZDS: snapshot received").len();
    let before = snapshots();
    cni.restart();
    eventually("weft reconnected and took the new snapshot", || {
        snapshots() > before
    })
    .await;
    assert_eq!(
        held.join(),
        Ok("held".into()),
        "held connection survived the restart"
    );
    let dump = config_dump(&a).await;
    assert!(dump.contains(&a1_uid) && dump.contains(&a2_uid), "{dump}");
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "cni-2"),
        Ok("cni-2".into())
    );
    eventually("a1 still captured after the restart", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 4
    })
    .await;

    // weft is upgraded as the DaemonSet's surge does it: the new weft starts and takes the
    // agent's snapshot (the pods' namespaces handed again) while the old one still serves;
    // then the old one stops. The pods stay captured throughout.
    let before = snapshots();
    let a = {
        let old = a;
        let new = start_weft(&cfg, &cni).await;
        eventually("the new weft took its snapshot", || snapshots() > before).await;
        eventually("the new weft is ready", || new.readiness.is_ready()).await;
        old.shutdown(Duration::from_millis(500)).await;
        new
    };
    let dump = config_dump(&a).await;
    assert!(dump.contains(&a1_uid) && dump.contains(&a2_uid), "{dump}");
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "cni-3"),
        Ok("cni-3".into())
    );
    eventually("a1 captured by the new weft", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 5
    })
    .await;

    // a2 is deleted while the agent is down: the next snapshot omits it and weft releases it.
    cni.stop();
    api.kubectl(&[
        "-n",
        "shop",
        "delete",
        "pod",
        "a2",
        "--grace-period=0",
        "--force",
    ]);
    let before = snapshots();
    cni.start_again();
    eventually("a2 released after a snapshot without it", || {
        snapshots() > before
    })
    .await;
    let dump = config_dump(&a).await;
    assert!(dump.contains(&a1_uid) && !dump.contains(&a2_uid), "{dump}");

    // a1 is deleted with the agent up: Del releases it.
    api.kubectl(&[
        "-n",
        "shop",
        "delete",
        "pod",
        "a1",
        "--grace-period=0",
        "--force",
    ]);
    eventually("a1 released by Del", || {
        logs.lines_with("ZDS: pod released")
            .iter()
            .any(|l| l.contains(&a1_uid))
    })
    .await;
    let dump = config_dump(&a).await;
    assert!(!dump.contains(&a1_uid), "{dump}");
    assert_eq!(
        metric(&scrape(a.metrics_addr).await, "weft_captured_pods", &[]),
        Some(0.0)
    );
}
