#!/usr/bin/env bash
# The comparative benchmark: builds everything in release and runs every implementation x
# workload, one process per (impl, workload) so each result carries its own peak RSS. Writes
# one JSON line per result to $MB_RESULTS, prints the tables, and draws one SVG chart per
# workload into $MB_SVG_DIR (docs/perf/ of this repository by default): every figure of
# docs/performance.md comes from this one command.
#
# Knobs (all optional; see README.md for the full list):
#   MB_IMPLS="raw aurelia tonic vicus"      which implementations
#   MB_WORKLOADS="w1_64 w1_1k w2 w3 w4 w5 w6 w7 m1 m2"  which workloads (w6, w7: raw, tonic,
#                                           vicus; m1/m2: whichever impls provide them, the rest skip)
#   MB_ALLOC_IMPLS="raw tonic vicus"        impls whose allocations per message are counted (the
#                                           `alloc` workload, in binaries built with dhat as the
#                                           allocator, in $CARGO_TARGET_DIR-dhat; "" = none)
#   MB_SOAK=0                               1: also run the churn soak (vicus; MB_SOAK_SECS=300)
#   MB_RESULTS=results/latest.jsonl         where the JSON lines go (truncated at start)
#   MB_SVG_DIR=../docs/perf                 where the charts go ("" = no charts)
#   MB_MAX_SECS=20      cap per timed phase (0 = run the full requested sizes)
#   MB_TIMEOUT_S=150    per-workload timeout inside the process
#   MB_W1_MSGS, MB_W2_ITERS, MB_W3_BYTES, MB_W4_CONNS, MB_W5_CLIENTS, MB_W5_MSGS,
#   MB_W7_SUBSCRIBERS, MB_W7_PUBLISHES, ...
set -uo pipefail

cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/meshbench-target}"
IMPLS="${MB_IMPLS:-raw aurelia tonic vicus}"
WORKLOADS="${MB_WORKLOADS:-w1_64 w1_1k w2 w3 w4 w5 w6 w7 m1 m2}"
ALLOC_IMPLS="${MB_ALLOC_IMPLS-raw tonic vicus}"
SOAK="${MB_SOAK:-0}"
OUT="${MB_RESULTS:-results/latest.jsonl}"
SVG_DIR="${MB_SVG_DIR-../docs/perf}"
LOG="${MB_STDERR_LOG:-/tmp/meshbench-stderr.log}"
export MB_TIMEOUT_S="${MB_TIMEOUT_S:-150}"
BIN="$CARGO_TARGET_DIR/release"
# The vicus revision under test (impls/vicus depends on this repository's crate by path).
export MB_VICUS_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- .. 2>/dev/null || echo +changes)"

pkgs=(-p meshbench-core)
for i in $IMPLS; do pkgs+=(-p "meshbench-$i"); done
echo "== building (release) in $CARGO_TARGET_DIR: ${pkgs[*]}" >&2
if ! cargo build --release --bins "${pkgs[@]}" >&2; then
    echo "build failed" >&2
    exit 1
fi
# The allocation counts need dhat as the allocator: separate binaries, so no other workload
# pays for it.
DHAT_BIN="$CARGO_TARGET_DIR-dhat/release"
if [ -n "$ALLOC_IMPLS" ]; then
    dpkgs=()
    for i in $ALLOC_IMPLS; do dpkgs+=(-p "meshbench-$i"); done
    echo "== building the dhat binaries in $CARGO_TARGET_DIR-dhat: ${dpkgs[*]}" >&2
    if ! CARGO_TARGET_DIR="$CARGO_TARGET_DIR-dhat" cargo build --release --bins --features meshbench-core/dhat "${dpkgs[@]}" >&2; then
        echo "dhat build failed" >&2
        exit 1
    fi
fi

mkdir -p "$(dirname "$OUT")"
: > "$OUT"
: > "$LOG"
start=$(date +%s)
cpu="$(awk -F: '/model name/ {sub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo)"
echo "== machine: $(nproc) cores ($cpu), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -r); vicus $MB_VICUS_REV; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# One (impl, workload) in its own process: run_one BINARY IMPL WORKLOAD [EXTRA_SECONDS].
run_one() {
    local bin="$1" impl="$2" w="$3" extra="${4:-0}"
    local t0 before after rc
    t0=$(date +%s)
    before=$(wc -l < "$OUT")
    echo "[$impl $w] ..." >> "$LOG"
    timeout --kill-after=10 $((MB_TIMEOUT_S + 60 + extra)) "$bin/meshbench-$impl" "$w" >> "$OUT" 2>> "$LOG"
    rc=$?
    after=$(wc -l < "$OUT")
    if [ "$after" -eq "$before" ]; then
        # The process died without reporting (crash, OOM, outer timeout).
        printf '{"impl":"%s","workload":"%s","ok":false,"error":"process exited with status %s without a result (see %s)"}\n' \
            "$impl" "$w" "$rc" "$LOG" >> "$OUT"
    fi
    echo "  $impl $w: $(( $(date +%s) - t0 ))s (exit $rc)" >&2
}
for impl in $IMPLS; do
    for w in $WORKLOADS; do
        run_one "$BIN" "$impl" "$w"
    done
done
for impl in $ALLOC_IMPLS; do
    run_one "$DHAT_BIN" "$impl" alloc
done
if [ "$SOAK" = 1 ]; then
    run_one "$BIN" vicus soak "${MB_SOAK_SECS:-300}"
fi
echo "== total run time: $(( $(date +%s) - start ))s; results: $OUT; stderr: $LOG; load after $(cut -d' ' -f1-3 /proc/loadavg)" >&2

if [ -n "$SVG_DIR" ]; then
    "$BIN/meshbench-report" --svg "$SVG_DIR" "$OUT"
else
    "$BIN/meshbench-report" "$OUT"
fi
