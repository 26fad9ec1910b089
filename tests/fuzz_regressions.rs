//! Replays, in the normal test suite (stable, no libFuzzer), every input the fuzzers found a
//! bug with (`fuzz/regressions/<target>/`) and every seed they start from (`fuzz/seeds/<target>/`)
//! through the very target bodies the fuzzers run: fuzz/src/lib.rs is compiled in here. A
//! regression that comes back fails here long before anyone runs scripts/fuzz.sh again.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        // make_seeds.py sits beside the seed folders, not in them; READMEs may sit in them.
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    files.sort();
    files
}

/// Runs every saved input of `target`; fails naming each input that panicked.
fn replay(target: &str) {
    let (_, run) = targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["regressions", "seeds"] {
        for file in inputs(&root.join(kind).join(target)) {
            let data = std::fs::read(&file).expect("readable input");
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(count > 0, "no seeds for {target}");
    assert!(failed.is_empty(), "{target} panicked on {failed:#?}");
}

#[test]
fn every_target_is_replayed_here() {
    // The list below and the fuzz crate's must not drift apart.
    let here = [
        "local_config",
        "k8s_policy_yaml",
        "k8s_policy_json",
        "k8s_translate",
        "connect_validate",
        "xds_address",
        "xds_authorization",
        "zds_request",
        "cni_plugin",
        "cni_wire",
        "dns_query",
    ];
    let there: Vec<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(here.as_slice(), there.as_slice());
}

#[test]
fn local_config() {
    replay("local_config");
}

#[test]
fn k8s_policy_yaml() {
    replay("k8s_policy_yaml");
}

#[test]
fn k8s_policy_json() {
    replay("k8s_policy_json");
}

#[test]
fn k8s_translate() {
    replay("k8s_translate");
}

#[test]
fn connect_validate() {
    replay("connect_validate");
}

#[test]
fn xds_address() {
    replay("xds_address");
}

#[test]
fn xds_authorization() {
    replay("xds_authorization");
}

#[test]
fn zds_request() {
    replay("zds_request");
}

#[test]
fn cni_plugin() {
    replay("cni_plugin");
}

#[test]
fn cni_wire() {
    replay("cni_wire");
}

#[test]
fn dns_query() {
    replay("dns_query");
}
