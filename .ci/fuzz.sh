#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for FUZZ_SECONDS (default 30)
# seconds each and exits non-zero if any of them finds a crash, a failed
# invariant, a timeout or a leak. Works from any directory.
#
# The targets need nightly-only rustc flags (-Zsanitizer=address), which
# RUSTC_BOOTSTRAP=1 unlocks on the stable toolchain. Corpora stay in
# fuzz/corpus/TARGET and crashing inputs in fuzz/artifacts/TARGET (both
# git-ignored); each run's libFuzzer output goes to fuzz/artifacts/TARGET.log.
# Committed seed inputs in fuzz/seeds/TARGET and a dictionary in
# fuzz/dicts/TARGET.dict are used when they exist.
# Reproduce a crash with: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

mapfile -t targets < <(cargo fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found" >&2
    exit 1
fi

# One build for all targets, so a compile error fails fast and clearly.
cargo fuzz build

failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/artifacts/$target" "fuzz/corpus/$target"
    log="fuzz/artifacts/$target.log"
    # New inputs go to the first corpus directory; the seeds are read only.
    corpora=("fuzz/corpus/$target")
    [ -d "fuzz/seeds/$target" ] && corpora+=("fuzz/seeds/$target")
    # -timeout: one input running for 10 s counts as a hang (a crash).
    args=(-max_total_time="$seconds" -timeout=10)
    [ -f "fuzz/dicts/$target.dict" ] && args+=(-dict="$PWD/fuzz/dicts/$target.dict")
    echo "fuzz.sh: $target for ${seconds}s"
    if cargo fuzz run "$target" "${corpora[@]}" -- "${args[@]}" >"$log" 2>&1; then
        grep -E '^Done [0-9]+ runs' "$log" || true
    else
        failed+=("$target")
        echo "fuzz.sh: $target FAILED (full output in $log):" >&2
        # The panic or sanitizer message, then libFuzzer's summary with the
        # saved input and the command that reproduces it.
        grep -m1 -A8 -E 'panicked at|==ERROR|ERROR: libFuzzer' "$log" >&2 || true
        sed -n '/^SUMMARY/,$p' "$log" | grep -v '^Stack backtrace' | head -n 40 >&2 || tail -n 40 "$log" >&2
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: failing targets: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran ${seconds}s without a crash"
