//! weft-cni invoked exactly as a container runtime invokes a chained plugin, against a running
//! weft, in the lab's real network namespaces: capture is in place when ADD returns (the pod's
//! first connection already goes over HBONE with its identity), DEL takes everything away,
//! CHECK reports, a restarted weft serves the handed pod again, and bad input gets CNI errors.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::Lab;
use common::*;
use serde_json::{json, Value};
use weft::cni::CniServerSettings;
use weft::node::{Node, Sources};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

#[derive(Clone)]
struct Plugin {
    socket: PathBuf,
    netns: String,
    fail_open: bool,
}

struct Ran {
    code: i32,
    stdout: Value,
    stderr: String,
}

impl Plugin {
    fn prev_result(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": self.netns}],
            "ips": [{"address": "10.250.1.2/24", "gateway": "10.250.1.1", "interface": 0}],
        })
    }

    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "weft-cni",
            "socket": self.socket,
            "failOpen": self.fail_open,
            "prevResult": self.prev_result(),
        })
    }

    fn run(&self, command: &str, stdin: &[u8]) -> Ran {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "sandbox-a1")
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a1;K8S_POD_INFRA_CONTAINER_ID=sandbox-a1;K8S_POD_UID=4f1c-a1",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run weft-cni");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: serde_json::from_str(text.trim()).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    fn call(&self, command: &str) -> Ran {
        self.run(command, self.conf().to_string().as_bytes())
    }
}

/// a1 is known to weft (from its configuration) but has no namespace there: only the CNI
/// hand-off captures it. b1 on node b is captured the usual way.
fn config(lab: &Lab) -> String {
    format!(
        "workloads:\n\
- uid: a1\n  name: a1\n  namespace: shop\n  serviceAccount: client\n  workloadIps: [\"10.250.1.2\"]\n  protocol: HBONE\n  node: a\n\
- uid: b1\n  name: b1\n  namespace: shop\n  serviceAccount: server\n  workloadIps: [\"10.250.2.2\"]\n  protocol: HBONE\n  node: b\n  netns: {}\n",
        lab.netns_path("b1")
    )
}

async fn start_cni_node(config: &Path, cni: &CniServerSettings) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    logs();
    Node::start(
        settings("a"),
        Sources {
            config_file: Some(config.to_owned()),
            cni: Some(cni.clone()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("node a starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_cni_captures_before_the_pod_starts_and_releases_on_del() {
    let logs = logs();
    let mut lab = Lab::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config(&lab));
    let cni = CniServerSettings {
        socket: dir.path().join("run/cni.sock"),
        state_dir: dir.path().join("run/pods"),
    };
    let plugin = Plugin {
        socket: cni.socket.clone(),
        netns: lab.netns_path("a1"),
        fail_open: false,
    };

    // weft not running: ADD fails closed with the spec's error object.
    let down = plugin.call("ADD");
    assert_ne!(
        down.code, 0,
        "ADD without weft must fail: {:?}",
        down.stdout
    );
    assert_eq!(down.stdout["code"], 11, "{}", down.stdout);
    assert!(
        down.stdout["msg"]
            .as_str()
            .unwrap_or("")
            .contains("not reachable"),
        "{}",
        down.stdout
    );
    assert_eq!(down.stdout["cniVersion"], "1.0.0");
    // ...unless told to fail open: then the pod starts, uncaptured.
    let open = Plugin {
        fail_open: true,
        ..plugin.clone()
    }
    .call("ADD");
    assert_eq!(open.code, 0, "{}", open.stderr);
    assert_eq!(open.stdout, plugin.prev_result());
    assert!(open.stderr.contains("failing open"), "{}", open.stderr);
    assert!(lab.ruleset("a1").is_none());
    // Pods of excluded namespaces (weft's own) start without asking weft.
    let mut excluded = plugin.conf();
    excluded["excludeNamespaces"] = json!(["weft-system", "shop"]);
    let skip = plugin.run("ADD", excluded.to_string().as_bytes());
    assert_eq!(skip.code, 0, "{} {}", skip.stdout, skip.stderr);
    assert_eq!(skip.stdout, plugin.prev_result());
    // STATUS stays ready while weft is away (so weft's own pod can start), and says why.
    let status = plugin.call("STATUS");
    assert_eq!(status.code, 0);
    assert!(status.stderr.contains("not reachable"), "{}", status.stderr);

    let a = start_cni_node(&cfg, &cni).await;
    let _b = start_node("b", &cfg).await;
    let b1 = lab.serve("b1", 8080);
    assert!(lab.ruleset("a1").is_none(), "a1 is not captured before ADD");

    let version = plugin.call("VERSION");
    assert_eq!(version.code, 0);
    assert!(version.stdout["supportedVersions"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("1.0.0"))));

    let add = plugin.call("ADD");
    assert_eq!(add.code, 0, "ADD: {} {}", add.stdout, add.stderr);
    assert_eq!(
        add.stdout,
        plugin.prev_result(),
        "prevResult passed through"
    );
    assert!(
        lab.ruleset("a1").is_some(),
        "weft's rules are in place when ADD returns"
    );
    // The pod's very first connection: over HBONE, with its identity at the destination.
    assert_eq!(logs.inbound_to_from("10.250.2.2:8080", CLIENT), 0);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "first"),
        Ok("first".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually("inbound log of connection one", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 1
    })
    .await;
    let check = plugin.call("CHECK");
    assert_eq!(check.code, 0, "CHECK: {}", check.stdout);
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(dump.contains(&lab.netns_path("a1")), "{dump}");

    // A second ADD of the same pod (a runtime retry) changes nothing.
    assert_eq!(plugin.call("ADD").code, 0);

    // weft restarts: the rules stay meanwhile, and the new weft serves a1 again from its
    // record without another ADD.
    a.shutdown(Duration::from_millis(200)).await;
    assert!(lab.ruleset("a1").is_some(), "rules outlive weft's restart");
    let a = start_cni_node(&cfg, &cni).await;
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "after-restart"),
        Ok("after-restart".into())
    );
    eventually("inbound log after restart", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 2
    })
    .await;
    assert_eq!(plugin.call("CHECK").code, 0);

    // DEL: rules, routes and listeners go; CHECK now reports the pod as not captured.
    let del = plugin.call("DEL");
    assert_eq!(del.code, 0, "DEL: {} {}", del.stdout, del.stderr);
    assert!(lab.ruleset("a1").is_none(), "rules removed by DEL");
    assert!(
        !lab.ip_rules("a1").contains("fwmark"),
        "{}",
        lab.ip_rules("a1")
    );
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(!dump.contains(&lab.netns_path("a1")), "{dump}");
    let check = plugin.call("CHECK");
    assert_eq!(check.code, 1, "CHECK after DEL");
    assert_eq!(check.stdout["code"], 100, "{}", check.stdout);
    assert!(
        !cni.state_dir.join("4f1c-a1.json").exists(),
        "record removed"
    );
    // DEL is idempotent.
    assert_eq!(plugin.call("DEL").code, 0);
    // Uncaptured again: plain TCP straight to b1 (b1's weft takes it as plaintext inbound).
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "plain"),
        Ok("plain".into())
    );
    assert_eq!(
        logs.inbound_to_from("10.250.2.2:8080", CLIENT),
        2,
        "no HBONE after DEL"
    );

    // Malformed input: CNI errors, never a crash, and weft keeps serving.
    let garbage = plugin.run("ADD", b"{not json");
    assert_eq!(garbage.code, 1);
    assert_eq!(garbage.stdout["code"], 6, "{}", garbage.stdout);
    let mut no_prev = plugin.conf();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let chained = plugin.run("ADD", no_prev.to_string().as_bytes());
    assert_eq!(chained.stdout["code"], 7, "{}", chained.stdout);
    let mut old = plugin.conf();
    old["cniVersion"] = json!("0.1.0");
    assert_eq!(
        plugin.run("ADD", old.to_string().as_bytes()).stdout["code"],
        1
    );
    let status = plugin.call("STATUS");
    assert_eq!(status.code, 0, "{}", status.stdout);
    // A client that sends garbage on weft's socket gets an error; the next ADD works.
    {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(&cni.socket).unwrap();
        s.write_all(b"{\"command\":\"ADD\",\"oops\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("malformed request"), "{reply}");
    }
    assert_eq!(plugin.call("ADD").code, 0);
    assert!(lab.ruleset("a1").is_some());
}
