#!/bin/sh
# Redis for the tests: Debian's redis-server, on loopback only.
#
#   start-redis.sh check            exit 0 if redis-server is installed
#                                   (nothing to install), 1 if not
#   start-redis.sh install          install redis-server with apt if it is
#                                   missing; print its path
#   start-redis.sh run PORT DIR     exec redis-server on 127.0.0.1:PORT with
#                                   no persistence, working directory DIR
#                                   (the caller owns the process and stops it)
#
# Installing needs root and a Debian mirror; `apt-get update` runs only when
# the package is not known to apt yet or the first install attempt fails.
set -eu

find_server() {
    command -v redis-server 2>/dev/null && return 0
    for p in /usr/bin/redis-server /usr/local/bin/redis-server; do
        if [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

install_server() {
    if find_server >/dev/null; then return 0; fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "start-redis.sh: redis-server is missing and apt-get is not available" >&2
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "start-redis.sh: redis-server is missing; installing it with apt needs root" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends redis-server >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends redis-server >&2
    fi
    # The package's own service (if an init system started one) is not ours.
    if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
    find_server >/dev/null || {
        echo "start-redis.sh: apt-get finished but redis-server is still missing" >&2
        return 1
    }
}

case "${1:-}" in
check)
    find_server >/dev/null
    ;;
install)
    install_server
    find_server
    ;;
run)
    [ $# -eq 3 ] || { echo "usage: start-redis.sh run PORT DIR" >&2; exit 2; }
    install_server
    server=$(find_server)
    exec "$server" --bind 127.0.0.1 --port "$2" --dir "$3" \
        --save '' --appendonly no --protected-mode yes --daemonize no \
        --logfile '' --loglevel warning
    ;;
*)
    echo "usage: start-redis.sh check | install | run PORT DIR" >&2
    exit 2
    ;;
esac
