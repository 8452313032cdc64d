#!/usr/bin/env bash
# The project's test command (README.md): every unit, integration and
# namespace test. Run as root for the namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/deps.sh
ensure_test_packages
# The OpenID provider the sign-in tests run (oidc-provider, pinned in
# tests/oidc/package-lock.json).
if [ ! -d tests/oidc/node_modules ] || [ tests/oidc/package-lock.json -nt tests/oidc/node_modules ]; then
    npm ci --prefix tests/oidc --no-audit --no-fund >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: not root: network-namespace tests will be SKIPPED (run with sudo for all of them)" >&2
fi
cargo build --release --locked

# Tests that cannot run here (no root) write their name to this file; the
# count is reported at the end instead of passing silently.
TAILGATE_SKIP_LOG=$(mktemp /tmp/tailgate-skipped.XXXXXX)
export TAILGATE_SKIP_LOG
# A configured /etc/tailgate/node.toml on this machine must not change
# what the tests start.
export TAILGATE_CONFIG_DIR=/nonexistent/tailgate-tests

# The tests log in as root through our SSH server, so root's shell startup
# runs. Where root's .bashrc runs `pyenv init` (these machines), a session the
# tests end inside pyenv-rehash's lock window (between taking the lock file
# and arming its cleanup trap) strands the lock, and every later root login
# waits 60 s for it. While the tests run, clear a lock older than 5 s (a
# rehash takes well under a second; the waiters are pyenv-rehash processes
# too, so "no rehash running" cannot tell a stale lock from a held one).
pyenv_lock="${PYENV_ROOT:-$HOME/.pyenv}/shims/.pyenv-shim"
if [ -d "$(dirname "$pyenv_lock")" ]; then
    (
        while sleep 1; do
            if [ -n "$(find "$pyenv_lock" ! -newermt '-5 seconds' 2>/dev/null)" ]; then
                rm -f "$pyenv_lock"
            fi
        done
    ) &
    watchdog=$!
fi
trap 'kill ${watchdog:-} 2>/dev/null || true; rm -f "$TAILGATE_SKIP_LOG"' EXIT

# Namespace tests start many processes; two threads keep a 2-core box responsive.
cargo test --release --locked -- --test-threads=2
# The Debian package: build, install into an overlay chroot, check.
./tests/package.sh
# Every network-facing parser under libFuzzer for a fixed budget (skipped,
# with a message, without a nightly toolchain).
./tests/fuzz.sh "${FUZZ_SECONDS:-15}"

skipped=$(sort -u "$TAILGATE_SKIP_LOG" | wc -l)
if [ "$skipped" -gt 0 ]; then
    echo "SKIPPED $skipped tests that need root (not run, not passed):" >&2
    sort -u "$TAILGATE_SKIP_LOG" | sed 's/^/  /' >&2
fi
