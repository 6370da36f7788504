#!/usr/bin/env bash
# `make demo`: two meshd nodes on this machine (alpha on 127.0.0.2, beta on 127.0.0.3), an echo
# workload on beta, and an app-side upstream on alpha at 127.0.0.1:17000. Nothing else is needed:
# meshd's own CA issues every certificate. Ctrl-C stops everything. DEMO_ONESHOT=1 exits after the check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STATE=demo-state
mkdir -p "$STATE"

[ -f "$STATE/ca/ca.key" ] || $PY -m meshd ca init --dir "$STATE/ca" --trust-domain home.arpa

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
# Ctrl-C (or SIGTERM) is how the demo is meant to end: stop everything and exit 0, so make does not
# report "Error 130" for a clean stop.
trap 'trap - EXIT; cleanup; echo "demo stopped."; exit 0' INT TERM

$PY -m meshd.tools.echo 127.0.0.3:7000 & pids+=($!)
$PY -m meshd run -c configs/beta.toml 2>"$STATE/beta.log" & pids+=($!)
$PY -m meshd run -c configs/meshd.toml 2>"$STATE/alpha.log" & pids+=($!)

wait_ready() {  # poll the readiness endpoint, up to 20 s
    for _ in $(seq 200); do
        $PY - "$1" <<'PYEOF' && return 0
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(f"http://{sys.argv[1]}:15021/healthz/ready", timeout=1).status == 200 else 1)
except OSError:
    sys.exit(1)
PYEOF
        sleep 0.1
    done
    echo "meshd on $1 did not become ready; see $STATE/*.log" >&2; exit 1
}
wait_ready 127.0.0.3
wait_ready 127.0.0.2
echo "meshd is up: alpha (127.0.0.2) and beta (127.0.0.3). Logs: $STATE/alpha.log, $STATE/beta.log"

$PY - <<'PYEOF'
import json, socket, time, urllib.request
# alpha learns beta's catalog (static peer) within a second or two of both being up.
for _ in range(100):
    dump = json.load(urllib.request.urlopen("http://127.0.0.2:15000/config_dump", timeout=2))
    if "echo.default" in dump["catalog"]["services"]:
        break
    time.sleep(0.1)
with socket.create_connection(("127.0.0.1", 17000), timeout=5) as s:
    s.sendall(b"hello through the mesh\n")
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
print("app on alpha -> 127.0.0.1:17000 -> HBONE mTLS -> beta -> echo:", reply.decode().strip())
PYEOF

cat <<'TXT'
Try:
  printf 'hi\n' | nc -q1 127.0.0.1 17000          # through the mesh (alpha -> beta -> echo)
  curl -s 127.0.0.2:15000/config_dump              # alpha's state (admin API)
  curl -s 127.0.0.3:15020/metrics | grep istio_tcp # beta's TCP telemetry
TXT
[ "${DEMO_ONESHOT:-0}" = 1 ] && exit 0
echo "Ctrl-C to stop."
wait
