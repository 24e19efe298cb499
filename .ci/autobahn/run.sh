#!/usr/bin/env bash
# Run the Autobahn fuzzingclient against a WebSocket echo server that is
# already listening on ws://127.0.0.1:PORT/echo (with --tls:
# wss://127.0.0.1:PORT/echo; wstest does not verify the certificate, so a
# self-signed one made for the test will do), then check the results.
# --spec NAME picks the cases: .ci/autobahn/NAME.json (default
# fuzzingclient: every case, 1-13; the compression cases 12 and 13 need a
# server started with --compression, and take most of the time).
#   usage: .ci/autobahn/run.sh [--tls] [--spec NAME] PORT
# Exit status is non-zero if wstest could not run, timed out, or any case did
# not get its expected outcome (see check.py and expected.json).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

usage() { echo "usage: $0 [--tls] [--spec NAME] PORT" >&2; exit 2; }
scheme=ws
spec_name=fuzzingclient
while [[ ${1:-} == --* ]]; do
  case $1 in
    --tls) scheme=wss; shift ;;
    --spec) [[ $# -ge 2 ]] || usage; spec_name=$2; shift 2 ;;
    *) usage ;;
  esac
done
port=${1:-}
[[ $port =~ ^[0-9]+$ ]] || usage
src=$here/$spec_name.json
[[ -f $src ]] || { echo "autobahn: no spec $src" >&2; exit 2; }

wstest=$(bash "$here/install.sh")
work=$repo/target/autobahn
# Each spec and scheme has its own files, so runs can go at once.
name=$spec_name-$scheme
spec=$work/$name.json
reports=$work/reports/$name
log=$work/wstest-$name.log

# Stale reports would let check.py pass on an old run: start clean.
rm -rf "$reports"
mkdir -p "$reports"
python3 - "$src" "$spec" "$port" "$reports" "$scheme" <<'PY'
import json, sys
src, dst, port, outdir, scheme = sys.argv[1:]
with open(src) as f:
    spec = json.load(f)
for server in spec["servers"]:
    url = server["url"].replace("PORT", port)
    server["url"] = scheme + url[url.index(":"):]
spec["outdir"] = outdir
with open(dst, "w") as f:
    json.dump(spec, f, indent=2)
PY

echo "autobahn: running wstest fuzzingclient ($spec_name) against $scheme://127.0.0.1:$port/echo" >&2
cd "$work"
rc=0
timeout -k 10 "${AUTOBAHN_TIMEOUT:-1800}" "$wstest" -m fuzzingclient -s "$spec" >"$log" 2>&1 || rc=$?
if [[ $rc -ne 0 ]]; then
  tail -n 30 "$log" | cut -c1-300 >&2
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "autobahn: wstest timed out after ${AUTOBAHN_TIMEOUT:-1800} s (log: $log)" >&2
  else
    echo "autobahn: wstest exited with status $rc (log: $log)" >&2
  fi
  exit 1
fi
exec python3 "$here/check.py" "$reports" "$here/expected.json" --spec "$src"
