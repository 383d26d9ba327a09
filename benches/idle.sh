#!/usr/bin/env bash
# Thousands of idle TCP connections (default 3 000) held open against the gate: its resident
# memory with them open, whether a new caller is still served meanwhile, and what is left once
# the idle timeout has closed them (docs/reliability.md). Everything runs on 127.0.0.1.
#
#   benches/idle.sh [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
ulimit -n $((N * 2 + 1024))

cargo build --release --quiet --bin cpsgate
BIN=target/release/cpsgate
WORK=$(mktemp -d)
GATE=""
cleanup() { [ -n "$GATE" ] && kill "$GATE" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
gport=$(free_port); cport=$(free_port)
cat > "$WORK/gate.toml" <<EOF
[[listen]]
address = "127.0.0.1:$gport"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[tcp]
idle_timeout_secs = 10
max_connections = $((N + 100))
max_connections_per_source = $((N + 100))

[[upstream]]
name = "carrier"
address = "127.0.0.1:$cport"
sources = ["127.0.0.1:$cport"]

[[trunk]]
name = "pbx"
upstream = "carrier"
rate = 1000
burst = 1000
match = { sources = ["127.0.0.0/8"] }
EOF
"$BIN" run --config "$WORK/gate.toml" --log warn >"$WORK/gate.log" 2>&1 &
GATE=$!
sleep 1
python3 - "$N" "$gport" "$cport" "$GATE" <<'PY'
import socket, sys, time
n, gport, cport, pid = (int(a) for a in sys.argv[1:])

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

before = rss()
conns = []
t0 = time.time()
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", gport))
    conns.append(c)
opened = time.time() - t0
time.sleep(1)
held = rss()
# A new caller is still served: its INVITE reaches the carrier.
carrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
carrier.bind(("127.0.0.1", cport))
carrier.settimeout(5)
caller = socket.create_connection(("127.0.0.1", gport))
me = "%s:%d" % caller.getsockname()
invite = (f"INVITE sip:+15551234567@carrier.example SIP/2.0\r\n"
          f"Via: SIP/2.0/TCP {me};branch=z9hG4bK-idle-probe\r\nMax-Forwards: 70\r\n"
          f"From: <sip:p@x>;tag=1\r\nTo: <sip:+15551234567@carrier.example>\r\n"
          f"Call-ID: idle-probe\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
t1 = time.time()
caller.sendall(invite.encode())
data, _ = carrier.recvfrom(65535)
served_ms = (time.time() - t1) * 1000
assert b"Call-ID: idle-probe" in data
# The idle timeout (10 s) closes every held connection: reads see EOF.
deadline = time.time() + 30
closed = 0
for c in conns:
    c.settimeout(max(0.1, deadline - time.time()))
    try:
        if c.recv(1) == b"":
            closed += 1
    except OSError:
        closed += 1
time.sleep(1)
after = rss()
print(f"{n} idle connections opened in {opened:.2f} s; a new caller's INVITE reached the carrier "
      f"in {served_ms:.2f} ms meanwhile; {closed} closed by the idle timeout")
print(f"RESULT idle connections={n} rss_before_mib={before} rss_held_mib={held} "
      f"rss_after_timeout_mib={after} closed={closed}")
PY
