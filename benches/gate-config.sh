# The gate configuration of the load benchmarks (perf.sh, compare.sh): one listener, one carrier
# on loopback, one trunk for 127.0.0.0/8 whose limit (by default) never refuses; with
# ADMIN_PORT set, the admin API (for /metrics) on that port.
#   gate_config PORT UAS_PORT TRANSPORT [RATE BURST]
gate_config() {
  local port=$1 uas=$2 transport=$3 rate=${4:-1000000} burst=${5:-1000000}
  cat <<EOF
[[listen]]
address = "127.0.0.1:$port"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[[upstream]]
name = "carrier"
address = "127.0.0.1:$uas"
transport = "$transport"
sources = ["127.0.0.1:$uas"]

[[account]]
name = "main"
rate = 1000000
burst = 1000000

[[trunk]]
name = "pbx"
account = "main"
upstream = "carrier"
rate = $rate
burst = $burst
match = { sources = ["127.0.0.0/8"] }
EOF
  if [ -n "${ADMIN_PORT:-}" ]; then
    printf '\n[admin]\naddress = "127.0.0.1:%s"\n' "$ADMIN_PORT"
  fi
}
