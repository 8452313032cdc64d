#!/usr/bin/env bash
# Interop benchmark (run as root; not a pass/fail test): bulk TCP in all four
# directions between wireguard-go (with the kernel's TCP) and tailgate, in
# one run, each against the anchor measured in the same run.
#   anchor        wireguard-go -> wireguard-go, kernel TCP both ends
#   tg -> wg-go   iperf3 server behind `tailgate up --forward`, `iperf3 -R`
#                 from the wireguard-go namespace (smoltcp sends, kernel receives)
#   wg-go -> tg   the same lab without -R (kernel sends, smoltcp receives)
#   tg -> tg      two `tailgate up` nodes, --local-forward into --forward
# Each figure is the median of REPS runs of SECS seconds (receiver side), with
# the spread (min..max). Two namespaces joined by a veth; nothing is left up.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TAILGATE_BIN:-target/release/tailgate}
[ -x "$BIN" ] || cargo build --release --quiet
SECS=${SECS:-5}
REPS=${REPS:-3}
# Names carry our pid so two runs (or engineers) never share a namespace.
A=tgiop_a$$; B=tgiop_b$$; VA=tgiva$$; VB=tgivb$$; WA=wgia$$; WB=wgib$$
D=$(mktemp -d /tmp/tgiop.XXXX)
killns() { for n in ${@:-$A $B}; do for p in $(ip netns pids $n 2>/dev/null); do kill -9 $p 2>/dev/null || true; done; done; sleep 0.3; }
cleanup() {
  killns
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  rm -f /var/run/wireguard/$WA.sock /var/run/wireguard/$WB.sock; rm -rf "$D"
}
trap cleanup EXIT
ip netns add $A; ip netns add $B
ip link add $VA type veth peer name $VB
ip link set $VA netns $A; ip link set $VB netns $B
ip -n $A addr add 10.203.0.1/24 dev $VA; ip -n $B addr add 10.203.0.2/24 dev $VB
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set $VA up; ip -n $B link set $VB up
for x in wa wb ta tb; do $BIN genkey > $D/$x.key; $BIN pubkey < $D/$x.key > $D/$x.pub; done

# MB/s of one iperf3 run, as received.
rate() { awk '/receiver/ {for(i=1;i<=NF;i++) if($i ~ /bits\/sec/){v=$(i-1); u=$i}} END { if(u ~ /^G/) v*=1000; if (u ~ /^K/) v/=1000; printf "%.1f", v/8 }'; }
# "median min max" of REPS runs of: iperf3 in namespace $1 with args $2.
measure() {
  local xs=()
  for _ in $(seq $REPS); do
    xs+=("$(ip netns exec $1 iperf3 -c $2 -t $SECS -O 1 | rate)")
    sleep 0.5
  done
  printf '%s\n' "${xs[@]}" | sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'
}
wggo() { # $1 ns, $2 dev, $3 key, $4 address
  ip netns exec $1 env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go $2 >/dev/null 2>&1
  ip netns exec $1 wg set $2 private-key $3 listen-port 51820
  ip -n $1 addr add $4/32 dev $2; ip -n $1 link set $2 up
}
tgconf() { # $1 own key, $2 address, $3 peer pub, $4 peer address, $5 endpoint or "", $6 user
  printf '[Interface]\nPrivateKey = %s\nAddress = %s/32\nListenPort = 51820\n[Peer]\n# tailgate-user = %s\nPublicKey = %s\nAllowedIPs = %s/32\n' \
    "$(cat $1)" $2 $6 "$(cat $3)" $4
  [ -z "$5" ] || printf 'Endpoint = %s\n' $5
}
printf '[[acl]]\nsrc = ["bencher"]\ndst = ["*:5201"]\n' > $D/policy.toml
up_server() { # tailgate in B forwarding :5201 to a local iperf3; $1 config
  ip netns exec $B iperf3 -s -D -B 127.0.0.1 -p 5201
  (ip netns exec $B $BIN up --wg-config $1 --policy $D/policy.toml --state-dir $D/sb --no-ssh --forward 5201=127.0.0.1:5201 > $D/tb.log 2>&1 &)
  sleep 0.7
}

echo "== anchor: wireguard-go <-> wireguard-go, kernel TCP" >&2
wggo $A $WA $D/wa.key 100.64.0.1; wggo $B $WB $D/wb.key 100.64.0.2
ip netns exec $A wg set $WA peer $(cat $D/wb.pub) allowed-ips 100.64.0.2/32 endpoint 10.203.0.2:51820
ip netns exec $B wg set $WB peer $(cat $D/wa.pub) allowed-ips 100.64.0.1/32 endpoint 10.203.0.1:51820
ip -n $A route add 100.64.0.2/32 dev $WA; ip -n $B route add 100.64.0.1/32 dev $WB
ip netns exec $B iperf3 -s -D -B 100.64.0.2; sleep 0.5
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
ANCHOR=$(measure $A 100.64.0.2)
killns $B; ip -n $B link del $WB 2>/dev/null || true

echo "== tailgate <-> wireguard-go (tailgate in $B, wireguard-go in $A)" >&2
ip netns exec $A wg set $WA peer $(cat $D/wb.pub) remove peer $(cat $D/tb.pub) allowed-ips 100.64.0.2/32 endpoint 10.203.0.2:51820
tgconf $D/tb.key 100.64.0.2 $D/wa.pub 100.64.0.1 "" bencher > $D/tb.conf
up_server $D/tb.conf
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
TGWG=$(measure $A "100.64.0.2 -R")
WGTG=$(measure $A 100.64.0.2)
killns; ip -n $A link del $WA 2>/dev/null || true

echo "== tailgate <-> tailgate" >&2
tgconf $D/ta.key 100.64.0.1 $D/tb.pub 100.64.0.2 10.203.0.2:51820 bencher > $D/ta.conf
tgconf $D/tb.key 100.64.0.2 $D/ta.pub 100.64.0.1 "" bencher > $D/tb.conf
up_server $D/tb.conf
(ip netns exec $A $BIN up --wg-config $D/ta.conf --state-dir $D/sa --no-ssh --local-forward 127.0.0.1:15201=100.64.0.2:5201 > $D/ta.log 2>&1 &)
sleep 1
TGTG=$(measure $A "127.0.0.1 -p 15201")

echo
a=${ANCHOR%% *}
row() { # $1 label, $2 "median min max"
  set -- "$1" $2
  printf "%-34s %8s MB/s  (%s..%s)  %5.2fx\n" "$1" $2 $3 $4 "$(echo "$2 / $a" | bc -l)"
}
echo "bulk TCP, median of $REPS x ${SECS}s (min..max), ratio to the anchor"
row "wireguard-go -> wireguard-go" "$ANCHOR"
row "tailgate -> wireguard-go" "$TGWG"
row "wireguard-go -> tailgate" "$WGTG"
row "tailgate -> tailgate" "$TGTG"
