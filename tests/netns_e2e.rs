//! End-to-end in real network namespaces (DESIGN.md §8): two nodes, four pods, one weft per
//! node capturing its pods from inside their namespaces, real processes as apps.

mod common;

use std::time::Duration;

use common::lab::Lab;
use common::*;

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_pods_talk_over_hbone_across_and_within_nodes() {
    let logs = logs();
    // a1 has no IPv6 at all (not even ::1); the others are dual-stack capable.
    let mut lab = Lab::up(&["a1"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &lab.config(""));
    let a = start_node("a", &cfg).await;
    let b = start_node("b", &cfg).await;
    assert!(
        lab.ruleset("a1").is_some() && lab.ruleset("b1").is_some(),
        "capture installed"
    );
    assert!(lab.ruleset("b2").is_none(), "b2 is not in the mesh");

    let b1 = lab.serve("b1", 8080);
    let a2 = lab.serve("a2", 8080);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "hello-b1"),
        Ok("hello-b1".into())
    );
    assert_eq!(
        b1.next_peer(),
        "10.250.1.2",
        "server sees the client pod's own IP"
    );
    assert_eq!(
        lab.send("a1", "10.250.1.3", 8080, "same-node"),
        Ok("same-node".into())
    );
    assert_eq!(a2.next_peer(), "10.250.1.2");

    let m = scrape(b.metrics_addr).await;
    let labels = [
        "reporter=\"destination\"",
        "destination_workload=\"b1\"",
        &format!("source_principal=\"{CLIENT}\""),
        "connection_security_policy=\"mutual_tls\"",
    ];
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_closed_total",
        &labels,
        1.0,
    )
    .await;
    assert_eq!(
        metric(&m, "istio_tcp_connections_opened_total", &labels),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &scrape(b.metrics_addr).await,
            "istio_tcp_received_bytes_total",
            &labels
        ),
        Some(8.0)
    );
    assert_eq!(
        metric(
            &scrape(b.metrics_addr).await,
            "istio_tcp_sent_bytes_total",
            &labels
        ),
        Some(8.0)
    );
    let src = [
        "reporter=\"source\"",
        "source_workload=\"a1\"",
        "destination_workload=\"b1\"",
    ];
    assert_eq!(
        metric(
            &scrape(a.metrics_addr).await,
            "istio_tcp_connections_opened_total",
            &src
        ),
        Some(1.0)
    );
    assert!(
        logs.lines_with("direction=\"inbound\"")
            .iter()
            .any(|l| l.contains("dst.addr=10.250.2.2:8080")
                && l.contains(&format!("src.identity=\"{CLIENT}\""))),
        "inbound access log names the client identity"
    );
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(
        dump.contains(&lab.netns_path("a1")) && dump.contains(&lab.netns_path("a2")),
        "{dump}"
    );
    let ready = http_get(a.readiness_addr, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_and_from_pods_outside_the_mesh() {
    let mut lab = Lab::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &lab.config(""));
    let a = start_node("a", &cfg).await;
    let _b = start_node("b", &cfg).await;
    let b2 = lab.serve("b2", 8080);
    let a1 = lab.serve("a1", 8080);
    // captured → uncaptured: plain TCP passthrough from the pod's own address.
    assert_eq!(
        lab.send("a1", "10.250.2.3", 8080, "to-legacy"),
        Ok("to-legacy".into())
    );
    assert_eq!(b2.next_peer(), "10.250.1.2");
    // uncaptured → captured: arrives on 15006, authorised by IP, reaches the app.
    assert_eq!(
        lab.send("b2", "10.250.1.2", 8080, "from-legacy"),
        Ok("from-legacy".into())
    );
    assert_eq!(a1.next_peer(), "10.250.2.3");
    let plain = [
        "reporter=\"destination\"",
        "destination_workload=\"a1\"",
        "source_workload=\"b2\"",
        "connection_security_policy=\"unknown\"",
    ];
    eventually_metric(
        a.metrics_addr,
        "istio_tcp_connections_closed_total",
        &plain,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_calls_to_weft_ports_do_not_loop() {
    let mut lab = Lab::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &lab.config(""));
    let _a = start_node("a", &cfg).await;
    let _b = start_node("b", &cfg).await;
    let _app = lab.serve("a1", 8080);
    for (host, port) in [
        ("10.250.1.2", 15001),
        ("10.250.1.2", 15006),
        ("10.250.1.2", 15008),
        ("127.0.0.1", 15001),
        ("127.0.0.1", 15006),
    ] {
        let started = std::time::Instant::now();
        let r = lab.send("a1", host, port, "loop?");
        // Refused, reset, or (15008) a TLS alert: never proxied anywhere.
        assert!(r != Ok("loop?".to_string()), "{host}:{port} answered {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{host}:{port} hung"
        );
    }
    // The pod reaches itself, and weft still works.
    assert_eq!(lab.send("a1", "10.250.1.2", 8080, "me"), Ok("me".into()));
    let _b1 = lab.serve("b1", 8080);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "still"),
        Ok("still".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenroll_releases_reenroll_is_idempotent_and_restart_takes_over() {
    let mut lab = Lab::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &lab.config(""));
    let a = start_node("a", &cfg).await;
    let _b = start_node("b", &cfg).await;
    let b1 = lab.serve("b1", 8080);
    let rules = lab.ruleset("a1").expect("captured");
    assert_eq!(lab.ip_rules("a1").matches("fwmark 0x111/0xfff").count(), 1);

    // Un-enroll a1: rules and routes go, its traffic still flows (uncaptured).
    let released = lab
        .config("")
        .replace(&format!("  netns: {}\n", lab.netns_path("a1")), "");
    replace_file(&cfg, released);
    eventually("a1 released", || lab.ruleset("a1").is_none()).await;
    assert_eq!(lab.ip_rules("a1").matches("fwmark").count(), 0);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "uncaptured"),
        Ok("uncaptured".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");

    // Re-enroll: the same rules, once.
    replace_file(&cfg, lab.config(""));
    eventually("a1 captured again", || lab.ruleset("a1").is_some()).await;
    assert_eq!(lab.ruleset("a1").unwrap(), rules);

    // A second weft for node a takes over (SO_REUSEPORT), installing the same rules once more.
    let a_new = start_node("a", &cfg).await;
    assert_eq!(lab.ruleset("a1").unwrap(), rules);
    assert_eq!(lab.ip_rules("a1").matches("fwmark 0x111/0xfff").count(), 1);
    a.shutdown(Duration::from_secs(1)).await;
    assert!(
        lab.ruleset("a1").is_some(),
        "shutdown leaves capture for the new weft"
    );
    for i in 0..5 {
        let msg = format!("after-restart-{i}");
        assert_eq!(lab.send("a1", "10.250.2.2", 8080, &msg), Ok(msg.clone()));
    }
    let m = scrape(a_new.metrics_addr).await;
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", "source_workload=\"a1\""]
        ),
        Some(5.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_denies_and_revokes_live_connections() {
    let mut lab = Lab::up(&[]);
    let deny_other = r#"policies:
- name: deny-other
  namespace: shop
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [{Exact: cluster.local/ns/shop/sa/other}]
"#;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &lab.config(deny_other));
    let _a = start_node("a", &cfg).await;
    let b = start_node("b", &cfg).await;
    let _b1 = lab.serve("b1", 8080);
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "allowed"),
        Ok("allowed".into())
    );
    let denied = lab.send("a2", "10.250.2.2", 8080, "denied");
    assert!(denied.is_err(), "{denied:?}");
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_failed_total",
        &[
            "reporter=\"destination\"",
            "response_flags=\"DENY\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/other\"",
        ],
        1.0,
    )
    .await;

    // A live connection from a1, then a policy that denies a1 too: it is closed.
    let held = lab.send_in_background("a1", "10.250.2.2", 8080, "held", 6.0);
    // The held connection must be open at b before the policy changes, or the test would not
    // be revoking a live connection: wait for it, and fail if it never arrives.
    eventually_metric(
        b.metrics_addr,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            &format!("source_principal=\"{CLIENT}\""),
        ],
        2.0,
    )
    .await;
    let deny_all = deny_other.replace(
        "[{Exact: cluster.local/ns/shop/sa/other}]",
        "[{Prefix: cluster.local/ns/shop/}]",
    );
    replace_file(&cfg, lab.config(&deny_all));
    let started = std::time::Instant::now();
    let r = held.join();
    let r = r.expect_err("the revoked connection must not complete normally");
    assert!(r.starts_with("error"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "closed by the policy change, not by the client"
    );
    assert_eq!(
        metric(
            &scrape(b.metrics_addr).await,
            "weft_connections_closed_by_policy_total",
            &[]
        ),
        Some(1.0)
    );
}
