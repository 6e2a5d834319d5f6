#!/usr/bin/env bash
# Instructions per message, both peers, counted by callgrind: repeatable for one binary on a
# noisy machine, where wall time is not. Runs one harness binary on one workload twice, with
# N1 and N2 messages, and divides the difference in instructions by the difference in
# messages, so setup, handshakes and warm-up cancel out.
#   tools/instr-per-msg.sh BIN WORKLOAD [N1] [N2]
#   e.g. cargo build --release -p meshbench-vicus && tools/instr-per-msg.sh target/release/meshbench-vicus w1_64
# Workloads: w1_64, w1_1k (MB_W1_MSGS), w5 (MB_W5_MSGS per client, divided by 64 clients),
# w7 (MB_W7_PUBLISHES, divided by 16 copies each; e.g. 2000 6000).
# Needs valgrind (Debian's package). Prints one line; the figure is its 4th word.
set -euo pipefail
bin=$1; w=$2; n1=${3:-20000}; n2=${4:-120000}
var=MB_W1_MSGS; [ "$w" = w5 ] && var=MB_W5_MSGS; [ "$w" = w7 ] && var=MB_W7_PUBLISHES
count() {
  local n=$1 log; log=$(mktemp)
  env MB_MIN_MS=0 MB_MAX_SECS=0 MB_WARMUP_MAX_SECS=0 MB_W1_WARMUP=2000 MB_W5_WARMUP=20 MB_W7_WARMUP=200 \
      MB_TIMEOUT_S=1200 "$var=$n" \
      valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$w" >/dev/null 2>"$log"
  awk '/Collected :/ {print $NF}' "$log" | tail -1; rm -f "$log"
}
i1=$(count "$n1"); i2=$(count "$n2")
per=$(python3 -c "print(round(($i2-$i1)/($n2-$n1)))")
[ "$w" = w5 ] && per=$(python3 -c "print(round(($i2-$i1)/(($n2-$n1)*64)))")
# W7: per copy (one publish is MB_W7_SUBSCRIBERS copies, 16 by default).
[ "$w" = w7 ] && per=$(python3 -c "print(round(($i2-$i1)/(($n2-$n1)*${MB_W7_SUBSCRIBERS:-16})))")
echo "$(basename "$bin") $w: $per instructions per message (both peers; $i1 at $n1, $i2 at $n2)"
