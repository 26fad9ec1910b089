#!/usr/bin/env bash
# The weft demo: two nodes and four pods as network namespaces, one weft per node capturing its
# pods from inside their namespaces, HBONE between nodes, one policy allowing and one denying.
# Run as root. Cleans up on exit, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }
need=()
for cmd in ip:iproute2 nft:nftables python3:python3; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building weft (release)"
cargo build --release --quiet
weft=$repo/target/release/weft

lab="demo$$"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    bash "$repo/scripts/lab.sh" down "$lab"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "lab: nodes $lab-na, $lab-nb; pods a1 a2 (node-a), b1 b2 (node-b)"
bash scripts/lab.sh up "$lab" --v4-only a1

"$weft" ca init --dir "$work/ca" >/dev/null
cat > "$work/weft.yaml" <<YAML
workloads:
- {uid: a1, name: a1, namespace: shop, serviceAccount: frontend, workloadIps: ["10.250.1.2"], protocol: HBONE, node: node-a, netns: /run/netns/$lab-a1}
- {uid: a2, name: a2, namespace: shop, serviceAccount: intruder, workloadIps: ["10.250.1.3"], protocol: HBONE, node: node-a, netns: /run/netns/$lab-a2}
- {uid: b1, name: b1, namespace: shop, serviceAccount: backend, workloadIps: ["10.250.2.2"], protocol: HBONE, node: node-b, netns: /run/netns/$lab-b1}
- {uid: b2, name: b2, namespace: legacy, workloadIps: ["10.250.2.3"], protocol: TCP, node: node-b}
---
# Policies may follow in Kubernetes form, as further YAML documents.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
YAML
echo "config: 3 captured pods, 1 pod outside the mesh, policy: only shop/frontend may reach namespace shop"

start_weft() { # node admin metrics readiness
    RUST_LOG=info "$weft" run --config "$work/weft.yaml" --ca-dir "$work/ca" --node-name "$1" \
        --admin-port "$2" --metrics-port "$3" --readiness-port "$4" --node-bind 127.0.0.1 \
        --drain-seconds 1 2>"$work/$1.log" &
    pids+=($!)
}
start_weft node-a 15000 15020 15021
start_weft node-b 15100 15120 15121

get() { python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"; }
for port in 15021 15121; do
    for _ in $(seq 50); do get "http://127.0.0.1:$port/healthz/ready" >/dev/null 2>&1 && break; sleep 0.2; done
    get "http://127.0.0.1:$port/healthz/ready" >/dev/null || { echo "weft did not become ready"; cat "$work"/*.log; exit 1; }
done
echo "both wefts ready"

say "capture rules weft installed inside pod a1 (nft list table inet weft)"
ip netns exec "$lab-a1" nft list table inet weft | sed -n '1,12p'; echo "    ..."

app() { ip netns exec "$lab-$1" python3 -u "$repo/tests/fixtures/tcp_tool.py" "${@:2}"; }
# A server in the background: exec, so the PID recorded is the server's own (ip netns exec
# execs python) and cleanup's kill reaches it, not a subshell that would leave it running.
serve() { exec ip netns exec "$lab-$1" python3 -u "$repo/tests/fixtures/tcp_tool.py" serve "$2"; }
serve b1 8080 >"$work/b1.app" & pids+=($!)
serve b2 8080 >"$work/b2.app" & pids+=($!)
sleep 0.5

say "a1 (shop/frontend) -> b1:8080 on the other node: HBONE, mTLS, allowed"
app a1 send 10.250.2.2 8080 "hello from a1" || true
say "a2 (shop/intruder) -> b1:8080: denied by policy (HTTP/2 401 inside the tunnel; the app connection is closed)"
app a2 send 10.250.2.2 8080 "hello from a2" || true
say "a1 -> b2 (outside the mesh): plain TCP passthrough"
app a1 send 10.250.2.3 8080 "hello legacy" || true
say "what b1's app saw (source addresses are the real pod IPs)"
cat "$work/b1.app"

sleep 0.5
say "metrics on node-b (:15120/metrics), destination side"
get http://127.0.0.1:15120/metrics | grep -E '^istio_tcp_connections_(opened|failed)_total' \
    | sed -E 's/(source_workload="[^"]*").*(source_principal="[^"]*").*(destination_workload="[^"]*").*(response_flags="[^"]*").*(connection_security_policy="[^"]*")\} /\1, \2, \3, \4, \5} /'
say "access log on node-b"
grep ' access:' "$work/node-b.log" | sed -E 's/^[^ ]+ +//' || true
say "done; cleaning up"
