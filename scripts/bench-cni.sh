#!/usr/bin/env bash
# weft-cni's cost at pod start: ADD and DEL round trips through the plugin binary against a
# running weft (release build), in a lab pod namespace (scripts/lab.sh), N rounds; plus the
# plugin's process start alone (VERSION). Prints min / p50 / max in microseconds.
# Usage: scripts/bench-cni.sh [ROUNDS]   (root; builds nothing: run cargo build --release first)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
rounds=${1:-30}
weft=$repo/target/release/weft
plugin=$repo/target/release/weft-cni
[ -x "$weft" ] && [ -x "$plugin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
lab=wcb$$
weft_pid=
cleanup() {
    [ -n "$weft_pid" ] && kill "$weft_pid" 2>/dev/null || true
    bash "$repo/scripts/lab.sh" down "$lab"
    rm -rf "$work"
}
trap cleanup EXIT
bash "$repo/scripts/lab.sh" up "$lab" >/dev/null
"$weft" ca init --dir "$work/ca" >/dev/null
cat >"$work/weft.yaml" <<YAML
workloads:
- uid: a1
  name: a1
  namespace: shop
  serviceAccount: client
  workloadIps: ["10.250.1.2"]
  protocol: HBONE
  node: a
YAML
"$weft" run --config "$work/weft.yaml" --ca-dir "$work/ca" --node-name a \
    --cni-socket "$work/run/cni.sock" --cni-state-dir "$work/run/pods" \
    --admin-port 0 --metrics-port 0 --readiness-port 0 --node-bind 127.0.0.1 >"$work/weft.log" 2>&1 &
weft_pid=$!
for _ in $(seq 100); do [ -S "$work/run/cni.sock" ] && break; sleep 0.1; done
[ -S "$work/run/cni.sock" ] || { cat "$work/weft.log" >&2; exit 1; }
conf=$(printf '{"cniVersion":"1.0.0","name":"lab","type":"weft-cni","socket":"%s","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.250.1.2/24"}]}}' "$work/run/cni.sock")
call() {
    env -i CNI_COMMAND="$1" CNI_CONTAINERID=c1 CNI_NETNS="/run/netns/$lab-a1" CNI_IFNAME=eth0 \
        CNI_PATH=/opt/cni/bin CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a1;K8S_POD_UID=u1" \
        "$plugin" <<<"$conf" >/dev/null
}
now_us() { echo $(( $(date +%s%N) / 1000 )); }
summary() { sort -n | awk '{a[NR]=$1} END {printf "min %d p50 %d max %d us (%d rounds)\n", a[1], a[int(NR/2)+1], a[NR], NR}'; }
adds=(); dels=()
for _ in $(seq "$rounds"); do
    t0=$(now_us); call ADD; t1=$(now_us); call DEL; t2=$(now_us)
    adds+=($((t1 - t0))); dels+=($((t2 - t1)))
done
echo "ADD: $(printf '%s\n' "${adds[@]}" | summary)"
echo "DEL: $(printf '%s\n' "${dels[@]}" | summary)"
starts=()
for _ in $(seq "$rounds"); do
    t0=$(now_us); env -i CNI_COMMAND=VERSION "$plugin" <<<'{}' >/dev/null; starts+=($(( $(now_us) - t0 )))
done
echo "plugin start (VERSION): $(printf '%s\n' "${starts[@]}" | summary)"
