//! weft-cni admission against the real Kubernetes API: weft reads the namespace and pod at
//! ADD time (the pod has no IP in its status yet, as on a real node), captures pods of ambient
//! namespaces with their service account, and lets opted-out pods and pods of other
//! namespaces start uncaptured.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::apiserver::ApiServer;
use common::lab::Lab;
use common::*;
use serde_json::{json, Value};
use weft::cni::CniServerSettings;
use weft::k8s::KubeSettings;
use weft::node::{Node, Sources};

fn manifests() -> &'static str {
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n\
---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: a1, namespace: shop}\nspec: {nodeName: a, serviceAccountName: client, containers: [{name: app, image: app}]}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: a2, namespace: shop, labels: {istio.io/dataplane-mode: none}}\nspec: {nodeName: a, containers: [{name: app, image: app}]}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: l1, namespace: legacy}\nspec: {nodeName: a, containers: [{name: app, image: app}]}\n"
}

/// Runs weft-cni as the runtime does for pod `ns/name` in netns `netns`.
fn cni(
    socket: &std::path::Path,
    command: &str,
    ns: &str,
    name: &str,
    netns: &str,
    ip: &str,
) -> (i32, Value) {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "lab", "type": "weft-cni", "socket": socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{ip}/24")}]},
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run weft-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_at_add_reads_the_namespace_and_pod_from_the_api() {
    let api = ApiServer::start();
    let mut lab = Lab::up(&[]);
    api.apply_yaml(manifests());
    let dir = tempfile::tempdir().unwrap();
    let cni_settings = CniServerSettings {
        socket: dir.path().join("cni.sock"),
        state_dir: dir.path().join("pods"),
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    logs();
    let a = Node::start(
        settings("a"),
        Sources {
            kubernetes: Some(KubeSettings {
                kubeconfig: Some(api.kubeconfig()),
                domain_suffix: "cluster.local".into(),
                auto_allocate_vips: true,
            }),
            cni: Some(cni_settings.clone()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("weft starts");
    let sock = &cni_settings.socket;

    // Ambient namespace: captured, with the pod's service account.
    let (code, out) = cni(
        sock,
        "ADD",
        "shop",
        "a1",
        &lab.netns_path("a1"),
        "10.250.1.2",
    );
    assert_eq!(code, 0, "{out}");
    assert!(lab.ruleset("a1").is_some(), "a1 captured at ADD");
    let dump = http_get(a.admin_addr, "/config_dump").await;
    let body = &dump[dump.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let v: Value = serde_json::from_str(body).expect("config_dump is JSON");
    assert_eq!(
        v["workloadState"]["uid-a1"]["info"]["serviceAccount"], "client",
        "{body}"
    );
    // Its first connection leaves captured, from its own address, although the API does not
    // list an IP for it yet: b2 is outside the mesh, so this is weft's passthrough.
    let b2 = lab.serve("b2", 8080);
    assert_eq!(
        lab.send("a1", "10.250.2.3", 8080, "early"),
        Ok("early".into())
    );
    assert_eq!(b2.next_peer(), "10.250.1.2");
    let m = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", "source_workload=\"a1\""]
        ),
        Some(1.0),
        "{m}"
    );

    // Opted out, and not in an ambient namespace: ADD succeeds, nothing is captured.
    let (code, out) = cni(
        sock,
        "ADD",
        "shop",
        "a2",
        &lab.netns_path("a2"),
        "10.250.1.3",
    );
    assert_eq!(code, 0, "{out}");
    assert!(lab.ruleset("a2").is_none(), "opted-out pod left alone");
    let (code, out) = cni(
        sock,
        "ADD",
        "legacy",
        "l1",
        &lab.netns_path("b2"),
        "10.250.2.3",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        lab.ruleset("b2").is_none(),
        "pod outside the mesh left alone"
    );
    // CHECK agrees with each decision.
    assert_eq!(
        cni(
            sock,
            "CHECK",
            "shop",
            "a1",
            &lab.netns_path("a1"),
            "10.250.1.2"
        )
        .0,
        0
    );
    assert_eq!(
        cni(
            sock,
            "CHECK",
            "shop",
            "a2",
            &lab.netns_path("a2"),
            "10.250.1.3"
        )
        .0,
        0
    );

    // A pod the API does not know: refused (the runtime retries), nothing captured.
    let (code, out) = cni(
        sock,
        "ADD",
        "shop",
        "ghost",
        &lab.netns_path("a2"),
        "10.250.1.3",
    );
    assert_eq!(code, 1);
    assert_eq!(out["code"], 100, "{out}");
    assert!(
        out["details"]
            .as_str()
            .unwrap_or("")
            .contains("reading pod shop/ghost"),
        "{out}"
    );
    assert!(lab.ruleset("a2").is_none());

    assert_eq!(
        cni(
            sock,
            "DEL",
            "shop",
            "a1",
            &lab.netns_path("a1"),
            "10.250.1.2"
        )
        .0,
        0
    );
    assert!(lab.ruleset("a1").is_none(), "released");
}
