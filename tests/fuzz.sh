#!/usr/bin/env bash
# Fuzzes every parser reachable from the network (fuzz/fuzz_targets/*) for a
# fixed budget: tests/fuzz.sh [SECONDS_PER_TARGET] (default 20). Needs a
# nightly toolchain; installs cargo-fuzz if missing. Prints executions and
# coverage per target; fails if any target finds a crash, panic, leak or
# timeout, leaving the reproducer under fuzz/artifacts/TARGET/ (path printed).
# Longer runs: see "Fuzzing" in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped: no nightly toolchain"
    exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi

# Release + debug assertions and overflow checks (-a): an overflow on
# network input is a finding too. The same flags on `run` reuse this build.
flags=(-O -a)
echo "fuzz: building targets"
cargo +nightly fuzz build "${flags[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
printf '%-14s %12s %8s  %s\n' target executions cov result
for t in $(cargo +nightly fuzz list); do
    log="$work/$t.log"
    mkdir -p "$work/corpus-$t"
    # New inputs go to the scratch corpus (first directory); the committed
    # seeds are only read. A 10 s input is a hang and counts as a finding.
    if cargo +nightly fuzz run "${flags[@]}" "$t" "$work/corpus-$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed+=("$t")
    fi
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)"
    printf '%-14s %12s %8s  %s\n' "$t" "${execs:-?}" "${cov:-?}" "$result"
    if [ "$result" != ok ]; then
        # What went wrong (panic message or sanitizer report) and where
        # libFuzzer left the reproducer ("Test unit written to ...").
        # (`|| true`: a failure with no such lines, e.g. a missing corpus
        # directory, must still reach the summary below, not end the script.)
        grep -E -A4 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|No such file' "$log" | head -n 12 | sed "s/^/  $t: /" || true
        grep -E 'Test unit written to|SUMMARY' "$log" | sed "s/^/  $t: /" || true
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}. Reproduce: cargo +nightly fuzz run ${flags[*]} TARGET fuzz/artifacts/TARGET/<file>"
    exit 1
fi
echo "fuzz: all targets ran ${secs}s without findings"
