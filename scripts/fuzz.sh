#!/usr/bin/env bash
# Runs weft's fuzz targets (fuzz/: cargo fuzz, libFuzzer with AddressSanitizer), each for a
# bounded time, and exits non-zero if any of them crashes.
#
# The fuzzers need a nightly toolchain: libFuzzer's coverage instrumentation and the
# sanitizers are -Z flags of nightly rustc. weft itself does not: it builds on stable, and the
# property tests of the same parsers (tests/parsers_prop.rs) and the replay of every saved crash
# and seed (tests/fuzz_regressions.rs) run on stable in the normal `cargo test`.
#
# Installs what it needs itself: the nightly toolchain through rustup if it is missing, and
# cargo-fuzz from crates.io (into ~/.cache/weft/cargo-fuzz). The fuzz build goes to
# ~/.cache/weft/fuzz-target, the growing corpora to ~/.cache/weft/fuzz-corpus/<target> (they
# start from fuzz/seeds/<target> and fuzz/regressions/<target>), crashes to
# ~/.cache/weft/fuzz-artifacts/<target>/ and each run's log to ~/.cache/weft/fuzz-logs/.
#
# Usage: scripts/fuzz.sh [--seconds N] [--list] [TARGET...]
#   --seconds N  how long each target runs (default 60)
#   --list       print the targets and exit
#   TARGET       the targets to run (default: every one)
#
# A crash: the script names the input that caused it. Fix the bug, copy the input into
# fuzz/regressions/<target>/ (tests/fuzz_regressions.rs replays that folder in `cargo test`),
# and run the target again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=60
list=false
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds)
            [ $# -ge 2 ] || { echo "scripts/fuzz.sh: --seconds needs a value" >&2; exit 2; }
            seconds=$2
            shift 2
            ;;
        --seconds=*) seconds=${1#--seconds=}; shift ;;
        --list) list=true; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) echo "scripts/fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$seconds" in
    ''|*[!0-9]*|0) echo "scripts/fuzz.sh: --seconds wants a positive whole number, not '$seconds'" >&2; exit 2 ;;
esac

# The targets are the [[bin]]s of fuzz/Cargo.toml.
all=()
while IFS= read -r t; do all+=("$t"); done < <(
    awk '/^\[\[bin\]\]/{bin=1; next} bin && /^name *=/{gsub(/.*= *"|".*/, ""); print; bin=0}' fuzz/Cargo.toml
)
if $list; then
    printf '%s\n' "${all[@]}"
    exit 0
fi
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all[@]}")
fi
for t in "${targets[@]}"; do
    printf '%s\n' "${all[@]}" | grep -qx -- "$t" || {
        echo "scripts/fuzz.sh: no target '$t'; the targets: ${all[*]}" >&2
        exit 2
    }
done

cache=${XDG_CACHE_HOME:-$HOME/.cache}/weft
mkdir -p "$cache"

command -v rustup >/dev/null 2>&1 || {
    echo "scripts/fuzz.sh: rustup is required (for the nightly toolchain)" >&2
    exit 1
}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain (the sanitizers are nightly-only)"
    rustup toolchain install nightly --profile minimal
fi
export PATH="$cache/cargo-fuzz/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz into $cache/cargo-fuzz"
    nice -n 10 cargo install cargo-fuzz --locked --root "$cache/cargo-fuzz"
fi

# Other builds share the machine: the fuzz build and the fuzzers yield to them. Sixteen
# codegen units instead of cargo fuzz's one: the build of weft's dependency tree under the
# sanitizer takes several times less, for a fuzzer a little slower per execution.
fuzz_flags=(-O --codegen-units 16 --target-dir "$cache/fuzz-target")

# Built once, then run directly: `cargo fuzz run` would first rebuild weft whenever a source
# file changed meanwhile, which in a tree being edited is before every target.
echo "== building the fuzz targets (nightly; ${fuzz_flags[*]})"
if [ ${#targets[@]} -eq ${#all[@]} ]; then
    (cd fuzz && nice -n 10 cargo +nightly fuzz build "${fuzz_flags[@]}")
else
    for t in "${targets[@]}"; do
        (cd fuzz && nice -n 10 cargo +nightly fuzz build "${fuzz_flags[@]}" "$t")
    done
fi
bin_dir=$cache/fuzz-target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release

mkdir -p "$cache/fuzz-logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$cache/fuzz-corpus/$t
    artifacts=$cache/fuzz-artifacts/$t
    log=$cache/fuzz-logs/$t.log
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus" "$root/fuzz/seeds/$t")
    [ -d "$root/fuzz/regressions/$t" ] && dirs+=("$root/fuzz/regressions/$t")
    before=$(find "$artifacts" -type f | sort)
    echo "== $t: ${seconds}s (log: $log)"
    status=0
    # -timeout: one input taking 10 s is a hang, reported as a crash. -rss_limit_mb: 4 GiB,
    # well above what any parser should take for an input of a few KiB.
    nice -n 10 "$bin_dir/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" "${dirs[@]}" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    size=$(find "$corpus" -type f | wc -l)
    if [ "$status" -eq 0 ]; then
        line="$t: ok, ${runs:-?} executions in ${took:-$seconds} s, corpus $size inputs"
    else
        found=$(comm -13 <(printf '%s\n' "$before") <(find "$artifacts" -type f | sort) | tr '\n' ' ')
        line="$t: FAILED (exit $status) after ${runs:-?} executions; input: ${found:-none saved, see the log}"
        failed+=("$t")
        grep -m1 -A12 -E '^(thread .* panicked|==[0-9]+==ERROR|ERROR: libFuzzer)' "$log" || tail -20 "$log"
    fi
    echo "   $line"
    summary+=("$line")
done

echo "== summary (${seconds}s a target)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "scripts/fuzz.sh: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
    exit 1
fi
