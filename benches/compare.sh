#!/usr/bin/env bash
# fanout against tokio-tungstenite (current_thread), and uWebSockets when
# its peers are given, workload by workload.
#
#   bash benches/compare.sh [--quick] [--rounds R] [--duration SECS]
#                           [--idle-conns N] [--idle-hold SECS]
#                           [--workloads W,W...]
#                           [--uws-echo BIN] [--uws-broadcast BIN]
#                           [--baseline FANOUT_BINARY] [-- FANOUT_FLAGS...]
#
# Builds fanout, benches/loadgen and benches/peer-tokio (release), then runs
# every workload R times (default 5) against each server, alternating which
# goes first, with a fresh server per run pinned to CPU 0 and the load
# generator pinned to CPU 1. The echo and broadcast workloads also run
# against a floor: loadgen's own TCP echo (tcp-echo-server) or fan-out
# (tcp-fanout-server) without WebSocket, in a loop built like fanout's,
# showing how much of the cost is the kernel's. Prints the medians and the ratios fanout/peer and floor/peer
# as a markdown table (also written, with every raw summary line, under
# target/compare/). A default run takes about 12 minutes on 2 cores (85 runs).
# --quick: 1 round, 2 s per run, small counts: a smoke test, not figures.
# --workloads: a subset of echo-32B,echo-16KiB,echo-1MiB,broadcast-64B,
#   broadcast-10k,idle.
# --baseline BIN: the peer is another fanout binary (e.g. an earlier build)
# instead of tokio-tungstenite, to show a change costs nothing; flags after
# `--` go to the fanout under test only (e.g. `-- --compression shared`).
# --uws-echo BIN, --uws-broadcast BIN: uWebSockets peers, built outside this
# repository (benches/README.md says how), each started as `BIN PORT` on
# 127.0.0.1, plain ws://, compression off. The echo one also serves the idle
# workload; the broadcast one relays every message to every connection
# (loadgen --peer-protocol relay). They run in every round beside the others
# and add a uWebSockets column and fanout/uWS to the table.
# Honours CARGO_TARGET_DIR (fanout, loadgen and peer-tokio then share it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=5
DURATION=5
WARMUP=1
IDLE_CONNS=19000
IDLE_HOLD=2
ECHO_CONNS=100
SUBS=1000
BIG_SUBS=10000
QUICK=0
ONLY=""
BASELINE=""
UWS_ECHO=""
UWS_BROADCAST=""
FANOUT_FLAGS=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --idle-conns) IDLE_CONNS=$2; shift ;;
        --idle-hold) IDLE_HOLD=$2; shift ;;
        --baseline) BASELINE=$(realpath "$2"); shift ;;
        --uws-echo) UWS_ECHO=$(realpath "$2"); shift ;;
        --uws-broadcast) UWS_BROADCAST=$(realpath "$2"); shift ;;
        --workloads) ONLY=$2; shift ;;
        --) shift; FANOUT_FLAGS=("$@"); break ;;
        -h|--help) usage ;;
        *) echo "compare.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
WORKLOADS=(echo-32B echo-16KiB echo-1MiB broadcast-64B broadcast-10k idle)
if [ -n "$ONLY" ]; then
    IFS=, read -r -a chosen <<<"$ONLY"
    for w in "${chosen[@]}"; do
        case " ${WORKLOADS[*]} " in *" $w "*) ;; *) echo "compare.sh: unknown workload $w" >&2; exit 2 ;; esac
    done
    WORKLOADS=("${chosen[@]}")
fi
if [ "$QUICK" = 1 ]; then
    ROUNDS=1 DURATION=2 WARMUP=0.5 IDLE_CONNS=1000 IDLE_HOLD=1 ECHO_CONNS=20 SUBS=100 BIG_SUBS=1000
fi

log() { echo "compare.sh: $*" >&2; }
for peer in "$UWS_ECHO" "$UWS_BROADCAST"; do
    if [ -n "$peer" ] && [ ! -x "$peer" ]; then
        log "$peer is not an executable (benches/README.md, 'uWebSockets peers', says what it must be)"
        exit 2
    fi
done

# --- tools and limits -------------------------------------------------------
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    PIN_SERVER=(taskset -c 0)
    PIN_LOAD=(taskset -c 1)
else
    log "taskset (util-linux) or a second CPU is missing: running unpinned, figures are not comparable"
    PIN_SERVER=()
    PIN_LOAD=()
fi
need_fds=$((IDLE_CONNS + 200))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need_fds" ]; then
    ulimit -Hn "$need_fds" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fds=$(ulimit -n)
if [ "$fds" != unlimited ] && [ "$fds" -lt "$need_fds" ]; then
    IDLE_CONNS=$((fds - 200))
    log "open file limit is $fds: idle connections lowered to $IDLE_CONNS"
fi

# --- build -------------------------------------------------------------------
log "building (release): fanout, loadgen, peer-tokio"
(cd "$ROOT" && cargo build --release --quiet --bin fanout)
cargo build --release --quiet --manifest-path "$ROOT/benches/loadgen/Cargo.toml"
cargo build --release --quiet --manifest-path "$ROOT/benches/peer-tokio/Cargo.toml"
# Where cargo put them: each crate's own target/, or one CARGO_TARGET_DIR.
built() { # crate-dir binary
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        echo "$(cd "$ROOT" && realpath -m "$CARGO_TARGET_DIR")/release/$2"
    else
        echo "$1/target/release/$2"
    fi
}

WORK=$(mktemp -d /tmp/fanout-compare.XXXXXX)
# Private copies: a rebuild elsewhere during the run changes nothing here.
cp "$(built "$ROOT" fanout)" "$WORK/fanout"
cp "$(built "$ROOT/benches/loadgen" loadgen)" "$WORK/loadgen"
if [ -n "$BASELINE" ]; then
    [ -x "$BASELINE" ] || { log "--baseline $BASELINE is not an executable"; exit 2; }
    cp "$BASELINE" "$WORK/peer"
    PEER_NAME="baseline fanout ($(basename "$BASELINE"))"
else
    cp "$(built "$ROOT/benches/peer-tokio" peer-tokio)" "$WORK/peer"
    PEER_NAME="tokio-tungstenite"
fi
if [ -n "$UWS_ECHO" ]; then cp "$UWS_ECHO" "$WORK/uws-echo"; fi
if [ -n "$UWS_BROADCAST" ]; then cp "$UWS_BROADCAST" "$WORK/uws-broadcast"; fi
OUTDIR="$ROOT/target/compare"
mkdir -p "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="$OUTDIR/results-$STAMP.txt"
SUMMARY="$OUTDIR/summary-$STAMP.md"
: >"$RESULTS"

SERVER_PID=""
LOAD_PID=""
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
cleanup() {
    if [ -n "$LOAD_PID" ]; then
        kill -TERM "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The uWebSockets peer of a workload (empty when it was not given).
uws_for() { # workload
    case "$1" in
        broadcast*) echo "$UWS_BROADCAST" ;;
        *) echo "$UWS_ECHO" ;;
    esac
}

# A port nothing listens on, below Linux's ephemeral range (32768-60999) so
# no client socket of an earlier run holds it.
unused_port() {
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 12000))
        if ! (: <>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# A uWebSockets peer prints nothing when it listens: it is ready once its
# port accepts a connection. A port taken meanwhile makes it exit at once
# ("cannot listen"), and another port is tried.
start_uws() { # workload
    local bin tries
    bin=$WORK/uws-echo
    case "$1" in broadcast*) bin=$WORK/uws-broadcast ;; esac
    for tries in 1 2 3; do
        PORT=$(unused_port) || { log "no unused port found"; return 1; }
        IPORT=""
        "${PIN_SERVER[@]}" "$bin" "$PORT" >"$WORK/server.out" 2>>"$OUTDIR/server-stderr-$STAMP.log" &
        SERVER_PID=$!
        for _ in $(seq 100); do
            if (: <>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        log "uws $(basename "$bin") did not listen on $PORT (try $tries)"
        stop_server
    done
    return 1
}

# start_server fanout|peer|floor|uws WORKLOAD: sets SERVER_PID, PORT and IPORT.
start_server() {
    : >"$WORK/server.out"
    local want
    if [ "$1" = uws ]; then
        start_uws "$2"
        return
    elif [ "$1" = fanout ] || { [ "$1" = peer ] && [ -n "$BASELINE" ]; }; then
        local bin=$WORK/fanout extra=("${FANOUT_FLAGS[@]}")
        if [ "$1" = peer ]; then bin=$WORK/peer extra=(); fi
        # --no-sim: the peer has no market simulator either.
        RUST_LOG=warn "${PIN_SERVER[@]}" "$bin" --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0 \
            --no-sim --max-outbound-buffer 64MiB "${extra[@]}" >"$WORK/server.out" 2>>"$OUTDIR/server-stderr-$STAMP.log" &
        want=2
    elif [ "$1" = floor ] && [ "${2#broadcast}" != "$2" ]; then
        "${PIN_SERVER[@]}" "$WORK/loadgen" tcp-fanout-server --listen 127.0.0.1:0 --publish-listen 127.0.0.1:0 \
            >"$WORK/server.out" 2>>"$OUTDIR/server-stderr-$STAMP.log" &
        want=2
    elif [ "$1" = floor ]; then
        "${PIN_SERVER[@]}" "$WORK/loadgen" tcp-echo-server --listen 127.0.0.1:0 \
            >"$WORK/server.out" 2>>"$OUTDIR/server-stderr-$STAMP.log" &
        want=1
    else
        "${PIN_SERVER[@]}" "$WORK/peer" --listen 127.0.0.1:0 \
            >"$WORK/server.out" 2>>"$OUTDIR/server-stderr-$STAMP.log" &
        want=1
    fi
    SERVER_PID=$!
    for _ in $(seq 100); do
        [ "$(grep -c 'listening on \(ws\|tcp\)://' "$WORK/server.out" || true)" -ge "$want" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { log "$1 exited at start"; return 1; }
        sleep 0.1
    done
    PORT=$(sed -n '1s/.*:\([0-9]*\)$/\1/p' "$WORK/server.out")
    IPORT=$(sed -n '2s/.*:\([0-9]*\)$/\1/p' "$WORK/server.out")
    [ -n "$PORT" ] || { log "$1 printed no address"; return 1; }
}

# The workloads: name, then the loadgen arguments for each server.
declare -A NAME
NAME[echo-32B]="echo, $ECHO_CONNS conns × 32 B text, 16 in flight"
NAME[echo-16KiB]="echo, 10 conns × 16 KiB binary, 1 in flight"
NAME[echo-1MiB]="echo, 1 conn × 1 MiB binary"
NAME[broadcast-64B]="broadcast 64 B to $SUBS subscribers, 16 in flight"
NAME[broadcast-10k]="broadcast 64 B to $BIG_SUBS subscribers, 4 in flight"
NAME[idle]="$IDLE_CONNS idle upgraded connections"
declare -A TARGET
TARGET[echo-32B]="≤ 0.35"
TARGET[echo-16KiB]="≤ 0.45"
TARGET[echo-1MiB]="≤ 0.70"
TARGET[broadcast-64B]="≤ 0.50"
TARGET[broadcast-10k]="sustained, no stalls"
TARGET[idle]="≤ 0.3 KiB"

broadcast_args() { # server subscribers in-flight timing...
    local server=$1 subs=$2 inflight=$3
    shift 3
    if [ "$server" = floor ]; then
        # The floor: the same messages copied byte for byte over plain TCP
        # (loadgen's tcp-fanout-server).
        echo broadcast --url "tcp://127.0.0.1:$PORT/sub" --publish-url "tcp://127.0.0.1:$IPORT/pub" \
            --subs "$subs" --size 64 --inflight "$inflight" "$@"
    elif [ "$server" = uws ]; then
        # uws-broadcast: every connection is subscribed on open and gets
        # every message as it was sent (the paths are not looked at).
        echo broadcast --url "ws://127.0.0.1:$PORT/sub" --publish-url "ws://127.0.0.1:$PORT/pub" \
            --peer-protocol relay --subs "$subs" --size 64 --inflight "$inflight" "$@"
    elif [ "$server" = fanout ] || [ -n "$BASELINE" ]; then
        echo broadcast --url "ws://127.0.0.1:$PORT/ws" --publish-url "ws://127.0.0.1:$IPORT/ws" \
            --subs "$subs" --size 64 --inflight "$inflight" "$@"
    else
        echo broadcast --url "ws://127.0.0.1:$PORT/sub" --publish-url "ws://127.0.0.1:$PORT/pub" \
            --peer-protocol raw --subs "$subs" --size 64 --inflight "$inflight" "$@"
    fi
}

loadgen_args() { # workload server
    local timing=(--duration "$DURATION" --warmup "$WARMUP")
    local echo_url="ws://127.0.0.1:$PORT/echo"
    # The floor: the same echo over plain TCP, no WebSocket (loadgen's
    # tcp-echo-server, a loop built like fanout's).
    if [ "$2" = floor ]; then echo_url="tcp://127.0.0.1:$PORT"; fi
    case "$1" in
        echo-32B) echo echo --url "$echo_url" --conns "$ECHO_CONNS" --size 32 --inflight 16 "${timing[@]}" ;;
        echo-16KiB) echo echo --url "$echo_url" --conns 10 --size 16KiB --inflight 1 --binary "${timing[@]}" ;;
        echo-1MiB) echo echo --url "$echo_url" --conns 1 --size 1MiB --inflight 1 --binary "${timing[@]}" ;;
        broadcast-64B) broadcast_args "$2" "$SUBS" 16 "${timing[@]}" ;;
        broadcast-10k) broadcast_args "$2" "$BIG_SUBS" 4 "${timing[@]}" ;;
        idle) echo connections --url "$echo_url" --conns "$IDLE_CONNS" --hold "$IDLE_HOLD" ;;
    esac
}

run_one() { # workload server round
    local line rc=0
    start_server "$2" "$1" || { echo "$1 $2 $3 FAILED server did not start" >>"$RESULTS"; stop_server; return; }
    # shellcheck disable=SC2046 # word splitting of the argument list is wanted
    "${PIN_LOAD[@]}" timeout 180 "$WORK/loadgen" $(loadgen_args "$1" "$2") --pid "$SERVER_PID" \
        >"$WORK/load.out" 2>"$WORK/load.err" &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    kill -0 "$SERVER_PID" 2>/dev/null || log "$2 died during $1"
    stop_server
    line=$(grep '^loadgen ' "$WORK/load.out" || true)
    if [ "$rc" != 0 ] || [ -z "$line" ]; then
        line="FAILED rc=$rc $(tr '\n' ' ' <"$WORK/load.err")"
    fi
    echo "$1 $2 $3 $line" >>"$RESULTS"
    log "round $3 $1 $2: ${line#loadgen }"
}

floors=0 uws_runs=0
for w in "${WORKLOADS[@]}"; do
    [ "$w" = idle ] || floors=$((floors + 1))
    [ -z "$(uws_for "$w")" ] || uws_runs=$((uws_runs + 1))
done
runs=$(((${#WORKLOADS[@]} * 2 + floors + uws_runs) * ROUNDS))
log "$runs runs: $ROUNDS round(s), ${DURATION}s per run; raw lines in $RESULTS"
for round in $(seq "$ROUNDS"); do
    for w in "${WORKLOADS[@]}"; do
        if [ $((round % 2)) = 1 ]; then order="fanout peer"; else order="peer fanout"; fi
        # uWebSockets first in odd rounds, last in even ones.
        if [ -n "$(uws_for "$w")" ]; then
            if [ $((round % 2)) = 1 ]; then order="uws $order"; else order="$order uws"; fi
        fi
        if [ "$w" != idle ]; then order="$order floor"; fi
        for s in $order; do
            run_one "$w" "$s" "$round"
        done
    done
done

# --- medians -----------------------------------------------------------------
# Results lines: WORKLOAD SERVER ROUND loadgen key=value ... [# comment]
median() { # key workload server
    awk -v k="$1" -v w="$2" -v s="$3" '
        $1 == w && $2 == s && $4 == "loadgen" {
            for (i = 5; i <= NF && $i != "#"; i++) {
                n = index($i, "=")
                if (substr($i, 1, n - 1) == k) { v = substr($i, n + 1); if (v ~ /^-?[0-9.]+$/) print v }
            }
        }' "$RESULTS" | sort -g |
        awk '{ a[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a"; else if (a / b >= 0.1) printf "%.2f", a / b; else printf "%.2g", a / b }'
}
fmt() { awk -v v="$1" 'BEGIN { if (v == "n/a") print v; else if (v >= 100) printf "%.0f", v; else printf "%.3g", v }'; }

{
    uws_line=""
    if [ -n "$UWS_ECHO$UWS_BROADCAST" ]; then
        uws_line=" and uWebSockets"
    fi
    echo "fanout ${FANOUT_FLAGS[*]} vs $PEER_NAME$uws_line: medians of $ROUNDS run(s) each, ${DURATION}s measured per run;"
    echo "server on CPU 0, load generator on CPU 1; $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs."
    if [ "$QUICK" = 1 ]; then echo "QUICK SMOKE RUN: the figures below are not measurements."; fi
    echo
    uws_head="" uws_rule=""
    if [ -n "$UWS_ECHO$UWS_BROADCAST" ]; then
        uws_head=" uWebSockets | fanout/uWS |" uws_rule="---|---|"
    fi
    echo "| workload | metric | fanout | $PEER_NAME | fanout/peer | target | raw TCP floor | floor/peer |$uws_head"
    echo "|---|---|---|---|---|---|---|---|$uws_rule"
    for w in "${WORKLOADS[@]}"; do
        if [ "$w" = idle ]; then
            metrics=("kib_per_conn|KiB RSS per connection" "server_ns_per_msg|server CPU ns per connection"
                "p50_us|handshake p50 µs")
        else
            unit=msg units=msgs
            if [ "${w#broadcast}" != "$w" ]; then unit=delivery units=deliveries; fi
            metrics=("server_ns_per_msg|server CPU ns per $unit" "msgs_per_s|$units per s"
                "p50_us|latency p50 µs" "p99_us|latency p99 µs")
            if [ "$unit" = delivery ]; then metrics+=("max_gap_ms|longest delivery gap ms"); fi
        fi
        first=1
        for m in "${metrics[@]}"; do
            key=${m%%|*}
            label=${m#*|}
            f=$(median "$key" "$w" fanout)
            p=$(median "$key" "$w" peer)
            t=""
            name=""
            if [ "$first" = 1 ]; then t=${TARGET[$w]}; name=${NAME[$w]}; first=0; fi
            # The targets are ratios to tokio-tungstenite, not to a baseline.
            if [ -n "$BASELINE" ]; then t=""; fi
            floor="—" floor_ratio="—"
            if [ "$w" != idle ]; then
                floor=$(median "$key" "$w" floor)
                floor_ratio=$(ratio "$floor" "$p")
                floor=$(fmt "$floor")
            fi
            uws_cells=""
            if [ -n "$uws_head" ]; then
                if [ -n "$(uws_for "$w")" ]; then
                    u=$(median "$key" "$w" uws)
                    uws_cells=" $(fmt "$u") | $(ratio "$f" "$u") |"
                else
                    uws_cells=" — | — |"
                fi
            fi
            echo "| $name | $label | $(fmt "$f") | $(fmt "$p") | $(ratio "$f" "$p") | $t | $floor | $floor_ratio |$uws_cells"
        done
    done
    echo
    # Anything that went wrong in any run.
    troubles=$(awk '
        / FAILED/ { print; next }
        {
            bad = 0
            for (i = 5; i <= NF && $i != "#"; i++) {
                split($i, kv, "=")
                if ((kv[1] == "errors" || kv[1] == "closed" || kv[1] == "failed" || kv[1] == "mismatch" ||
                     kv[1] == "unexpected" || kv[1] == "lost" || kv[1] == "others" || kv[1] == "undrained") && kv[2] + 0 > 0) bad = 1
                if (kv[1] == "max_gap_ms" && kv[2] + 0 >= 500) bad = 1
            }
            if (bad) print
        }' "$RESULTS")
    if [ -n "$troubles" ]; then
        echo "Runs with errors, losses, closed connections or stalls (max_gap_ms ≥ 500):"
        echo
        echo '```'
        echo "$troubles"
        echo '```'
    else
        echo "No run had errors, losses, closed connections or stalls."
    fi
    # Runs where something else on the machine took the server's CPU.
    contended=$(awk '
        $4 == "loadgen" {
            secs = 0; window = 0; wait = 0
            for (i = 5; i <= NF && $i != "#"; i++) {
                split($i, kv, "=")
                if (kv[1] == "secs") secs = kv[2]
                if (kv[1] == "window_s") window = kv[2]
                if (kv[1] == "server_runq_ms") wait = kv[2]
            }
            if (window > 0) secs = window
            if (secs > 0 && wait > secs * 1000 * 0.05) printf "%s %s round %s: server waited %s ms for its CPU in %s s\n", $1, $2, $3, wait, secs
        }' "$RESULTS")
    if [ -n "$contended" ]; then
        echo
        echo "Runs where the server waited for CPU 0 over 5 % of the measured time (other load on the machine; those figures are unreliable):"
        echo
        echo '```'
        echo "$contended"
        echo '```'
    fi
} | tee "$SUMMARY"
log "summary: $SUMMARY"
