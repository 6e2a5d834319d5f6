#!/usr/bin/env bash
# The benchmark gate: builds the harness's vicus binary (release) and fails when its W1 64 B
# instructions per message (both peers, callgrind; tools/instr-per-msg.sh) exceed the budget
# in bench/instr-budget by more than 15 %. Instruction counts, not time: the same binary gives
# the same figure to a few instructions on a loaded machine.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=$(grep -v '^#' instr-budget | grep -m1 '[0-9]')
cargo build --release --locked -p meshbench-vicus
line=$(tools/instr-per-msg.sh "${CARGO_TARGET_DIR:-target}/release/meshbench-vicus" w1_64)
echo "$line"
per=$(echo "$line" | awk '{print $3}')
limit=$(python3 -c "print(int($budget * 1.15))")
if [ "$per" -gt "$limit" ]; then
    echo "error: W1 64 B takes $per instructions per message, over the budget of $budget + 15 % ($limit); see bench/instr-budget" >&2
    exit 1
fi
echo "W1 64 B: $per instructions per message (budget $budget, limit $limit)"
