#!/usr/bin/env bash
# Build target/debian/tailgate_VERSION_ARCH.deb: the release binary, man
# pages and completions generated from the CLI definition, the systemd units
# and example configs from dist/. Needs cargo-deb
# (`cargo install --locked cargo-deb`); prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install --locked cargo-deb" >&2; exit 1; }
cargo build --release --locked >&2
rm -rf target/dist
./target/release/tailgate gen man target/dist/man
./target/release/tailgate gen completions target/dist/completions
cargo deb --no-build --locked --strip 2>&1 | tail -1
