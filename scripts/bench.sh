#!/usr/bin/env bash
# The realistic benchmark (BENCHMARKS.md): the network-namespace lab of scripts/lab.sh, a client
# in pod a1 on node A, a server in pod b1 on node B, and one tunnel process per node.
#
# Modes, each run in a freshly built lab:
#   direct    no tunnel, pods not captured: the floor.
#   <kind>    a1 and b1 captured by one tunnel process per node (weft: HBONE between nodes).
# Figures per mode: iperf3 throughput (1 stream and -P 4, both directions), new connections per
# second and 1 KiB round-trip latency (weft-bench), and for the tunnel: CPU seconds per GB and
# per 1000 connections for each tunnel process, system calls and context switches per MiB and
# per connection (perf stat, where perf can count the process's tracepoints), RSS idle, under
# load, and with N idle tunnelled connections. Every figure is repeated --runs times and reported as median and
# min-max; results.csv, results.json, raw.csv and bench.png go to --results.
#
# Another tunnel implementation built for the same topology (one process per node, capturing
# the pods of its node) is slotted in with --tunnel-kind NAME --tunnel-bin PATH
# --tunnel-functions FILE, where FILE defines, like the weft ones below:
#   tunnel_NAME_setup WORKDIR            once: certificates, anything shared
#   tunnel_NAME_config WORKDIR LAB       per lab: configuration for pods LAB-a1 (node A), LAB-b1
#   tunnel_NAME_start NODE NODE_NETNS LOG start one node's process in the background; set
#                                        tunnel_pid to its PID (for CPU and RSS; empty if none)
#   tunnel_NAME_ready NODE NODE_NETNS    succeed once that node is serving its pods
#   tunnel_NAME_stop PID                 stop it (the script kills it by PID if still alive)
# Variables they may use: TUNNEL_BIN, repo, work (scratch dir), lab (netns prefix).
#
# Runs as root; installs iperf3, gnuplot-nox, iproute2, nftables and python3 when missing.
# Refuses to start on a busy machine (1-minute load above --max-load) unless --force.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() {
    cat <<EOF
usage: scripts/bench.sh [options]
  --runs N               repetitions of every figure (default 3)
  --results DIR          where results go (default target/bench)
  --time S               seconds per iperf3 test (default 5)
  --connrate-time S      seconds of the connection-rate test (default 5)
  --latency-count N      round trips measured for latency (default 5000)
  --idle-conns N         idle tunnelled connections for the memory figure (default 10000, 0: skip)
  --modes LIST           comma-separated subset of: direct,tunnel (default direct,tunnel)
  --tunnel-kind KIND     weft (default) or the name of another kind (see the file header)
  --tunnel-bin PATH      the tunnel binary (default target/release/weft, built here)
  --tunnel-functions F   a file defining tunnel_KIND_* functions for another kind
  --max-load X           refuse to run above this 1-minute load average (default 0.5)
  --force                run even when the machine is busy
  --no-build             do not run cargo build --release
  --profile DIR          after the first run's figures, profile each tunnel process with
                         perf record -g under one more single-stream test and connection test;
                         perf.data files and text summaries go to DIR
EOF
}

runs=3
results=target/bench
iperf_time=5
connrate_time=5
latency_count=5000
idle_conns=10000
modes=direct,tunnel
kind=weft
TUNNEL_BIN=
functions_file=
max_load=0.5
force=0
build=1
profile_dir=
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --results) results=$2; shift 2 ;;
        --time) iperf_time=$2; shift 2 ;;
        --connrate-time) connrate_time=$2; shift 2 ;;
        --latency-count) latency_count=$2; shift 2 ;;
        --idle-conns) idle_conns=$2; shift 2 ;;
        --modes) modes=$2; shift 2 ;;
        --tunnel-kind) kind=$2; shift 2 ;;
        --tunnel-bin) TUNNEL_BIN=$2; shift 2 ;;
        --tunnel-functions) functions_file=$2; shift 2 ;;
        --max-load) max_load=$2; shift 2 ;;
        --force) force=1; shift ;;
        --no-build) build=0; shift ;;
        --profile) profile_dir=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
for n in "$runs" "$iperf_time" "$connrate_time" "$latency_count" "$idle_conns"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "bench.sh: $n is not a whole number" >&2; exit 2; }
done
if [ "$runs" -lt 1 ] || [ "$iperf_time" -lt 1 ] || [ "$iperf_time" -gt 120 ]; then
    echo "bench.sh: --runs must be >= 1 and --time within 1..120" >&2
    exit 2
fi

die() { echo "bench.sh: $*" >&2; exit 1; }
if [ -n "$profile_dir" ] && ! command -v perf >/dev/null 2>&1; then
    die "--profile needs perf (apt-get install linux-perf)"
fi
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces and nftables rules)"

# --- the machine -------------------------------------------------------------------------------

need=()
for cmd in ip:iproute2 nft:nftables iperf3:iperf3 gnuplot:gnuplot-nox python3:python3; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

load1() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load1)
if awk -v l="$load_start" -v m="$max_load" 'BEGIN { exit !(l > m) }'; then
    if [ "$force" -eq 0 ]; then
        echo "bench.sh: the machine is busy: 1-minute load average $load_start > $max_load." >&2
        echo "Figures taken now would measure the other work too. Busiest processes:" >&2
        ps -eo pcpu,pid,comm --sort=-pcpu | head -6 >&2
        echo "Wait for it to calm down, or pass --force (and say so next to the figures)." >&2
        exit 3
    fi
    echo "bench.sh: load average $load_start > $max_load, running anyway (--force)"
fi

# Every idle connection costs a descriptor in the client, both tunnel processes and the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$idle_conns" -gt 0 ] && [ "$(ulimit -n)" -lt $((idle_conns + 1000)) ]; then
    die "--idle-conns $idle_conns needs ulimit -n >= $((idle_conns + 1000)); the hard limit here is $(ulimit -Hn)"
fi

if [ "$build" -eq 1 ]; then
    say "building (cargo build --release)"
    cargo build --release --quiet --bin weft --bin weft-bench
fi
bench_bin=$repo/target/release/weft-bench
[ -x "$bench_bin" ] || die "$bench_bin is missing (cargo build --release --bin weft-bench)"
if [ -z "$TUNNEL_BIN" ] && [ "$kind" = weft ]; then
    TUNNEL_BIN=$repo/target/release/weft
fi
[ -n "$TUNNEL_BIN" ] || die "--tunnel-kind $kind needs --tunnel-bin"
[ -x "$TUNNEL_BIN" ] || die "tunnel binary $TUNNEL_BIN is not executable"

# --- the weft kind -----------------------------------------------------------------------------

tunnel_weft_setup() { # workdir
    "$TUNNEL_BIN" ca init --dir "$1/ca" >/dev/null
}

tunnel_weft_config() { # workdir lab
    cat > "$1/weft.yaml" <<YAML
workloads:
- {uid: a1, name: client, namespace: bench, serviceAccount: client, workloadIps: ["10.250.1.2"], protocol: HBONE, node: node-a, netns: /run/netns/$2-a1}
- {uid: b1, name: server, namespace: bench, serviceAccount: server, workloadIps: ["10.250.2.2"], protocol: HBONE, node: node-b, netns: /run/netns/$2-b1}
YAML
}

tunnel_weft_start() { # node node-netns logfile
    # The node's weft runs in the node's network namespace, so its admin ports never meet the
    # host's; it opens its listeners inside the pods' namespaces itself.
    RUST_LOG=${RUST_LOG:-info} ip netns exec "$2" "$TUNNEL_BIN" run --config "$work/weft.yaml" \
        --ca-dir "$work/ca" --node-name "$1" --node-bind 127.0.0.1 --drain-seconds 1 2>"$3" &
    tunnel_pid=$!
}

tunnel_weft_ready() { # node node-netns
    ip netns exec "$2" python3 -c 'import urllib.request
urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=2).read()' >/dev/null 2>&1
}

tunnel_weft_stop() { # pid
    kill -TERM "$1" 2>/dev/null || true
}

if [ -n "$functions_file" ]; then
    # shellcheck source=/dev/null
    . "$functions_file"
fi
for f in setup config start ready stop; do
    declare -F "tunnel_${kind}_$f" >/dev/null \
        || die "tunnel kind '$kind' has no function tunnel_${kind}_$f (see the header of $0 and --tunnel-functions)"
done

# --- lab and processes -------------------------------------------------------------------------

lab="wb$$"
work=$(mktemp -d)
pids=()
# A process that exists and has not exited yet (an exited child stays a zombie until waited).
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ]
}
stop_pid() { # pid: TERM, wait up to 5 s, then KILL
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || return 0
    for i in $(seq 50); do alive "$p" || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
# Drops a PID that has been waited for: it may belong to someone else from now on.
forget() {
    local p keep=()
    for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    pids=("${keep[@]}")
}
stop_all() {
    local p
    for p in "${pids[@]}"; do stop_pid "$p"; done
    pids=()
}
cleanup() {
    stop_all
    bash "$repo/scripts/lab.sh" down "$lab" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command in a pod. For background jobs call `ip netns exec` directly instead: a
# backgrounded function is a subshell, and its PID is not the command's.
pod() { ip netns exec "$lab-$1" "${@:2}"; }

# Waits (bounded) until COMMAND... succeeds: wait_for SECONDS WHAT COMMAND...
wait_for() {
    local secs=$1 what=$2 i
    shift 2
    for i in $(seq $((secs * 10))); do
        "$@" && return 0
        sleep 0.1
    done
    echo "bench.sh: timed out after ${secs}s waiting for $what" >&2
    return 1
}

lab_up() {
    bash "$repo/scripts/lab.sh" up "$lab" >/dev/null
    # Room for many client ports in the pods (the same for every mode).
    for p in a1 b1; do
        pod "$p" sysctl -qw net.ipv4.ip_local_port_range="1024 65000"
    done
}

start_servers() {
    ip netns exec "$lab-b1" iperf3 -s -p 5201 >"$work/iperf3-server.log" 2>&1 &
    pids+=($!)
    ip netns exec "$lab-b1" "$bench_bin" serve --listen 0.0.0.0:7000 --duration 3600 --max-conns 30000 \
        >"$work/serve.out" 2>"$work/serve.err" &
    pids+=($!)
    wait_for 10 "the weft-bench server" grep -qs '^ready' "$work/serve.out"
    wait_for 10 "the iperf3 server" sh -c "ip netns exec $lab-b1 ss -Hltn 'sport = :5201' | grep -q LISTEN"
}

declare -A tpid=()
start_tunnel() {
    local node
    tpid=()
    for node in a b; do
        tunnel_pid=
        "tunnel_${kind}_start" "node-$node" "$lab-n$node" "$work/tunnel-$node.log"
        if [ -n "$tunnel_pid" ]; then pids+=("$tunnel_pid"); fi
        tpid[$node]=$tunnel_pid
    done
    for node in a b; do
        wait_for 30 "the $kind tunnel of node-$node" "tunnel_${kind}_ready" "node-$node" "$lab-n$node" || {
            tail -20 "$work/tunnel-$node.log" >&2
            return 1
        }
    done
}

stop_tunnel() {
    local node
    for node in a b; do
        if [ -n "${tpid[$node]:-}" ]; then "tunnel_${kind}_stop" "${tpid[$node]}"; fi
    done
}

restart_tunnel() {
    local node p
    stop_tunnel
    for node in a b; do
        p=${tpid[$node]:-}
        if [ -n "$p" ]; then
            stop_pid "$p"
            forget "$p"
        fi
    done
    start_tunnel
}

# --- measuring ---------------------------------------------------------------------------------

raw=$work/raw.csv
echo "run,mode,metric,value,unit" > "$raw"
record() { # run mode metric value unit
    echo "$1,$2,$3,$4,$5" >> "$raw"
    printf '  %-34s %12s %s\n' "$3" "$4" "$5"
}

clk=$(getconf CLK_TCK)
# utime + stime, in clock ticks (the fields after the command name, which may hold spaces).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# VmRSS counts the mapped pages of the binary too (shared between the two processes, and with
# large page-cache folios much of the text); RssAnon is the process's own memory.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
anon_kib() { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.2f", k / 1024 }'; }

# System calls and context switches of a tunnel process, counted by perf stat between
# count_start and count_stop (SIGINT makes perf print what it counted). Skipped where perf is
# missing or cannot count the process (no tracefs, perf_event_paranoid).
can_count=0
if command -v perf >/dev/null 2>&1 \
    && perf stat -e raw_syscalls:sys_enter,context-switches -x, -- true >/dev/null 2>&1; then
    can_count=1
fi
declare -A counter_pid=()
count_start() { # node
    local p=${tpid[$1]:-}
    [ "$can_count" -eq 1 ] && [ -n "$p" ] || return 0
    perf stat -e raw_syscalls:sys_enter,context-switches -x, -p "$p" -o "$work/count-$1.csv" &
    counter_pid[$1]=$!
    pids+=("${counter_pid[$1]}")
}
# Sets `counted` to "SYSCALLS SWITCHES" counted since count_start (empty if nothing was).
# Runs in this shell, not a subshell: only the shell that started perf can wait for it.
counted=
count_stop() { # node
    local c=${counter_pid[$1]:-}
    counted=
    [ -n "$c" ] || return 0
    kill -INT "$c" 2>/dev/null || true
    wait "$c" 2>/dev/null || true
    forget "$c"
    counter_pid[$1]=
    counted=$(awk -F, '$3 == "raw_syscalls:sys_enter" { s = $1 } $3 == "context-switches" { c = $1 }
        END { if (s != "" && c != "") print s, c }' "$work/count-$1.csv")
}
# Records the counts of count_stop per unit of work: per_what is "mib" or "conn".
record_counts() { # run mode name node per_what amount
    local sc cs
    count_stop "$4"
    [ -n "$counted" ] || return 0
    read -r sc cs <<<"$counted"
    record "$1" "$2" "syscalls_per_$5_$3_node-$4" "$(awk -v n="$sc" -v a="$6" 'BEGIN { printf "%.2f", n / a }')" "count/$5"
    record "$1" "$2" "switches_per_$5_$3_node-$4" "$(awk -v n="$cs" -v a="$6" 'BEGIN { printf "%.2f", n / a }')" "count/$5"
}

# Prints the values of KEYs from the one JSON object in FILE.
jget() { # file key...
    python3 - "$@" <<'PY'
import json, sys
path, keys = sys.argv[1], sys.argv[2:]
text = open(path).read()
d = json.loads(text[text.index("{"):]) if "{" in text else {}
def get(d, k):
    for part in k.split("."):
        d = d[part]
    return d
print(" ".join(str(get(d, k)) for k in keys))
PY
}

declare -A rss_load=() anon_load=()

# One iperf3 test: NAME then iperf3 options.
iperf_test() { # run mode name opts...
    local run=$1 mode=$2 name=$3 node p r bps bytes after out="$work/iperf-$3.json"
    local -A before=()
    shift 3
    for node in a b; do
        p=${tpid[$node]:-}
        if [ -n "$p" ]; then before[$node]=$(cpu_ticks "$p"); fi
    done
    for node in a b; do count_start "$node"; done
    ip netns exec "$lab-a1" timeout $((iperf_time + 20)) iperf3 -c 10.250.2.2 -p 5201 -t "$iperf_time" -J "$@" >"$out" &
    p=$!
    # Sample the tunnels' RSS while the test runs.
    local until=$((SECONDS + iperf_time + 25))
    while alive "$p" && [ "$SECONDS" -lt "$until" ]; do
        for node in a b; do
            [ -n "${tpid[$node]:-}" ] || continue
            r=$(rss_kib "${tpid[$node]}")
            if [ "$r" -gt "${rss_load[$node]:-0}" ]; then rss_load[$node]=$r; fi
            r=$(anon_kib "${tpid[$node]}")
            if [ "$r" -gt "${anon_load[$node]:-0}" ]; then anon_load[$node]=$r; fi
        done
        sleep 0.5
    done
    wait "$p" || { echo "bench.sh: iperf3 $name failed:" >&2; tail -5 "$out" >&2; return 1; }
    read -r bps bytes < <(jget "$out" end.sum_received.bits_per_second end.sum_received.bytes) || true
    [ -n "${bytes:-}" ] || { echo "bench.sh: no result in iperf3's output for $name" >&2; return 1; }
    record "$run" "$mode" "throughput_$name" "$(awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }')" Gbit/s
    for node in a b; do
        p=${tpid[$node]:-}
        if [ -n "$p" ]; then
            after=$(cpu_ticks "$p")
            record "$run" "$mode" "cpu_per_gb_${name}_node-$node" \
                "$(awk -v t=$((after - before[$node])) -v c="$clk" -v by="$bytes" 'BEGIN { printf "%.3f", (t / c) / (by / 1e9) }')" s/GB
            record_counts "$run" "$mode" "$name" "$node" mib "$(awk -v by="$bytes" 'BEGIN { print by / 1048576 }')"
        fi
    done
}

# The tunnel processes idle, then holding --idle-conns idle tunnelled connections. Runs on fresh
# processes: memory freed by earlier tests would hide the cost.
measure_idle() { # run mode
    local run=$1 mode=$2 node n held rc=0 hp
    local -A base=()
    sleep 1
    for node in a b; do
        if [ -n "${tpid[$node]:-}" ]; then
            record "$run" "$mode" "rss_idle_node-$node" "$(mib "$(rss_kib "${tpid[$node]}")")" MiB
            record "$run" "$mode" "anon_idle_node-$node" "$(mib "$(anon_kib "${tpid[$node]}")")" MiB
            base[$node]=$(anon_kib "${tpid[$node]}")
        fi
    done
    [ "$idle_conns" -gt 0 ] || return 0
    ip netns exec "$lab-a1" timeout 150 "$bench_bin" hold --target 10.250.2.2:7000 --count "$idle_conns" \
        --hold 4 --concurrency 64 --timeout 60 >"$work/hold.json" 2>"$work/hold.err" &
    hp=$!
    pids+=("$hp")
    wait_for 75 "$idle_conns idle connections" grep -qs '"held"' "$work/hold.json" \
        || { cat "$work/hold.err" >&2; return 1; }
    sleep 2
    read -r held < <(jget "$work/hold.json" held)
    record "$run" "$mode" idle_conns_held "$held" count
    for node in a b; do
        [ -n "${tpid[$node]:-}" ] || continue
        record "$run" "$mode" "rss_idle_conns_node-$node" "$(mib "$(rss_kib "${tpid[$node]}")")" MiB
        n=$(anon_kib "${tpid[$node]}")
        record "$run" "$mode" "anon_idle_conns_node-$node" "$(mib "$n")" MiB
        record "$run" "$mode" "kib_per_idle_conn_node-$node" \
            "$(awk -v d=$((n - base[$node])) -v h="$held" 'BEGIN { printf "%.2f", (h > 0 ? d / h : 0) }')" KiB
    done
    # weft-bench closes them after --hold; timeout bounds it in any case.
    wait "$hp" || rc=$?
    forget "$hp"
    [ "$rc" -eq 0 ] || { cat "$work/hold.err" >&2; return 1; }
    # Allocators give freed memory back lazily (weft trims every 5 s and closes spare pooled connections after 5 s unused): measure what stays after that.
    sleep 12
    for node in a b; do
        if [ -n "${tpid[$node]:-}" ]; then
            record "$run" "$mode" "anon_after_close_node-$node" "$(mib "$(anon_kib "${tpid[$node]}")")" MiB
        fi
    done
}

# Throughput, connection rate and latency; CPU and RSS of the tunnel processes meanwhile.
measure() { # run mode
    local run=$1 mode=$2 node after n rate errors cp50 cp99 p50 p99
    local -A before=()
    rss_load=()
    anon_load=()
    iperf_test "$run" "$mode" 1x -P 1
    iperf_test "$run" "$mode" 4x -P 4
    iperf_test "$run" "$mode" 1x_reverse -P 1 -R
    iperf_test "$run" "$mode" 4x_reverse -P 4 -R
    for node in a b; do
        if [ -n "${rss_load[$node]:-}" ]; then
            record "$run" "$mode" "rss_load_node-$node" "$(mib "${rss_load[$node]}")" MiB
            record "$run" "$mode" "anon_load_node-$node" "$(mib "${anon_load[$node]}")" MiB
        fi
    done

    for node in a b; do
        if [ -n "${tpid[$node]:-}" ]; then before[$node]=$(cpu_ticks "${tpid[$node]}"); fi
        count_start "$node"
    done
    pod a1 timeout $((connrate_time + 30)) "$bench_bin" connrate --target 10.250.2.2:7000 \
        --duration "$connrate_time" --concurrency 8 >"$work/connrate.json" 2>"$work/connrate.err" \
        || { cat "$work/connrate.err" >&2; return 1; }
    read -r rate errors cp50 cp99 n < <(jget "$work/connrate.json" per_second errors p50_us p99_us connections)
    record "$run" "$mode" connections_per_s "$rate" conn/s
    record "$run" "$mode" connection_p50 "$cp50" us
    record "$run" "$mode" connection_p99 "$cp99" us
    record "$run" "$mode" connection_errors "$errors" count
    for node in a b; do
        if [ -n "${tpid[$node]:-}" ]; then
            after=$(cpu_ticks "${tpid[$node]}")
            record "$run" "$mode" "cpu_per_1k_conns_node-$node" \
                "$(awk -v t=$((after - before[$node])) -v c="$clk" -v n="$n" 'BEGIN { printf "%.3f", (t / c) / (n / 1000) }')" s/1k
            record_counts "$run" "$mode" connrate "$node" conn "$n"
        fi
    done

    pod a1 timeout 120 "$bench_bin" latency --target 10.250.2.2:7000 --count "$latency_count" \
        --warmup 500 --size 1024 >"$work/latency.json" 2>"$work/latency.err" \
        || { cat "$work/latency.err" >&2; return 1; }
    read -r p50 p99 < <(jget "$work/latency.json" p50_us p99_us)
    record "$run" "$mode" latency_p50 "$p50" us
    record "$run" "$mode" latency_p99 "$p99" us

}

# perf record -g of both tunnel processes under one more single-stream test and one more
# connection test (profiled runs are slower, so they give no figures). Writes DIR/TEST-node-N.data
# and DIR/TEST-node-N.txt: the split between kernel, weft and libraries, then the functions
# with the most time including their callees.
profile_tunnel() {
    local test node p rec=() what
    mkdir -p "$profile_dir"
    for test in 1x connrate; do
        rec=()
        for node in a b; do
            p=${tpid[$node]:-}
            [ -n "$p" ] || continue
            perf record -F 999 -g -p "$p" -o "$profile_dir/$test-node-$node.data" >/dev/null 2>&1 &
            rec+=($!)
            pids+=($!)
        done
        sleep 0.5
        if [ "$test" = 1x ]; then
            pod a1 timeout $((iperf_time + 20)) iperf3 -c 10.250.2.2 -p 5201 -t "$iperf_time" >/dev/null
        else
            pod a1 timeout $((connrate_time + 30)) "$bench_bin" connrate --target 10.250.2.2:7000 \
                --duration "$connrate_time" --concurrency 8 >/dev/null 2>&1
        fi
        for p in "${rec[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; forget "$p"; done
        for node in a b; do
            what=$profile_dir/$test-node-$node
            [ -s "$what.data" ] || continue
            {
                echo "# $test, node-$node: where the samples are"
                perf report -i "$what.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]'
                echo "# functions, time including callees"
                perf report -i "$what.data" --children --sort symbol -g none --stdio 2>/dev/null \
                    | grep -E '^ +[0-9]' | sed -n 1,60p
            } > "$what.txt"
        done
    done
    echo "  profiles in $profile_dir"
}

# --- the runs ----------------------------------------------------------------------------------

"tunnel_${kind}_setup" "$work"
mode_list=()
IFS=, read -ra wanted <<<"$modes"
for m in "${wanted[@]}"; do
    case "$m" in
        direct) mode_list+=(direct) ;;
        tunnel|"$kind") mode_list+=("$kind") ;;
        *) die "unknown mode $m (direct or tunnel)" ;;
    esac
done

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for run in $(seq "$runs"); do
    for mode in "${mode_list[@]}"; do
        say "run $run/$runs: $mode"
        lab_up
        tpid=()
        start_servers
        if [ "$mode" != direct ]; then
            "tunnel_${kind}_config" "$work" "$lab"
            start_tunnel
            measure_idle "$run" "$mode"
            # Fresh processes for the rest, so the load figures do not carry the idle test's heap.
            restart_tunnel
        fi
        measure "$run" "$mode"
        if [ -n "$profile_dir" ] && [ "$run" -eq 1 ] && [ "$mode" != direct ]; then
            say "profiling $mode"
            profile_tunnel
        fi
        stop_tunnel
        stop_all
        bash "$repo/scripts/lab.sh" down "$lab"
        # The kernel tears the namespaces down in the background; let it finish first.
        sleep 3
    done
done
load_end=$(load1)

# --- results -----------------------------------------------------------------------------------

mkdir -p "$results"
cp "$raw" "$results/raw.csv"
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$repo" diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
say "results (median, min-max over $runs runs) in $results"
python3 - "$results" "$kind" "$(nproc)" "$cpu_model" "$(uname -r)" "$load_start" "$load_end" \
    "$started" "$commit" "$runs" "$iperf_time" <<'PY'
import csv, json, statistics, sys
out, kind, nproc, cpu, kernel, load_start, load_end, started, commit, runs, secs = sys.argv[1:]
rows = list(csv.DictReader(open(f"{out}/raw.csv")))
groups = {}
for r in rows:
    try:
        v = float(r["value"])
    except ValueError:
        print(f"skipping a non-numeric value: {r}", file=sys.stderr)
        continue
    groups.setdefault((r["mode"], r["metric"], r["unit"]), []).append(v)
summary = []
for (mode, metric, unit), vals in groups.items():
    summary.append(dict(mode=mode, metric=metric, unit=unit, median=statistics.median(vals),
                        min=min(vals), max=max(vals), n=len(vals)))
with open(f"{out}/results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["mode", "metric", "unit", "median", "min", "max", "n"])
    w.writeheader()
    w.writerows(summary)
machine = dict(nproc=int(nproc), cpu=cpu, kernel=kernel, load_average_start=float(load_start),
               load_average_end=float(load_end))
json.dump(dict(started=started, commit=commit, tunnel_kind=kind, runs=int(runs),
               iperf_seconds=int(secs), machine=machine, results=summary),
          open(f"{out}/results.json", "w"), indent=2)

modes = []
for s in summary:
    if s["mode"] not in modes:
        modes.append(s["mode"])
metrics = []
for s in summary:
    if (s["metric"], s["unit"]) not in metrics:
        metrics.append((s["metric"], s["unit"]))
by = {(s["mode"], s["metric"]): s for s in summary}
def cell(s):
    if s is None:
        return "-"
    fmt = lambda v: f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"
print(f"machine: {nproc} cores, {cpu}, kernel {kernel}; load average {load_start} at start, "
      f"{load_end} at end; commit {commit}")
print(f"{'figure':36} {'unit':8} " + " ".join(f"{m:>26}" for m in modes))
for metric, unit in metrics:
    print(f"{metric:36} {unit:8} " + " ".join(f"{cell(by.get((m, metric))):>26}" for m in modes))

# Data files for the chart: one row per figure, median/min/max per mode.
def table(name, rows_):
    with open(f"{out}/{name}.dat", "w") as f:
        for label, metric in rows_:
            vals = []
            for m in modes:
                s = by.get((m, metric))
                vals += [s["median"], s["min"], s["max"]] if s else [0, 0, 0]
            f.write(f'"{label}" ' + " ".join(f"{v:.4f}" for v in vals) + "\n")
table("throughput", [("1", "throughput_1x"), ("4", "throughput_4x"),
                     ("1 -R", "throughput_1x_reverse"), ("4 -R", "throughput_4x_reverse")])
table("connrate", [("new conns/s", "connections_per_s")])
table("latency", [("p50", "latency_p50"), ("p99", "latency_p99")])
with open(f"{out}/modes.txt", "w") as f:
    f.write(" ".join(modes) + "\n")
PY

read -ra chart_modes < "$results/modes.txt" || true
plot_cmd() { # datafile: one clustered-bar series per mode
    local i=0 m s=""
    for m in "${chart_modes[@]}"; do
        s+="${s:+, }'$results/$1.dat' using $((i * 3 + 2)):$((i * 3 + 3)):$((i * 3 + 4)):xtic(1) title '$m'"
        i=$((i + 1))
    done
    echo "plot $s"
}
gnuplot <<GP || echo "bench.sh: gnuplot failed; the CSV and JSON are still there" >&2
set terminal pngcairo size 1200,420 font ",10"
set output '$results/bench.png'
set multiplot layout 1,3 title "$kind vs direct, $(nproc) cores, load $load_start: median of $runs runs, bars min-max"
set style data histogram
set style histogram errorbars gap 1 lw 1
set style fill solid 0.7 border -1
set grid ytics
set yrange [0:*]
set key below
set title "iperf3 throughput (Gbit/s)"
set xlabel "streams (-R: server to client)"
$(plot_cmd throughput)
unset xlabel
set title "new connections per second"
$(plot_cmd connrate)
set title "1 KiB round trip (µs)"
$(plot_cmd latency)
unset multiplot
GP
rm -f "$results"/*.dat "$results/modes.txt"
echo "wrote $results/results.csv, results.json, raw.csv, bench.png"
