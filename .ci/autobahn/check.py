#!/usr/bin/env python3
"""Check an Autobahn fuzzingclient report against the expected outcomes.

usage:
  check.py REPORTS_DIR [EXPECTED_JSON] [--agent NAME] [--spec SPEC_JSON]
  check.py --generate REPORTS_DIR [--agent NAME] > expected.json

REPORTS_DIR is the spec's outdir (it holds index.json). EXPECTED_JSON
(default: expected.json beside this script) maps every case id that must have
run to its allowed `behavior` ("OK" or "INFORMATIONAL", or a list of those).

wstest exits 0 even when the server died mid-run, so this script is the real
verdict. It fails (exit 1) on any missing case, any case whose behavior is
FAILED, NON-STRICT, UNIMPLEMENTED or otherwise not the expected one, and any
case whose behaviorClose is not OK or INFORMATIONAL. Cases in the report that
expected.json does not list must be OK or INFORMATIONAL too. With --spec
SPEC_JSON (the fuzzingclient spec that ran), only the expected cases its
"cases" select and its "exclude-cases" do not must have run: for a run of
part of the suite.

--generate prints an expected.json from a reference run: every case "OK"
except those the suite itself reports as INFORMATIONAL. A reference's
NON-STRICT becomes "OK" (we want strict); FAILED/UNIMPLEMENTED are refused.
"""
import argparse
import json
import os
import re
import sys

ACCEPTABLE = {"OK", "INFORMATIONAL"}
CLOSE_ACCEPTABLE = {"OK", "INFORMATIONAL"}


def case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))


def load_results(reports_dir, agent):
    index_path = os.path.join(reports_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit("autobahn: cannot read %s (did wstest run?): %s" % (index_path, e))
    if not index:
        sys.exit("autobahn: no results in %s: no case ran (server not listening?)" % index_path)
    if agent is None:
        if len(index) != 1:
            sys.exit("autobahn: index.json has agents %s; pass --agent" % sorted(index))
        agent = next(iter(index))
    if agent not in index:
        sys.exit("autobahn: agent %r not in index.json (agents: %s)" % (agent, sorted(index)))
    return index[agent]


def pattern(glob):
    """wstest's case patterns: `*` matches anything, the rest literally."""
    return re.compile("^" + ".*".join(re.escape(p) for p in glob.split("*")) + "$")


def select(expected, spec):
    """The expected cases a fuzzingclient spec runs."""
    take = [pattern(p) for p in spec.get("cases", ["*"])]
    drop = [pattern(p) for p in spec.get("exclude-cases", [])]
    return {k: v for k, v in expected.items()
            if any(p.match(k) for p in take) and not any(p.match(k) for p in drop)}


def generate(results):
    out = {}
    for case_id in sorted(results, key=case_key):
        behavior = results[case_id].get("behavior")
        if behavior == "INFORMATIONAL":
            out[case_id] = "INFORMATIONAL"
        elif behavior in ("OK", "NON-STRICT"):
            out[case_id] = "OK"
        else:
            sys.exit("autobahn: reference got %s on case %s; not a usable reference"
                     % (behavior, case_id))
    body = ",\n".join("  %s: %s" % (json.dumps(k), json.dumps(v)) for k, v in out.items())
    print("{\n" + body + "\n}")


def check(results, expected):
    problems = []
    counts = {}
    for case_id in sorted(set(expected) | set(results), key=case_key):
        allowed = expected.get(case_id)
        if isinstance(allowed, str):
            allowed = [allowed]
        r = results.get(case_id)
        if r is None:
            problems.append("%-8s MISSING (case did not run)" % case_id)
            counts["MISSING"] = counts.get("MISSING", 0) + 1
            continue
        behavior = r.get("behavior")
        close = r.get("behaviorClose")
        counts[behavior] = counts.get(behavior, 0) + 1
        ok = behavior in (allowed if allowed is not None else ACCEPTABLE)
        ok = ok and close in CLOSE_ACCEPTABLE
        if not ok:
            why = ("expected behavior %s" % "/".join(allowed) if allowed
                   else "not in expected.json, so behavior must be OK/INFORMATIONAL")
            why += ", behaviorClose OK/INFORMATIONAL"
            problems.append("%-8s behavior=%s behaviorClose=%s remoteCloseCode=%s (%s; %s)"
                            % (case_id, behavior, close, r.get("remoteCloseCode"), why,
                               r.get("reportfile")))
    missing = [p for p in problems if p.endswith("MISSING (case did not run)")]
    shown = problems
    if len(missing) > 10:  # e.g. the server died: list a few, count the rest
        shown = [p for p in problems if p not in missing] + missing[:10]
    for p in shown:
        print("autobahn: FAIL " + p)
    if len(shown) < len(problems):
        print("autobahn: ... and %d more missing cases" % (len(problems) - len(shown)))
    summary = "autobahn: %d cases, %d failed, %d non-strict, %d informational" % (
        len(results), counts.get("FAILED", 0), counts.get("NON-STRICT", 0),
        counts.get("INFORMATIONAL", 0))
    extra = []
    if counts.get("UNIMPLEMENTED"):
        extra.append("%d unimplemented" % counts["UNIMPLEMENTED"])
    if counts.get("MISSING"):
        extra.append("%d missing" % counts["MISSING"])
    if extra:
        summary += ", " + ", ".join(extra)
    if problems:
        summary += " -- %d problem(s)" % len(problems)
    print(summary)
    return 1 if problems else 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports_dir")
    ap.add_argument("expected", nargs="?", default=os.path.join(here, "expected.json"))
    ap.add_argument("--agent")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--spec", metavar="SPEC_JSON", help="expect only the cases this spec selects")
    args = ap.parse_args()
    results = load_results(args.reports_dir, args.agent)
    if args.generate:
        generate(results)
        return 0
    with open(args.expected) as f:
        expected = json.load(f)
    if args.spec:
        with open(args.spec) as f:
            expected = select(expected, json.load(f))
    return check(results, expected)


if __name__ == "__main__":
    sys.exit(main())
