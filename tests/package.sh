#!/usr/bin/env bash
# The Debian package, as an administrator gets it: build the .deb
# (dist/build-deb.sh), install it with `dpkg -i` into a throwaway copy of
# this machine (a private mount namespace: an overlay of / on a tmpfs, then
# chroot; the real system is never touched), and check what it installed:
# `tailgate --version`, `man -w tailgate`, the completions, the example
# policy, and `systemd-analyze verify` on both units. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "SKIPPED: tests/package.sh needs root (dpkg -i into an overlay)" >&2
    [ -n "${TAILGATE_SKIP_LOG:-}" ] && echo "tests/package.sh" >>"$TAILGATE_SKIP_LOG"
    exit 0
fi
if ! command -v cargo-deb >/dev/null; then
    echo "package test: installing cargo-deb (once per machine)" >&2
    cargo install --locked cargo-deb >&2
fi
deb=$(dist/build-deb.sh | tail -1)
[ -f "$deb" ] || { echo "FAILED: no .deb built ($deb)" >&2; exit 1; }
echo "package: $deb, $(stat -c %s "$deb") bytes"

tmp=$(mktemp -d /tmp/tailgate-pkg.XXXXXX); mkdir "$tmp/ov"
trap 'rm -rf "$tmp"' EXIT
cp "$deb" "$tmp/tailgate.deb"
# Everything below runs in a mount namespace of its own: its mounts vanish
# with it, even if a check fails half-way.
if ! unshare --mount --propagation private bash -euo pipefail -c '
    t=$1
    mount -t tmpfs tmpfs "$t/ov"
    mkdir "$t/ov/upper" "$t/ov/work" "$t/root"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$t/ov/upper,workdir=$t/ov/work" "$t/root"
    for d in proc sys dev; do mount --rbind "/$d" "$t/root/$d"; done
    cp "$t/tailgate.deb" "$t/root/tmp/tailgate.deb"
    unset TAILGATE_CONFIG_DIR
    chroot "$t/root" sh -euc "
        dpkg -i /tmp/tailgate.deb
        tailgate --version
        man -w tailgate
        man -w tailgate-up
        test -s /usr/share/bash-completion/completions/tailgate
        test -s /usr/share/doc/tailgate/examples/team.toml
        # They may hold secrets (an authkey): root only.
        test \"\$(stat -c %a /etc/tailgate/node.toml)\" = 600
        test \"\$(stat -c %a /etc/tailgate/control.toml)\" = 600
        tailgate policy check /usr/share/doc/tailgate/examples/team.toml >/dev/null
        # The shipped config files parse (all commented out): a key typo would stop the units.
        tailgate control policy check /usr/share/doc/tailgate/examples/solo.toml >/dev/null
        out=\$(tailgate up --wg-config /nonexistent.conf 2>&1 || true)
        case \"\$out\" in *node.toml*) echo \"\$out\"; exit 1;; esac
        # verify only warns about unknown or misspelt directives: any output fails.
        v=\$(systemd-analyze verify /usr/lib/systemd/system/tailgate-node.service /usr/lib/systemd/system/tailgate-control.service 2>&1)
        if [ -n \"\$v\" ]; then echo \"\$v\"; exit 1; fi
        dpkg -r tailgate >/dev/null
        test ! -e /usr/bin/tailgate
    "
' _ "$tmp" 2>&1 | sed 's/^/  /'; then
    echo "FAILED: package install checks" >&2
    exit 1
fi
echo "package test: ok"
