# Shared set-up for the bench scripts (source it; run as root). One place for
# what every lab needs: the binary, a temp dir, namespaces that are always
# torn down (also on failure or ^C), veths, wireguard-go, `tailgate up`,
# waiting until a node answers or has a path, and the iperf3/timing helpers.
#
#   source "$(dirname "$0")/lib.sh"
#   bench_init tgx                # BIN, D=/tmp/tgx.XXXX, the EXIT trap
#   ns_add ${P}a ${P}b            # P=tgx<pid>: names never clash between runs
#   veth ${P}a ${P}b 10.9.0.1/24 10.9.0.2/24
#   tg_up ${P}b sb --wg-config $D/b.conf --no-ssh   # waits for its local API
#
# Everything started inside a namespace made by ns_add dies with it, so
# cleanup needs no pid bookkeeping.

# bench_init TAG: the tailgate binary (built if missing) as $BIN, a fresh
# temp dir $D, the name prefix $P (TAG + our pid) and the cleanup trap.
bench_init() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  BIN=${TAILGATE_BIN:-target/release/tailgate}
  [ -x "$BIN" ] || cargo build --release --quiet
  BIN=$(realpath "$BIN")
  P=$1$$
  D=$(mktemp -d "/tmp/$1.XXXX")
  BENCH_NSS=(); BENCH_WG=()
  trap bench_cleanup EXIT
}

# Kill every process in the given namespaces (default: all of ours).
ns_kill() {
  local n p
  for n in "${@:-${BENCH_NSS[@]}}"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  sleep 0.3
}

bench_cleanup() {
  local n w
  [ ${#BENCH_NSS[@]} -gt 0 ] && ns_kill
  for n in "${BENCH_NSS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  for w in "${BENCH_WG[@]}"; do rm -f "/var/run/wireguard/$w.sock"; done
  rm -rf "$D"
}

# ns_add NAME...: namespaces with loopback up, deleted by the cleanup.
ns_add() {
  local n
  for n in "$@"; do
    ip netns add "$n"; BENCH_NSS+=("$n")
    ip -n "$n" link set lo up
  done
}

# veth NS_A NS_B ADDR_A/LEN ADDR_B/LEN: a veth pair between two namespaces.
veth() {
  # Interface names are at most 15 bytes and share the root namespace
  # while they are made: our pid and a counter keep them apart.
  BENCH_VETHS=$((${BENCH_VETHS:-0} + 1))
  local a=tb$$v${BENCH_VETHS}a b=tb$$v${BENCH_VETHS}b
  ip link add "$a" type veth peer name "$b"
  ip link set "$a" netns "$1"; ip link set "$b" netns "$2"
  ip -n "$1" addr add "$3" dev "$a"; ip -n "$2" addr add "$4" dev "$b"
  ip -n "$1" link set "$a" up; ip -n "$2" link set "$b" up
}

# keys NAME...: $D/NAME.key and $D/NAME.pub for each.
keys() {
  local x
  for x in "$@"; do "$BIN" genkey > "$D/$x.key"; "$BIN" pubkey < "$D/$x.key" > "$D/$x.pub"; done
}

# wggo NS DEV KEYFILE ADDRESS: a wireguard-go interface on UDP 51820.
wggo() {
  BENCH_WG+=("$2")
  ip netns exec "$1" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go "$2" >/dev/null 2>&1
  ip netns exec "$1" wg set "$2" private-key "$3" listen-port 51820
  ip -n "$1" addr add "$4/32" dev "$2"; ip -n "$1" link set "$2" up
}

# tgconf OWN_KEY ADDRESS PEER_PUB PEER_ADDRESS ENDPOINT|"" USER: a static
# WireGuard config for `tailgate up --wg-config` with one peer, who signs in
# to SSH and the inbound filter as USER.
tgconf() {
  printf '[Interface]\nPrivateKey = %s\nAddress = %s/32\nListenPort = 51820\n[Peer]\n# tailgate-user = %s\nPublicKey = %s\nAllowedIPs = %s/32\n' \
    "$(cat "$1")" "$2" "$6" "$(cat "$3")" "$4"
  [ -z "$5" ] || printf 'Endpoint = %s\n' "$5"
}

# tg_status NS NAME: `tailgate status --json` of the node with state dir $D/NAME.
tg_status() { ip netns exec "$1" "$BIN" status --json --state-dir "$D/$2" 2>/dev/null; }

# tg_up NS NAME ARGS...: `tailgate up --state-dir $D/NAME ARGS` in the
# background (log in $D/NAME.log); returns once its local API answers.
tg_up() {
  local ns=$1 name=$2 i
  shift 2
  (ip netns exec "$ns" "$BIN" up --state-dir "$D/$name" "$@" > "$D/$name.log" 2>&1 &)
  for i in $(seq 100); do tg_status "$ns" "$name" >/dev/null && return 0; sleep 0.1; done
  echo "tailgate $name did not come up:" >&2; tail -5 "$D/$name.log" >&2; return 1
}

# tg_pid NS: the pid of the tailgate process in a namespace.
tg_pid() {
  local p
  for p in $(ip netns pids "$1"); do [ "$(cat /proc/$p/comm 2>/dev/null)" = tailgate ] && echo "$p" && return 0; done
  return 1
}

# peer_field NS NAME FIELD [PEER]: FIELD of the first peer (or the one whose
# name starts with PEER) in the node's status; "none" when there is none.
peer_field() {
  tg_status "$1" "$2" | python3 -c 'import json,sys
try:
    ps = [p for p in json.load(sys.stdin)["peers"] if (p.get("name") or "").split(".")[0].startswith(sys.argv[2])]
    v = ps[0][sys.argv[1]]
    print("none" if v is None else v)
except Exception: print("none")' "$3" "${4:-}"
}

# wait_path WANT NS NAME [PEER]: until the peer's path starts with WANT
# ("direct", "relay"), 30 s at most.
wait_path() {
  local i p
  for i in $(seq 300); do
    p=$(peer_field "$2" "$3" path "${4:-}")
    case "$p" in "$1"*) return 0 ;; esac
    sleep 0.1
  done
  echo "path stayed $p" >&2; return 1
}

# wait_handshake NS NAME [PEER]: until the peer has a WireGuard session, 10 s at most.
wait_handshake() {
  local i
  for i in $(seq 100); do
    [ "$(peer_field "$1" "$2" last_handshake_secs_ago "${3:-}")" != none ] && return 0
    sleep 0.1
  done
  echo "no handshake with ${3:-the peer} from $2" >&2; return 1
}

# iperf3 output on stdin -> MB/s of its "sender" or "receiver" summary line.
iperf_mbps() {
  awk -v side="$1" '$0 ~ side {for(i=1;i<=NF;i++) if($i ~ /bits\/sec/){v=$(i-1); u=$i}}
    END { if(u ~ /^G/) v*=1000; if (u ~ /^K/) v/=1000; printf "%.1f", v/8 }'
}

# Numbers on stdin -> "median min max".
median_spread() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'; }

now() { date +%s.%N; }

# latency NS HOST PORT: mean microseconds of 50 connect + echo + first byte
# round trips (to a `socat ... EXEC:cat` listener).
latency() {
  ip netns exec "$1" bash -c "s=\$(date +%s%N); for i in \$(seq 50); do echo x | nc -N -w 5 $2 $3 >/dev/null; done; e=\$(date +%s%N); echo \$(( (e-s)/50000 ))"
}
