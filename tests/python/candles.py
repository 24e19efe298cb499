#!/usr/bin/env python3
"""Independent K-line candles for a replay file, for tests/integration/replay.rs.

Reads an NDJSON replay file and prints, as JSON on stdout, the OHLCV
candles fanout must have computed from it, per symbol and interval, plus
which lines are bad and a few counters. Standard library only; exact
arithmetic with `decimal`. Written from the documented rules (the market
issue and the README), not from the server's code:

Replay file
  One JSON object per line (split on "\\n"; surrounding whitespace and a
  UTF-8 byte order mark on line 1 ignored; blank lines ignored). A line is
  bad (skipped, counted, reported by line number) unless it is valid
  UTF-8 JSON, an object, with a non-empty string "type" and an integer
  "ts" (unix milliseconds, 0 <= ts < 2**63). Every other line is an event.

Market data
  An event is market data when its "type" is "trade" or "tick", its
  "symbol" is a string and it has a non-null "price". Market data with an
  empty symbol, or a price/qty/amount that is not a non-negative decimal
  (a JSON number or a string [+-]digits[.digits][e[+-]digits]), is
  rejected. A trade's volume is "qty", else "amount", else 0; a tick is a
  trade with volume 0 (whatever qty it carries). Ticks count in "trades".

Candles
  Per symbol and interval, buckets [start, start + interval) aligned to
  the interval in UTC (start = ts - ts mod interval). Trades apply in file
  order. A trade for a later bucket than the open candle closes it and
  opens a new one (empty buckets produce no candle). A trade in the open
  candle's bucket updates it: high/low/volume/count always; it becomes the
  open when its ts is earlier than the open's (ties: the first in file
  order stays) and the close when its ts is not earlier than the close's
  (ties: the last in file order wins). A trade for an earlier bucket than
  the open candle is late: counted and dropped (for that interval only).

Output
  {"events": N, "bad_lines": [line numbers], "blank_lines": N,
   "symbols": [...], "candles": {symbol: {interval: [candle, ...]}},
   "stats": {...}}
  A candle is {"start","end","open","high","low","close","volume",
  "trades","closed"}; decimals are normalized strings without exponent
  ("45000.1", "100", "0.000000028"); the last candle of each series is the
  open one (closed false).

Usage: candles.py FILE [--intervals 1s,1m,5m]
"""

import decimal
import json
import re
import sys
from decimal import Decimal

decimal.getcontext().prec = 200  # sums stay exact

DECIMAL_RE = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")
UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_DIGITS = 28  # what the server's decimals hold; more is rejected, not rounded


def interval_ms(name):
    count, unit = name[:-1], name[-1]
    if unit not in UNITS or not count.isdigit() or count.startswith("0"):
        raise SystemExit(f"bad interval {name!r}")
    return int(count) * UNITS[unit]


def text(d):
    """A decimal as the server writes it: normalized, no exponent, no -0."""
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def non_negative_decimal(value):
    """The value as an exact Decimal >= 0, or None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, Decimal):  # a JSON number with a fraction/exponent
        d = value
    elif isinstance(value, str):
        s = value.strip()
        if not DECIMAL_RE.match(s):
            return None
        d = Decimal(s)
    else:
        return None
    if not d.is_finite() or d < 0:
        return None
    if d != 0:
        sign, digits, exponent = d.normalize().as_tuple()
        fraction_digits = max(0, -exponent)
        if len(digits) + max(0, exponent) > MAX_DIGITS + 1 or fraction_digits > MAX_DIGITS:
            return None
    return d


def reject_constant(name):
    raise ValueError(f"not JSON: {name}")


def parse_line(raw, first):
    """("blank"|"bad"|"event", event)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad", None
    if first and line.startswith("\ufeff"):
        line = line[1:]
    line = line.strip()
    if not line:
        return "blank", None
    try:
        event = json.loads(line, parse_float=Decimal, parse_constant=reject_constant)
    except ValueError:
        return "bad", None
    if not isinstance(event, dict):
        return "bad", None
    kind = event.get("type")
    if not isinstance(kind, str) or kind == "":
        return "bad", None
    ts = event.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
        return "bad", None
    return "event", event


def market_trade(event):
    """(symbol, price, qty, ts), None when not market data, "rejected"."""
    kind = event["type"]
    if kind not in ("trade", "tick"):
        return None
    symbol = event.get("symbol")
    if not isinstance(symbol, str) or event.get("price") is None:
        return None
    if symbol == "":
        return "rejected"
    price = non_negative_decimal(event["price"])
    if price is None:
        return "rejected"
    if kind == "tick":
        qty = Decimal(0)
    elif event.get("qty") is not None:
        qty = non_negative_decimal(event["qty"])
    elif event.get("amount") is not None:
        qty = non_negative_decimal(event["amount"])
    else:
        qty = Decimal(0)
    if qty is None:
        return "rejected"
    return symbol, price, qty, event["ts"]


class Series:
    def __init__(self, ms):
        self.ms = ms
        self.candles = []  # closed ones, then the open one last
        self.open = None
        self.late = 0
        self.out_of_order = 0

    def apply(self, price, qty, ts):
        start = ts - ts % self.ms
        c = self.open
        if c is not None and start < c["start"]:
            self.late += 1
            return
        if c is not None and start == c["start"]:
            if ts < c["close_ts"]:
                self.out_of_order += 1
            c["high"] = max(c["high"], price)
            c["low"] = min(c["low"], price)
            c["volume"] += qty
            c["trades"] += 1
            if ts < c["open_ts"]:
                c["open"], c["open_ts"] = price, ts
            if ts >= c["close_ts"]:
                c["close"], c["close_ts"] = price, ts
            return
        if c is not None:
            c["closed"] = True
        self.open = {
            "start": start,
            "end": start + self.ms,
            "open": price,
            "high": price,
            "low": price,
            "close": price,
            "volume": qty,
            "trades": 1,
            "closed": False,
            "open_ts": ts,
            "close_ts": ts,
        }
        self.candles.append(self.open)

    def output(self):
        keys = ("start", "end", "open", "high", "low", "close", "volume", "trades", "closed")
        out = []
        for c in self.candles:
            row = {}
            for k in keys:
                v = c[k]
                row[k] = text(v) if isinstance(v, Decimal) else v
            out.append(row)
        return out


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    path = argv[0]
    names = ["1s", "1m", "5m"]
    rest = argv[1:]
    while rest:
        if rest[0] == "--intervals" and len(rest) > 1:
            names = [n for n in rest[1].split(",") if n]
            rest = rest[2:]
        else:
            raise SystemExit(f"unexpected argument {rest[0]!r}")
    intervals = [(n, interval_ms(n)) for n in names]

    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()

    events = 0
    bad = []
    blank = 0
    rejected = 0
    trades = 0
    ticks = 0
    series = {}  # symbol -> {interval name: Series}
    for number, raw in enumerate(lines, start=1):
        kind, event = parse_line(raw, number == 1)
        if kind == "blank":
            blank += 1
            continue
        if kind == "bad":
            bad.append(number)
            continue
        events += 1
        trade = market_trade(event)
        if trade is None:
            continue
        if trade == "rejected":
            rejected += 1
            continue
        symbol, price, qty, ts = trade
        trades += 1
        if event["type"] == "tick":
            ticks += 1
        per_symbol = series.setdefault(symbol, {n: Series(ms) for n, ms in intervals})
        for s in per_symbol.values():
            s.apply(price, qty, ts)

    result = {
        "events": events,
        "bad_lines": bad,
        "blank_lines": blank,
        "symbols": sorted(series),
        "candles": {
            symbol: {n: s.output() for n, s in per.items()} for symbol, per in sorted(series.items())
        },
        "stats": {
            "market_trades": trades,
            "ticks": ticks,
            "rejected": rejected,
            "late": {n: sum(per[n].late for per in series.values()) for n, _ in intervals},
            "out_of_order_applied": {
                n: sum(per[n].out_of_order for per in series.values()) for n, _ in intervals
            },
        },
    }
    json.dump(result, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
