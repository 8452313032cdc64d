#!/usr/bin/env bash
# The project's test command (README.md): every unit, integration and
# namespace test. Run as root for the namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
# Namespace tests start many processes; two threads keep a 2-core box responsive.
cargo test --release --locked -- --test-threads=2
# Every network-facing parser under libFuzzer for a fixed budget (skipped,
# with a message, without a nightly toolchain).
exec ./tests/fuzz.sh "${FUZZ_SECONDS:-15}"
