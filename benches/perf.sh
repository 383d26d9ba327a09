#!/usr/bin/env bash
# The gate under load, measured with `cpsgate load` (see docs/performance.md):
#   - the highest offered rate with < 0.1 % of calls lost (calls complete: INVITE, 100, 180, 200,
#     ACK, BYE, 200 — seven messages through the gate per call);
#   - CPU time of the gate process per call (utime + stime from /proc/PID/stat), as calls per
#     CPU-second;
#   - latency from INVITE to its first answer, p50/p99, at half that rate, next to the same for
#     the load tool's two sides talking directly (the harness alone) and, for cpsgate over UDP,
#     the gate's own transit time (kernel receive stamp to send; cpsgate_udp_transit_seconds);
#   - resident memory at idle and under load;
# over UDP and TCP, for cpsgate and, when `kamailio` is installed, for Kamailio (stateless
# forward() + pipelimit, benches/kamailio.cfg) in the same run.
#
#   benches/perf.sh [seconds per step] [rates...]
#
# Everything runs on 127.0.0.1 with ports picked free at start; both gates are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

STEP_SECS=${1:-5}
shift || true
RATES=(${@:-1000 2000 5000 10000 15000 20000 30000 40000})
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
GATE_PIDS=()
cleanup() {
  for p in "${GATE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet --bin cpsgate
BIN=target/release/cpsgate

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CPU ticks (user + system) of the given processes.
cpu_ticks() {
  local total=0
  for p in "$@"; do
    if [ -r "/proc/$p/stat" ]; then
      # Fields 14 and 15; the command name (field 2) may hold spaces, so cut after ")".
      read -r ut st < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
      total=$((total + ut + st))
    fi
  done
  echo "$total"
}

rss_kib() {
  local total=0
  for p in "$@"; do
    local r
    r=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${r:-0}))
  done
  echo "$total"
}

# gate_config PORT UAS_PORT TRANSPORT [RATE BURST]: a gate with one trunk for 127.0.0.0/8.
source benches/gate-config.sh

json_field() { python3 -c "import json,sys; d=json.load(open('$1')); print($2)"; }

# run_step NAME TRANSPORT GATE_PORT UAS_PORT RATE PIDS... -> "offered lost p50 p99 ticks rss_peak achieved"
run_step() {
  local transport=$1 gport=$2 uport=$3 rate=$4; shift 4
  local pids=("$@")
  local before after peak=0
  before=$(cpu_ticks "${pids[@]}")
  "$BIN" load --gate "127.0.0.1:$gport" --transport "$transport" --uas "127.0.0.1:$uport" \
    --cps "$rate" --duration "$STEP_SECS" --drain 2 --quiet --json "$WORK/s.json" >/dev/null &
  local lp=$!
  while kill -0 "$lp" 2>/dev/null; do
    local r; r=$(rss_kib "${pids[@]}"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.5
  done
  wait "$lp"
  after=$(cpu_ticks "${pids[@]}")
  local offered lost p50 p99 achieved
  offered=$(json_field "$WORK/s.json" "d['offered']")
  lost=$(json_field "$WORK/s.json" "d['lost']")
  p50=$(json_field "$WORK/s.json" "round(d['p50_ms'],3)")
  p99=$(json_field "$WORK/s.json" "round(d['p99_ms'],3)")
  achieved=$(json_field "$WORK/s.json" "round(d['offered_cps'])")
  echo "$offered $lost $p50 $p99 $((after - before)) $peak $achieved"
}

# measure NAME TRANSPORT GATE_PORT UAS_PORT PIDS...
measure() {
  local name=$1 transport=$2 gport=$3 uport=$4; shift 4
  local pids=("$@")
  local idle; idle=$(rss_kib "${pids[@]}")
  local best=0 best_cpu="" best_rss=0
  echo "## $name over $transport (idle RSS $((idle / 1024)) MiB)"
  printf '| offered CPS | achieved | lost | gate CPU s | calls per CPU-second | RSS peak MiB |\n|---|---|---|---|---|---|\n'
  for rate in "${RATES[@]}"; do
    read -r offered lost p50 p99 ticks peak achieved < <(run_step "$transport" "$gport" "$uport" "$rate" "${pids[@]}")
    local cpu per
    cpu=$(python3 -c "print(round($ticks/$TICK, 2))")
    per=$(python3 -c "print(round($offered/max($ticks/$TICK, 1e-9)))")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$rate" "$achieved" "$lost" "$cpu" "$per" "$((peak / 1024))"
    # Sustained: < 0.1 % lost, and the load tool kept up (97 % of the target offered).
    if python3 -c "import sys; sys.exit(0 if $lost*1000 < $offered and $achieved >= 0.97*$rate else 1)"; then
      best=$rate; best_cpu=$per; best_rss=$peak
    else
      break
    fi
  done
  local half=$((best / 2)); [ "$half" -lt 1 ] && half=1
  # Latency moves from run to run on shared cores: HALF_RUNS runs (3 by default), each reported.
  local p50s=() p99s=() transits=()
  for _ in $(seq 1 "${HALF_RUNS:-3}"); do
    local hist_before="" transit="n/a"
    [ -n "${ADMIN:-}" ] && hist_before=$(transit_buckets)
    read -r _ _ p50 p99 _ _ _ < <(run_step "$transport" "$gport" "$uport" "$half" "${pids[@]}")
    [ -n "${ADMIN:-}" ] && transit=$(transit_quantiles "$hist_before" "$(transit_buckets)")
    p50s+=("$p50"); p99s+=("$p99"); transits+=("$transit")
  done
  p50=$(IFS=/; echo "${p50s[*]}"); p99=$(IFS=/; echo "${p99s[*]}"); transit=$(IFS=/; echo "${transits[*]}")
  # The harness alone at the same rate (the load tool's PBX side straight to its carrier side):
  # what the latency would be without a gate on this machine.
  local dport; dport=$(free_port)
  "$BIN" load --gate "127.0.0.1:$dport" --transport "$transport" --uas "127.0.0.1:$dport" \
    --cps "$half" --duration "$STEP_SECS" --drain 2 --quiet --json "$WORK/d.json" >/dev/null
  local dp50 dp99
  dp50=$(json_field "$WORK/d.json" "round(d['p50_ms'],3)")
  dp99=$(json_field "$WORK/d.json" "round(d['p99_ms'],3)")
  echo
  BEST=$best
  echo "RESULT $name $transport max_cps=$best calls_per_cpu_second=$best_cpu p50_ms_at_half=$p50 p99_ms_at_half=$p99 harness_alone_p50_ms=$dp50 harness_alone_p99_ms=$dp99 transit_at_half=$transit rss_idle_mib=$((idle / 1024)) rss_load_mib=$((best_rss / 1024))"
  echo
}

# The gate's UDP transit histogram (cpsgate_udp_transit_seconds), "le count" per bucket.
transit_buckets() {
  python3 - "$ADMIN" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith("cpsgate_udp_transit_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        print(le, line.rsplit(" ", 1)[1])
PY
}

# transit_quantiles BEFORE AFTER: p50 and p99 of the datagrams counted between the two
# snapshots, as the upper bound of the bucket each falls in ("p50<=0.05ms,p99<=0.2ms").
transit_quantiles() {
  python3 - "$1" "$2" <<'PY'
import sys
def parse(t):
    return [(l.split()[0], float(l.split()[1])) for l in t.splitlines() if l.strip()]
before, after = dict(parse(sys.argv[1])), parse(sys.argv[2])
delta = [(le, n - before.get(le, 0)) for le, n in after]
total = delta[-1][1] if delta else 0
def q(p):
    for le, n in delta:
        if n >= p * total:
            return "inf" if le == "+Inf" else f"{float(le) * 1000:g}ms"
out = f"p50<={q(0.5)},p99<={q(0.99)},n={int(total)}" if total else "none"
print(out)
PY
}

for transport in udp tcp; do
  gport=$(free_port); uport=$(free_port); ADMIN=$(free_port)
  ADMIN_PORT=$ADMIN gate_config "$gport" "$uport" "$transport" > "$WORK/gate.toml"
  "$BIN" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
  gp=$!; GATE_PIDS+=("$gp")
  sleep 1
  if ! kill -0 "$gp" 2>/dev/null; then
    echo "cpsgate did not start:"; cat "$WORK/gate.log"; exit 1
  fi
  measure cpsgate "$transport" "$gport" "$uport" "$gp"
  kill "$gp"; wait "$gp" 2>/dev/null || true
  [ "$transport" = udp ] && UDP_MAX=$BEST
done
ADMIN=

# Accuracy at max load: the highest sustained UDP rate offered to a trunk of half that rate
# (burst a tenth of the rate); the carrier side counts the INVITEs reaching it per second.
if [ "${UDP_MAX:-0}" -ge 200 ]; then
  rate=$((UDP_MAX / 2)); burst=$((rate / 10)); secs=$((STEP_SECS * 2))
  gport=$(free_port); uport=$(free_port)
  gate_config "$gport" "$uport" udp "$rate" "$burst" > "$WORK/gate.toml"
  "$BIN" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
  gp=$!; GATE_PIDS+=("$gp")
  sleep 1
  "$BIN" load --gate "127.0.0.1:$gport" --transport udp --uas "127.0.0.1:$uport" \
    --cps "$UDP_MAX" --duration "$secs" --drain 2 --quiet --json "$WORK/acc.json" >/dev/null
  kill "$gp"; wait "$gp" 2>/dev/null || true
  python3 - "$WORK/acc.json" "$rate" "$burst" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); rate, burst = int(sys.argv[2]), int(sys.argv[3])
# Whole seconds of offered load (the last partial second and the drain are left out).
full = [s for s in d["per_second"] if s["offered"] > 0.9 * d["target_cps"]]
reached = [s["reached"] for s in full]
steady = reached[1:] or reached
refused = sum(d["refused"].values())
print(f"## accuracy at max load: {d['target_cps']:.0f} CPS offered over UDP to a trunk of rate {rate}, burst {burst}")
print(f"admitted per 1-s window: {reached}")
print(f"RESULT accuracy offered_cps={d['offered_cps']:.0f} rate={rate} burst={burst} "
      f"busiest_window={max(reached)} bound={rate + burst} "
      f"steady_mean={sum(steady) / len(steady):.1f} refused={refused} lost={d['lost']} "
      f"{'OK' if max(reached) <= rate + burst else 'OVER'}")
PY
  echo
fi

if command -v kamailio >/dev/null 2>&1; then
  for transport in udp tcp; do
    kport=$(free_port); uport=$(free_port)
    sed -e "s/LISTEN_PORT/$kport/g" -e "s/UAS_ADDR/127.0.0.1:$uport/" -e "s/TRANSPORT/$transport/" \
      benches/kamailio.cfg > "$WORK/kamailio.cfg"
    # -x tlsf: Kamailio's faster memory manager. With the default ("qm", which keeps debugging
    # records) Kamailio spent most of its time in qm_malloc here, at about 5x the CPU per call:
    # the comparison is against Kamailio at its best.
    kamailio -f "$WORK/kamailio.cfg" -P "$WORK/kamailio.pid" -w "$WORK" -DD -E -m 256 -M 16 -x tlsf \
      >"$WORK/kamailio.log" 2>&1 &
    kp=$!; GATE_PIDS+=("$kp")
    sleep 2
    if ! kill -0 "$kp" 2>/dev/null; then
      echo "kamailio did not start:"; cat "$WORK/kamailio.log"; exit 1
    fi
    kpids=($(pgrep -P "$kp") "$kp")
    measure kamailio "$transport" "$kport" "$uport" "${kpids[@]}"
    kill "$kp"; wait "$kp" 2>/dev/null || true
  done
else
  echo "kamailio is not installed (apt-get install kamailio): no comparison"
fi
