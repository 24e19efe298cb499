#!/usr/bin/env bash
# Sets up what the browser test (tests/integration/browser.rs) needs:
#   - Debian's `chromium` (apt-get, as root or through sudo -n) when
#     /usr/bin/chromium is missing; never a browser download of Playwright's
#     own (`npx playwright install` needs hosts the test machines cannot reach);
#   - node (Debian's `nodejs` + `npm` when there is no node at all);
#   - playwright-core, pinned by package.json + package-lock.json beside this
#     script, installed with `npm ci` into target/browser-test/node_modules
#     (never into the source tree).
#
# Idempotent and cached: a stamp (hash of this script and the npm pins) makes
# a second run a fast no-op; concurrent runs wait on a lock. On success it
# prints, on stdout and nothing else, what it set up as KEY=VALUE lines:
#   CHROMIUM=/usr/bin/chromium
#   NODE=/usr/bin/node
#   NODE_PATH=/…/target/browser-test/node_modules
# Progress and the reason for any failure go to stderr.
#
# Overrides (optional): CHROMIUM (the browser binary), BROWSER_TEST_DIR (the
# install dir, default target/browser-test).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
dest=${BROWSER_TEST_DIR:-$target/browser-test}
chromium=${CHROMIUM:-/usr/bin/chromium}
stamp=$dest/.setup-stamp

log() { printf 'browser-setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

want_stamp=$(cat "$here/setup.sh" "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)

report() {
  echo "CHROMIUM=$chromium"
  echo "NODE=$(command -v node)"
  echo "NODE_PATH=$dest/node_modules"
}

is_ready() {
  [[ -x $chromium ]] && command -v node >/dev/null 2>&1 &&
    [[ -f $stamp && "$(cat "$stamp")" == "$want_stamp" ]] &&
    [[ -f $dest/node_modules/playwright-core/package.json ]]
}

# --check: exit 0 if everything is in place (nothing to install), 1 if not.
if [[ ${1:-} == --check ]]; then
  if is_ready; then exit 0; else exit 1; fi
fi

if is_ready; then
  report
  exit 0
fi

mkdir -p "$dest"
# Serialise concurrent setups (two test binaries, or two cargo runs).
exec 9>"$dest/.setup-lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 900 9 || die "timed out waiting for another setup to finish"
  if is_ready; then report; exit 0; fi
fi

start=$SECONDS
as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $* (or install it by hand)"; fi
}
apt_updated=
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand (this script needs Debian/Ubuntu)"
  # The package lists of a fresh machine may be missing or stale: update
  # them once per run before the first install.
  if [[ -z $apt_updated ]]; then
    log "apt-get update"
    as_root timeout 600 apt-get update -q >&2 || die "apt-get update failed (no network to the Debian mirror?)"
    apt_updated=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed (see apt's message above)"
}

# --- the browser -------------------------------------------------------------
if [[ ! -x $chromium ]]; then
  [[ $chromium == /usr/bin/chromium ]] || die "CHROMIUM=$chromium is not an executable"
  # fonts-liberation: without any font Chromium draws every label as boxes.
  apt_install chromium fonts-liberation
  [[ -x $chromium ]] || die "apt-get installed chromium but $chromium is still missing"
fi
log "browser: $("$chromium" --version 2>/dev/null || echo "$chromium (version unknown)")"

# --- node + npm --------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
command -v node >/dev/null 2>&1 || die "node is still missing after installing nodejs"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[[ $node_major -ge 18 ]] || die "node $(node --version) is too old: playwright-core needs node 18 or newer"
log "node $(node --version), npm $(npm --version 2>/dev/null)"

# --- playwright-core -----------------------------------------------------------
# npm ci wants package.json and its lockfile side by side: copy both into the
# install dir so that node_modules lands under target/, not in the repo.
rm -f "$stamp"
cp "$here/package.json" "$here/package-lock.json" "$dest/"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm_config_audit=false npm_config_fund=false \
  npm_config_update_notifier=false
log "npm ci (playwright-core) in $dest"
(cd "$dest" && timeout 600 npm ci --no-audit --no-fund --loglevel=error >&2) \
  || die "npm ci failed (no network to the npm registry?)"
[[ -f $dest/node_modules/playwright-core/package.json ]] || die "playwright-core did not install"

echo "$want_stamp" >"$stamp"
log "ready in $((SECONDS - start)) s"
report
