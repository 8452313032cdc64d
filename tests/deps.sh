# The Debian packages the tests drive (stock clients and peers), in one
# place: tests/run.sh and .ci/run both source this file.
# shellcheck shell=bash
TEST_PACKAGES="wireguard-go wireguard-tools nftables iproute2 iputils-ping netcat-openbsd socat coturn \
  openssh-client openssh-server openssh-sftp-server dropbear-bin asciinema iperf3 rsync procps \
  man-db systemd oathtool expect curl pebble prometheus miniupnpd conntrack"

# Installs what is missing from TEST_PACKAGES when running as root; otherwise
# stops with the exact command to run.
ensure_test_packages() {
    local p missing=""
    for p in $TEST_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    # The OIDC tests run oidc-provider on Node.js. A machine that already has
    # node and npm (e.g. from NodeSource) keeps them: Debian's npm package
    # conflicts with NodeSource's nodejs.
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
    [ -z "$missing" ] && return 0
    local line="apt-get install -y --no-install-recommends$missing"
    if [ "$(id -u)" != 0 ]; then
        echo "The tests need Debian packages that are not installed. Run:" >&2
        echo "  sudo $line" >&2
        exit 1
    fi
    echo "installing test packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
        echo "Installing the test packages failed. Run:" >&2
        echo "  apt-get update && $line" >&2
        exit 1
    fi
}
