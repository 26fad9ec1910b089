//! The local config file is watched: good edits apply, bad edits are refused with file:line and
//! the last good state stays in force.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edit_keeps_last_good_config() {
    let logs = logs();
    let subnet = unique_subnet();
    let dir = tempfile::tempdir().unwrap();
    let good = two_workloads(subnet);
    let cfg = write_config(dir.path(), &good);
    let node = start_node("a", &cfg).await;
    let rejected = ["outcome=\"rejected\""];
    let accepted = ["outcome=\"accepted\""];
    assert_eq!(
        metric(
            &scrape(node.metrics_addr).await,
            "weft_config_reloads_total",
            &accepted
        ),
        Some(1.0)
    );

    // Line 8 (the first `protocol:`) gets a typo in its field name.
    let bad = good.replacen("  protocol: HBONE", "  protocl: HBONE", 1);
    replace_file(&cfg, &bad);
    let path = cfg.display().to_string();
    eventually("rejection logged", || {
        logs.lines_with("config rejected")
            .iter()
            .any(|l| l.contains(&format!("{path}:8:")))
    })
    .await;
    assert_eq!(
        metric(
            &scrape(node.metrics_addr).await,
            "weft_config_reloads_total",
            &rejected
        ),
        Some(1.0)
    );
    // The bad file stays for a few watch periods: it is rejected once, not every second.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        logs.lines_with("config rejected").len(),
        1,
        "one rejection per change"
    );
    assert_eq!(
        metric(
            &scrape(node.metrics_addr).await,
            "weft_config_reloads_total",
            &rejected
        ),
        Some(1.0)
    );
    let snap = node.ctx.state.snapshot();
    assert_eq!(snap.workloads.len(), 2, "last good state stays");
    assert!(snap.workload_by_uid("client-uid").is_some());

    // A good edit: the server workload is removed.
    let trimmed: String = good.split("- uid: server-uid").next().unwrap().to_string();
    replace_file(&cfg, trimmed);
    eventually("good edit applied", || {
        node.ctx.state.snapshot().workloads.len() == 1
    })
    .await;
    assert_eq!(
        metric(
            &scrape(node.metrics_addr).await,
            "weft_config_reloads_total",
            &accepted
        ),
        Some(2.0)
    );
    let dump = http_get(node.admin_addr, "/config_dump").await;
    assert!(
        dump.contains("client-uid") && !dump.contains("server-uid"),
        "{dump}"
    );
}
