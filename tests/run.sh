#!/usr/bin/env bash
# The project's test command (README.md): every unit, integration and
# namespace test. Run as root for the namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
# Namespace tests start many processes; two threads keep a 2-core box responsive.
exec cargo test --release --locked -- --test-threads=2
