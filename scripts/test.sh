#!/usr/bin/env bash
# Runs every test of weft: formatting, lints, unit tests, in-process HBONE tests and the
# network-namespace end-to-end tests. Needs root (network namespaces, nftables, SO_MARK).
# Installs what it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run as root (the tests create network namespaces and nftables rules)" >&2
    exit 1
fi

need=()
for cmd in ip:iproute2 nft:nftables iptables:iptables iperf3:iperf3 ps:procps python3:python3; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh: cargo (Rust toolchain) is required" >&2; exit 1; }

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# A fresh clone builds everything once: incremental compilation would only add gigabytes of
# artifacts nobody reuses. Say early when the disk cannot hold a build (a full disk shows up
# much later as API server timeouts and failed image builds).
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi
free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if [ "$free_gib" -lt 12 ]; then
    echo "scripts/test.sh: only ${free_gib} GiB free here; the suite needs about 12 (a build, the image, test clusters)" >&2
    exit 1
fi

echo "== Kubernetes API server for the Kubernetes tests (built once, then cached)"
bash scripts/k8s-testenv.sh install >/dev/null
echo "== container image tests: podman, the Debian root filesystem, helm (built once, then cached)"
bash scripts/image-smoke.sh --prepare

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --test-threads="${WEFT_TEST_THREADS:-4}"
echo "== daemonset/ manifests against a real API server"
bash scripts/validate-manifests.sh
