#!/usr/bin/env python3
"""A consumer of fanout's event-stream registration protocol, written the way
the pipeline's Python users write theirs: `websocket-client`'s WebSocketApp
with on_open/on_message/on_error/on_close callbacks.

On the server's "welcome" it sends "register" with the given filters; on
"registered" it prints the line REGISTERED; it prints every other message (the
events) as one JSON line on stdout, and exits once it has printed --count of
them (status 0), or after --timeout seconds (status 2), or if the connection
ends first (status 3). Diagnostics go to stderr.

    python registration_client.py ws://127.0.0.1:8080/ws \
        --filters '{"types":["payment"],"account_ids":[],"asset_codes":[],"min_amount":"100"}' \
        --count 10 --timeout 20
"""

import argparse
import json
import sys
import threading

import websocket


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. ws://127.0.0.1:8080/ws")
    parser.add_argument(
        "--filters",
        default='{"types":[],"account_ids":[],"asset_codes":[],"min_amount":""}',
        help="the register message's filters, as JSON",
    )
    parser.add_argument("--count", type=int, required=True, help="events to print before exiting")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    args = parser.parse_args()
    filters = json.loads(args.filters)

    state = {"events": 0, "status": 3}

    def on_open(ws):
        print("connected to %s" % args.url, file=sys.stderr, flush=True)

    def on_message(ws, message):
        data = json.loads(message)
        kind = data.get("type")
        if kind == "welcome":
            print("welcome: %s" % message, file=sys.stderr, flush=True)
            ws.send(json.dumps({"type": "register", "filters": filters}))
        elif kind == "registered":
            print("registered: %s" % message, file=sys.stderr, flush=True)
            print("REGISTERED", flush=True)
        elif kind == "error":
            print("error from server: %s" % message, file=sys.stderr, flush=True)
        else:
            print(json.dumps(data), flush=True)
            state["events"] += 1
            if state["events"] >= args.count:
                state["status"] = 0
                ws.close()

    def on_error(ws, error):
        print("error: %r" % (error,), file=sys.stderr, flush=True)

    def on_close(ws, close_status_code, close_msg):
        print("closed: %s %s" % (close_status_code, close_msg), file=sys.stderr, flush=True)

    app = websocket.WebSocketApp(
        args.url,
        on_open=on_open,
        on_message=on_message,
        on_error=on_error,
        on_close=on_close,
    )

    def give_up():
        print(
            "timeout after %.1f s with %d event(s)" % (args.timeout, state["events"]),
            file=sys.stderr,
            flush=True,
        )
        state["status"] = 2
        app.close()

    timer = threading.Timer(args.timeout, give_up)
    timer.daemon = True
    timer.start()
    app.run_forever()
    timer.cancel()
    return state["status"]


if __name__ == "__main__":
    sys.exit(main())
