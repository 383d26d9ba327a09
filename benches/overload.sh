#!/usr/bin/env bash
# Ten times the contract on one trunk for a minute, with a second trunk at its normal load
# beside it (docs/reliability.md): trunk "hot" (100 CPS, burst 10) is offered 1 000 CPS, trunk
# "calm" (50 CPS, burst 5) 40 CPS, both through `cpsgate load`, for SECONDS (default 60). Reports
# the calls admitted per second on each trunk (calls answered by the carrier side), what was
# refused, and the gate's resident memory every 5 s. Everything runs on 127.0.0.1.
#
#   benches/overload.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}

cargo build --release --quiet --bin cpsgate
BIN=target/release/cpsgate
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
gport=$(free_port); uport=$(free_port); hot=$(free_port); calm=$(free_port)
cat > "$WORK/gate.toml" <<EOF
[[listen]]
address = "127.0.0.1:$gport"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[[upstream]]
name = "carrier"
address = "127.0.0.1:$uport"
sources = ["127.0.0.1:$uport"]

[[trunk]]
name = "hot"
upstream = "carrier"
rate = 100
burst = 10
match = { sources = ["127.0.0.1:$hot"] }

[[trunk]]
name = "calm"
upstream = "carrier"
rate = 50
burst = 5
match = { sources = ["127.0.0.1:$calm"] }
EOF
"$BIN" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
GATE=$!; PIDS+=("$GATE")
sleep 1
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$GATE/status"; }
echo "gate RSS at start: $(rss) MiB"
# The hot side also plays the carrier; it runs a second longer (a load run ends once its own
# calls are done), so the carrier outlives the calm side's last calls.
"$BIN" load --gate "127.0.0.1:$gport" --bind "127.0.0.1:$hot" --uas "127.0.0.1:$uport" \
  --cps 1000 --duration "$((SECS + 1))" --drain 2 --quiet --json "$WORK/hot.json" >/dev/null &
PIDS+=("$!"); HOT=$!
sleep 0.2
"$BIN" load --gate "127.0.0.1:$gport" --bind "127.0.0.1:$calm" \
  --cps 40 --duration "$SECS" --drain 2 --quiet --json "$WORK/calm.json" >/dev/null &
PIDS+=("$!"); CALM=$!
samples=()
while kill -0 "$HOT" 2>/dev/null; do
  sleep 5
  samples+=("$(rss)")
done
wait "$CALM" "$HOT"
echo "gate RSS every 5 s (MiB): ${samples[*]}"
python3 - "$WORK/hot.json" "$WORK/calm.json" <<'PY'
import json, sys
for name, path, rate, burst in (("hot", sys.argv[1], 100, 10), ("calm", sys.argv[2], 50, 5)):
    d = json.load(open(path))
    full = [s for s in d["per_second"] if s["offered"] > 0.9 * d["target_cps"]]
    admitted = [s["answered"] for s in full]
    steady = admitted[1:] or admitted
    print(f"{name}: offered {d['offered']} at {d['offered_cps']:.0f} CPS, answered {d['answered']}, "
          f"refused {d['refused']}, lost {d['lost']}")
    print(f"  admitted per second: min {min(admitted)}, max {max(admitted)} (bound {rate + burst}), "
          f"mean after the first second {sum(steady) / len(steady):.2f} (rate {rate})")
    print(f"RESULT overload trunk={name} offered_cps={d['offered_cps']:.0f} busiest={max(admitted)} "
          f"bound={rate + burst} steady_mean={sum(steady) / len(steady):.2f} "
          f"refused={sum(d['refused'].values())} lost={d['lost']}")
PY
