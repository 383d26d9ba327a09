#!/usr/bin/env bash
# One INVITE from each of N distinct spoofed source addresses (default 1 000 000), crafted on a
# raw socket with sources 127.1.0.0 upwards, into a gate that limits unknown sources per IP and
# runs the flood guard: the gate's resident memory before, at its peak and after, and what it
# counted (docs/reliability.md). Needs root (a raw socket) and python3; everything stays on
# loopback.
#
#   benches/spoofed.sh [sources]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
[ "$(id -u)" = 0 ] || { echo "needs root for a raw socket"; exit 1; }

cargo build --release --quiet --bin cpsgate
BIN=target/release/cpsgate
WORK=$(mktemp -d)
GATE=""
cleanup() { [ -n "$GATE" ] && kill "$GATE" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
gport=$(free_port); sport=$(free_port); aport=$(free_port)
cat > "$WORK/gate.toml" <<EOF
[[listen]]
address = "127.0.0.1:$gport"

[proxy]
unknown_sources = "limit"
default_upstream = "sink"
shutdown_grace_secs = 0

[[upstream]]
name = "sink"
address = "127.0.0.1:$sport"

[limits]
unknown_source = { rate = 1, burst = 1 }

[admin]
address = "127.0.0.1:$aport"

[flood]
rate = 100
burst = 200
EOF
"$BIN" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
GATE=$!
sleep 1
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$GATE/status"; }
before=$(rss)
peak=$before
(
  while kill -0 "$GATE" 2>/dev/null; do
    r=$(rss); [ "$r" -gt "$(cat "$WORK/peak" 2>/dev/null || echo 0)" ] && echo "$r" > "$WORK/peak"
    sleep 0.2
  done
) &
SAMPLER=$!
start=$(date +%s.%N)
python3 - "$N" "$gport" <<'PY'
import socket, struct, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
base = struct.unpack("!I", socket.inet_aton("127.1.0.0"))[0]
template = ("INVITE sip:+15551234567@carrier.example SIP/2.0\r\n"
            "Via: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-spoof-{i}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:x@{src}>;tag=s{i}\r\n"
            "To: <sip:+15551234567@carrier.example>\r\nCall-ID: spoof-{i}\r\n"
            "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
import time
for i in range(n):
    # At most about 50 000 a second: what is measured is the tables, not the socket's queue.
    if i % 5000 == 4999:
        time.sleep(0.1)
    src = socket.inet_ntoa(struct.pack("!I", base + i))
    payload = template.format(src=src, i=i).encode()
    udp = struct.pack("!HHHH", 5060, port, 8 + len(payload), 0) + payload
    # Version/IHL, TOS, total length and checksum (the kernel fills both), id, frag, TTL, proto.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, i & 0xffff, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton("127.0.0.1"))
    while True:
        try:
            raw.sendto(ip + udp, ("127.0.0.1", 0))
            break
        except BlockingIOError:
            pass
PY
end=$(date +%s.%N)
sleep 3
after=$(rss)
kill "$SAMPLER" 2>/dev/null || true
peak=$(cat "$WORK/peak" 2>/dev/null || echo "$after")
metrics=$(curl -s "http://127.0.0.1:$aport/metrics" || python3 -c "
import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$aport/metrics').read().decode())")
received=$(echo "$metrics" | awk '/^cpsgate_messages_received_total/ {s += $2} END {print s + 0}')
forwarded=$(echo "$metrics" | awk '/^cpsgate_messages_forwarded_total/ {s += $2} END {print s + 0}')
flood=$(echo "$metrics" | awk '/^cpsgate_drops_total\{reason="flood"\}/ {print $2}')
echo "sources sent: $N in $(python3 -c "print(round($end - $start, 1))") s"
echo "gate counted: received $received, forwarded $forwarded, flood drops ${flood:-0}"
echo "RESULT spoofed sources=$N rss_before_mib=$before rss_peak_mib=$peak rss_after_mib=$after"
kill -0 "$GATE" && echo "gate still running"
