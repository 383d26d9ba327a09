#!/usr/bin/env bash
# Two builds of the gate under the same load, alternated, so a change is judged against its
# baseline in the same run on a noisy machine (docs/performance.md):
#
#   benches/compare.sh BASELINE_BINARY [rounds] [seconds] [transport] [rates...]
#
# BASELINE_BINARY is a `cpsgate` built from the commit to compare with (e.g. `git stash;
# cargo build --release; cp target/release/cpsgate /some/where/cpsgate-base; git stash pop`);
# the other is this tree's release build. For each rate and round, each gate in turn (the order
# swapped every round) carries `cpsgate load` for the given seconds; the table gives the gate
# process's user and system CPU per call (/proc/PID/stat), calls per CPU-second, calls lost and
# the latency p50/p99 to the first answer. Defaults: 3 rounds, 5 s, udp, 4000 8000 CPS.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=$(realpath "${1:?usage: benches/compare.sh BASELINE_BINARY [rounds] [seconds] [transport] [rates...]}")
ROUNDS=${2:-3}
SECS=${3:-5}
TRANSPORT=${4:-udp}
shift 4 2>/dev/null || shift $#
RATES=(${@:-4000 8000})
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet --bin cpsgate
NEW=target/release/cpsgate
source benches/gate-config.sh

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# "user_ticks system_ticks" of a process.
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }

# run BINARY RATE -> "calls lost user_ticks system_ticks p50 p99"
run() {
  local bin=$1 rate=$2 gport uport gp
  gport=$(free_port); uport=$(free_port)
  gate_config "$gport" "$uport" "$TRANSPORT" >"$WORK/gate.toml"
  "$bin" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
  gp=$!; PIDS+=("$gp")
  sleep 1
  kill -0 "$gp" 2>/dev/null || { echo "the gate did not start:" >&2; cat "$WORK/gate.log" >&2; exit 1; }
  local u0 s0 u1 s1
  read -r u0 s0 < <(ticks "$gp")
  "$NEW" load --gate "127.0.0.1:$gport" --transport "$TRANSPORT" --uas "127.0.0.1:$uport" \
    --cps "$rate" --duration "$SECS" --drain 2 --quiet --json "$WORK/s.json" >/dev/null
  read -r u1 s1 < <(ticks "$gp")
  kill "$gp"; wait "$gp" 2>/dev/null || true
  python3 -c "import json; d=json.load(open('$WORK/s.json')); print(d['offered'], d['lost'], $((u1 - u0)), $((s1 - s0)), round(d['p50_ms'],3), round(d['p99_ms'],3))"
}

echo "baseline: $BASE"
echo "this tree: $NEW"
printf '| CPS | round | gate | user µs/call | system µs/call | calls per CPU-second | lost | p50 / p99 ms |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for rate in "${RATES[@]}"; do
  for round in $(seq 1 "$ROUNDS"); do
    order=("$BASE" "$NEW")
    [ $((round % 2)) -eq 0 ] && order=("$NEW" "$BASE")
    for bin in "${order[@]}"; do
      name=this; [ "$bin" = "$BASE" ] && name=baseline
      read -r calls lost ut st p50 p99 < <(run "$bin" "$rate")
      python3 - "$rate" "$round" "$name" "$calls" "$lost" "$ut" "$st" "$p50" "$p99" "$TICK" <<'PY' | tee -a "$WORK/rows"
import sys
rate, rnd, name, calls, lost, ut, st, p50, p99, tick = sys.argv[1:]
calls, ut, st, tick = int(calls), int(ut), int(st), int(tick)
u, s = ut / tick / calls * 1e6, st / tick / calls * 1e6
print(f"| {rate} | {rnd} | {name} | {u:.1f} | {s:.1f} | {calls / max((ut + st) / tick, 1e-9):.0f} | {lost} | {p50} / {p99} |")
PY
    done
  done
done
# Medians per rate and build.
python3 - "$WORK/rows" <<'PY'
import statistics, sys
rows = [l.strip().strip("|").split("|") for l in open(sys.argv[1])]
print()
print("| CPS | gate | median user µs/call | median system µs/call | median calls per CPU-second |")
print("|---|---|---|---|---|")
for rate in dict.fromkeys(r[0].strip() for r in rows):
    for name in ("baseline", "this"):
        sel = [r for r in rows if r[0].strip() == rate and r[2].strip() == name]
        med = lambda i: statistics.median(float(r[i]) for r in sel)
        print(f"| {rate} | {name} | {med(3):.1f} | {med(4):.1f} | {med(5):.0f} |")
PY
