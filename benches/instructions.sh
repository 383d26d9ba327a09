#!/usr/bin/env bash
# Instructions per message of the decision core's `handle()`, counted by valgrind's callgrind:
# unlike times, the count is the same run after run on a busy machine, so it is the figure to
# compare a change against (docs/performance.md).
#
#   benches/instructions.sh [case...]     cases: invite_admitted invite_admitted_large invite_rejected
#                                                 response_relayed bye_in_dialog (default: all)
#
# Each case runs the `core` criterion bench in profiling mode for 3 s under callgrind, counting
# only inside `Proxy::handle`, and divides by the number of calls.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 1; }
CASES=(${@:-invite_admitted invite_admitted_large invite_rejected response_relayed bye_in_dialog})
BIN=$(cargo bench --bench core --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "core":
        print(m["executable"])')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf '| message | instructions per handle() |\n|---|---|\n'
for c in "${CASES[@]}"; do
  rm -f "$WORK"/cg.*
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
    --toggle-collect='cpsgate::proxy::Proxy::handle' \
    "$BIN" --bench --profile-time 3 "$c" >/dev/null 2>"$WORK/err"
  # The profile that counted something (criterion may start helper processes).
  out=$(ls -S "$WORK"/cg.* | head -1)
  total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$WORK/err" | sort -n | tail -1)
  # Calls to handle(): the `calls=` lines under each call site naming it in the profile
  # (callgrind names a function once, as `fn=` or `cfn=`, then by its "(id)").
  calls=$(python3 - "$out" <<'PY'
import re, sys
ids, target, calls = {}, False, 0
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            ids[m.group(2)] = m.group(3).strip()
        target = m.group(1) == "c" and ids.get(m.group(2)) == "cpsgate::proxy::Proxy::handle"
        continue
    if target and line.startswith("calls="):
        calls += int(line.split("=")[1].split()[0])
        target = False
print(calls)
PY
)
  printf '| %s | %s |\n' "$c" "$((total / calls))"
done
