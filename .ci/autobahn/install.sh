#!/usr/bin/env bash
# Install the Autobahn TestSuite (`wstest`) into target/autobahn/ of this repo.
#
# autobahntestsuite is Python 2.7 code and Debian 12 ships no Python 2, so this:
#   1. sets up a private apt state (own sources/lists/cache/status, nothing
#      touches the system's) for Debian 11 "bullseye" + "bullseye-security" on
#      the mirror the machine's apt sources already use, and `apt-get download`s
#      python2.7 and the few libraries it needs that bookworm lacks;
#   2. unpacks them with `dpkg-deb -x` into target/autobahn/py27;
#   3. creates a Python 3 venv with virtualenv==20.21.1 (last release able to
#      create 2.7 environments) and with it a Python 2.7 virtualenv;
#   4. pip-installs the pins from requirements-py27.txt into it;
#   5. writes target/autobahn/bin/wstest, a wrapper that needs no environment.
#
# Idempotent: a stamp (hash of this script + the pins) makes a second run a
# fast no-op. The wrapper's path is the only thing printed on stdout; progress
# goes to stderr, so callers can do WSTEST=$(.ci/autobahn/install.sh).
#
# Overrides (optional): AUTOBAHN_DIR (install dir), AUTOBAHN_DEBIAN_MIRROR,
# AUTOBAHN_DEBIAN_SECURITY_MIRROR (e.g. http://deb.debian.org/debian[-security]),
# PYTHON3 (python3 used for the helper venv).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${AUTOBAHN_DIR:-$repo/target/autobahn}
reqs=$here/requirements-py27.txt
wrapper=$dest/bin/wstest
stamp=$dest/.install-stamp

log() { printf 'autobahn-install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

want_stamp=$(cat "$here/install.sh" "$reqs" | sha256sum | cut -d' ' -f1)

is_installed() {
  # (the wrapper holds absolute paths: a moved checkout reinstalls)
  [[ -f $stamp && "$(cat "$stamp")" == "$want_stamp" && -x $wrapper && -x $dest/venv27/bin/wstest ]] &&
    grep -qF "$dest/venv27/bin/wstest" "$wrapper"
}

if is_installed; then
  echo "$wrapper"
  exit 0
fi

mkdir -p "$dest"
# Serialise concurrent installs (e.g. two runs started at once).
exec 9>"$dest/.install-lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 900 9 || die "timed out waiting for another install to finish"
  if is_installed; then echo "$wrapper"; exit 0; fi
fi

start=$SECONDS
as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $*"; fi
}
apt_system_install() {
  log "installing system package(s): $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
    || { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
}

# Start from a clean slate for everything but reports/.
rm -rf "$stamp" "$dest/apt" "$dest/debs" "$dest/py27" "$dest/venv3" "$dest/venv27" \
       "$dest/bin" "$dest/appdata"

# --- 0. prerequisites -------------------------------------------------------
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -s $keyring ]] || apt_system_install debian-archive-keyring
[[ -s $keyring ]] || die "$keyring missing"
for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs Debian/Ubuntu)"
done
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || apt_system_install gcc libc6-dev

# --- 1. which Debian mirror --------------------------------------------------
# URIs from one-line (.list) and deb822 (.sources) apt sources, comments dropped.
list_apt_uris() {
  local f
  shopt -s nullglob
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    sed -e 's/#.*//' -e 's/\[[^]]*\]//g' "$f" | awk '$1 == "deb" || $1 == "deb-src" { print $2 }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    sed -e 's/#.*//' "$f" | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }'
  done
  shopt -u nullglob
}
uris=$(list_apt_uris | sed -e 's:/*$::' | grep -E '^https?://' || true)
mirror=${AUTOBAHN_DEBIAN_MIRROR:-$(grep -E '/debian$' <<<"$uris" | head -n1 || true)}
security=${AUTOBAHN_DEBIAN_SECURITY_MIRROR:-$(grep -E '/debian-security$' <<<"$uris" | head -n1 || true)}
if [[ -z $security && -n $mirror ]]; then
  # deb.debian.org style hosts serve both trees side by side.
  case $mirror in
    */deb.debian.org/debian) security=${mirror}-security ;;
  esac
fi
mirror=${mirror:-http://deb.debian.org/debian}
security=${security:-http://deb.debian.org/debian-security}
log "mirrors: $mirror (bullseye), $security (bullseye-security)"

# --- 2. private apt state + download ----------------------------------------
apt=$dest/apt
mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/state/lists/partial" \
         "$apt/cache/archives/partial" "$dest/debs"
: >"$apt/state/status"
cat >"$apt/etc/sources.list" <<EOF
deb [signed-by=$keyring] $mirror bullseye main
deb [signed-by=$keyring] $security bullseye-security main
EOF
apt_opts=(
  -o "Dir::Etc::SourceList=$apt/etc/sources.list"
  -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$apt/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
  -o "Dir::State=$apt/state"
  -o "Dir::State::Lists=$apt/state/lists"
  -o "Dir::State::status=$apt/state/status"
  -o "Dir::Cache=$apt/cache"
  -o "Dir::Cache::Archives=$apt/cache/archives"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  -o "APT::Sandbox::User=root"
  -o "Acquire::Languages=none"
  -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
  -o "Acquire::Retries=3"
  -o "Acquire::http::Timeout=60"
  -o "Acquire::https::Timeout=60"
  -o "Debug::NoLocking=1"
)
log "apt-get update (private bullseye state)"
timeout 600 apt-get "${apt_opts[@]}" -q update >&2 || die "apt-get update for bullseye failed"
debs=(python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib
      libpython2.7-dev python2.7-dev libssl1.1 libffi7)
log "apt-get download ${debs[*]}"
(cd "$dest/debs" && timeout 600 apt-get "${apt_opts[@]}" -q download "${debs[@]}" >&2) \
  || die "apt-get download failed"

# --- 3. unpack ---------------------------------------------------------------
py27=$dest/py27
mkdir -p "$py27"
for deb in "$dest"/debs/*.deb; do
  dpkg-deb -x "$deb" "$py27"
done
libdir=$(ls -d "$py27"/usr/lib/*-linux-gnu* 2>/dev/null | head -n1)
[[ -n $libdir && -x $py27/usr/bin/python2.7 ]] || die "unpacked python2.7 not found in $py27"
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
unset PYTHONHOME PYTHONPATH
"$py27/usr/bin/python2.7" -c 'import ssl, ctypes, zlib, hashlib' \
  || die "private python2.7 does not start or lacks ssl/ctypes"

# --- 4. virtualenvs ----------------------------------------------------------
py3=${PYTHON3:-}
if [[ -z $py3 ]]; then
  for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv, ensurepip' 2>/dev/null; then
      py3=$cand; break
    fi
  done
fi
if [[ -z $py3 ]]; then
  apt_system_install python3-venv
  py3=/usr/bin/python3
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PIP_NO_INPUT=1
log "python3 venv with virtualenv==20.21.1 (using $py3)"
"$py3" -m venv "$dest/venv3"
"$dest/venv3/bin/python" -m pip install -q virtualenv==20.21.1 >&2
log "python2.7 virtualenv"
"$dest/venv3/bin/virtualenv" -q --app-data "$dest/appdata" --no-periodic-update \
  -p "$py27/usr/bin/python2.7" "$dest/venv27" >&2
log "pip install -r requirements-py27.txt"
C_INCLUDE_PATH="$py27/usr/include/python2.7:$py27/usr/include${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}" \
  timeout 900 "$dest/venv27/bin/python" -m pip install -q -r "$reqs" >&2
[[ -x $dest/venv27/bin/wstest ]] || die "wstest was not installed"

# --- 5. wrapper --------------------------------------------------------------
mkdir -p "$dest/bin"
cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# Generated by .ci/autobahn/install.sh: runs wstest from the private Python 2.7.
unset PYTHONHOME PYTHONPATH
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$dest/venv27/bin/wstest" "\$@"
EOF
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --help >/dev/null 2>&1 || die "$wrapper --help failed"

# Downloaded archives and apt lists are no longer needed.
rm -rf "$dest/apt" "$dest/debs"
echo "$want_stamp" >"$stamp"
log "done in $((SECONDS - start)) s"
echo "$wrapper"
