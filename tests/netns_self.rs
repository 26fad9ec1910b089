//! A workload that shares weft's own network namespace (`netns: self`), reached by a remote
//! client over HBONE: weft must not connect to the app from the client's address there, since
//! nothing routes the app's replies back to weft; the connection has to work, with weft's own
//! address as the app's peer.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::weft_process::Weft;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_client_reaches_a_workload_in_weft_s_own_namespace() {
    let lab = Lab::up(&[]);
    // The workload "gw" is node b's namespace itself (its bridge address), served by a weft
    // running in that namespace; a1 is a captured pod on node a.
    let extra = "- uid: gw\n  name: gw\n  namespace: shop\n  serviceAccount: gateway\n  workloadIps: [\"10.250.2.1\"]\n  protocol: HBONE\n  node: b\n  netns: self\n";
    let config = lab
        .config("")
        .replacen("workloads:\n", &format!("workloads:\n{extra}"), 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config);
    let node_b = lab.ns("nb");
    let _b = Weft::start("b", &cfg, Some(&node_b), Duration::from_secs(1));
    let _a = start_node("a", &cfg).await;

    // The app: an echo server in node b's namespace that reports its peers.
    let mut app = Command::new("ip")
        .args(["netns", "exec", &node_b, "python3", "-u"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tcp_tool.py"
        ))
        .args(["serve", "8080"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the app");
    let out = app.stdout.take().expect("stdout");
    let (tx, peers) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(
        peers.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("ready")
    );
    let hbone_listening = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &node_b, "ss", "-ltnH"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).contains("10.250.2.1:15008")
    };
    let until = Instant::now() + Duration::from_secs(20);
    while !hbone_listening() {
        assert!(
            Instant::now() < until,
            "weft in node b never listened on 10.250.2.1:15008"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let reply = lab.send("a1", "10.250.2.1", 8080, "to-the-node");
    let _ = app.kill();
    let _ = app.wait();
    assert_eq!(reply, Ok("to-the-node".into()));
    assert_eq!(
        peers.recv_timeout(Duration::from_secs(5)).as_deref(),
        Ok("peer 10.250.2.1"),
        "the app sees weft's own address: the client's would have had its replies routed away"
    );
}
