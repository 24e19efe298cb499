#!/usr/bin/env bash
# Creates the venv the Python client test runs in: target/python-venv, with
# the pins of tests/python/requirements.txt (websocket-client).
#
# Idempotent and cached: a stamp (hash of this script and the pins) makes a
# second run a fast no-op; concurrent runs wait on a lock. The venv's python
# is the only thing printed on stdout (progress goes to stderr), so callers
# can do PY=$(tests/python/setup-venv.sh).
#
# Needs a python3 with the venv module and ensurepip. On Debian/Ubuntu
# without them (Debian splits them into python3-venv), it apt-get installs
# python3-venv (and python3 if there is none), as root or through sudo -n.
#
# Overrides (optional): PYTHON_VENV_DIR (the venv), PYTHON3 (the python3
# to build it from).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
venv=${PYTHON_VENV_DIR:-$target/python-venv}
reqs=$here/requirements.txt
stamp=$venv/.setup-stamp

log() { printf 'setup-venv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

want_stamp=$(cat "$here/setup-venv.sh" "$reqs" | sha256sum | cut -d' ' -f1)

is_ready() {
  [[ -f $stamp && "$(cat "$stamp")" == "$want_stamp" && -x $venv/bin/python ]] &&
    "$venv/bin/python" -c 'import websocket' 2>/dev/null
}

# --check: exit 0 if everything is in place (nothing to install), 1 if not.
if [[ ${1:-} == --check ]]; then
  if is_ready; then exit 0; else exit 1; fi
fi

if is_ready; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
# Serialise concurrent setups (two test binaries, or two cargo runs).
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 600 9 || die "timed out waiting for another setup to finish"
  if is_ready; then echo "$venv/bin/python"; exit 0; fi
fi

start=$SECONDS
as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $*"; fi
}
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "no usable python3 venv and no apt-get to install one (install python3 with its venv module)"
  log "installing system package(s): $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
    || { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; } \
    || die "apt-get install $* failed"
}
can_venv() { "$1" -c 'import venv, ensurepip' 2>/dev/null; }

# --- a python3 that can make venvs -------------------------------------------
py3=${PYTHON3:-}
if [[ -n $py3 ]]; then
  can_venv "$py3" || die "PYTHON3=$py3 lacks the venv module or ensurepip"
else
  for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && can_venv "$cand"; then
      py3=$cand; break
    fi
  done
fi
if [[ -z $py3 ]]; then
  # Debian ships venv/ensurepip apart from python3 itself.
  if [[ -x /usr/bin/python3 ]]; then
    ver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install python3-venv "python$ver-venv"
  else
    apt_install python3 python3-venv
  fi
  py3=/usr/bin/python3
  can_venv "$py3" || die "$py3 still cannot create venvs"
fi

# --- the venv ----------------------------------------------------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PIP_NO_INPUT=1
unset PYTHONHOME PYTHONPATH
rm -rf "$venv" "$stamp"
log "creating $venv (with $("$py3" --version 2>&1) from $py3)"
"$py3" -m venv "$venv" >&2 || die "python3 -m venv failed"
log "pip install -r $reqs"
timeout 600 "$venv/bin/python" -m pip install -q -r "$reqs" >&2 || die "pip install failed"
"$venv/bin/python" -c 'import websocket' || die "websocket-client did not install"
echo "$want_stamp" >"$stamp"
log "ready in $((SECONDS - start)) s"
echo "$venv/bin/python"
