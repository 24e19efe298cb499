#!/bin/sh
# websocat for the tests: the real client the README's chat sessions use,
# built from crates.io into target/websocat on first use.
#
#   install.sh          build it unless it is there; print its path
#   install.sh --check  exit 0 if it is there (nothing to build), 1 if not
#
# Its wss:// support (native-tls) links OpenSSL: libssl-dev and pkg-config
# are installed with apt when missing (needs root; `apt-get update` only
# if the first attempt fails).
set -eu

VERSION=1.14.1
root="$(cd "$(dirname "$0")/../.." && pwd)/target/websocat"
bin="$root/bin/websocat"

installed() {
    [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "websocat $VERSION"
}

if [ "${1:-}" = --check ]; then
    installed
    exit
fi

if installed; then
    echo "$bin"
    exit 0
fi

if ! pkg-config --exists openssl 2>/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "websocat/install.sh: OpenSSL's headers (libssl-dev, pkg-config) are missing and cannot be installed with apt here" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends libssl-dev pkg-config >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends libssl-dev pkg-config >&2
    fi
fi

# --quiet: the caller reads this output only once the build is over.
"${CARGO:-cargo}" install --quiet websocat --version "$VERSION" --locked --root "$root" \
    --target-dir "$root/build" >&2
rm -rf "$root/build"
echo "$bin"
