//! Compiles weft's protocol definitions (proto/) into Rust with a pure-Rust protobuf compiler,
//! so a build needs no `protoc` on the machine; and records the git revision weft is built
//! from (`weft version`, the image's `org.opencontainers.image.revision`).

use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/discovery.proto",
        "proto/ca.proto",
        "proto/zds.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rustc-env=WEFT_GIT_REVISION={}", git_revision());
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// `WEFT_GIT_REVISION` when set (a build from an exported tree: scripts/image-build.sh, the
/// Dockerfile), else the commit `HEAD` names, else "unknown". Re-run when HEAD moves: a commit
/// changes the branch's ref file (or packed-refs), a checkout changes HEAD.
fn git_revision() -> String {
    println!("cargo:rerun-if-env-changed=WEFT_GIT_REVISION");
    if let Ok(rev) = std::env::var("WEFT_GIT_REVISION") {
        if !rev.trim().is_empty() {
            return rev.trim().to_string();
        }
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let Some(rev) = git(&["rev-parse", "--verify", "HEAD"]) else {
        return "unknown".into();
    };
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        // Only files that exist: cargo re-runs a build script on every build for a missing one.
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    rev
}
