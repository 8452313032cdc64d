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
# SECS=5 REPS=3 by default (SECS=2 REPS=1 for a quick look). Set-up: bench/lib.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bench_init tgiop
SECS=${SECS:-5}
REPS=${REPS:-3}
A=${P}a; B=${P}b; WA=wgia$$; WB=wgib$$
ns_add $A $B
veth $A $B 10.203.0.1/24 10.203.0.2/24
keys wa wb ta tb

# "median min max" of REPS runs of: iperf3 in namespace $1 with args $2.
measure() {
  for _ in $(seq $REPS); do
    ip netns exec $1 iperf3 -c $2 -t $SECS -O 1 | iperf_mbps receiver
    echo
    sleep 0.5
  done | median_spread
}
printf '[[acl]]\nsrc = ["bencher"]\ndst = ["*:5201"]\n' > $D/policy.toml
up_server() { # tailgate in B forwarding :5201 to a local iperf3; $1 config
  ip netns exec $B iperf3 -s -D -B 127.0.0.1 -p 5201
  tg_up $B sb --wg-config $1 --policy $D/policy.toml --no-ssh --forward 5201=127.0.0.1:5201
}

echo "== anchor: wireguard-go <-> wireguard-go, kernel TCP" >&2
wggo $A $WA $D/wa.key 100.64.0.1; wggo $B $WB $D/wb.key 100.64.0.2
ip netns exec $A wg set $WA peer $(cat $D/wb.pub) allowed-ips 100.64.0.2/32 endpoint 10.203.0.2:51820
ip netns exec $B wg set $WB peer $(cat $D/wa.pub) allowed-ips 100.64.0.1/32 endpoint 10.203.0.1:51820
ip -n $A route add 100.64.0.2/32 dev $WA; ip -n $B route add 100.64.0.1/32 dev $WB
ip netns exec $B iperf3 -s -D -B 100.64.0.2; sleep 0.5
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
ANCHOR=$(measure $A 100.64.0.2)
ns_kill $B; ip -n $B link del $WB 2>/dev/null || true

echo "== tailgate <-> wireguard-go (tailgate in $B, wireguard-go in $A)" >&2
ip netns exec $A wg set $WA peer $(cat $D/wb.pub) remove peer $(cat $D/tb.pub) allowed-ips 100.64.0.2/32 endpoint 10.203.0.2:51820
tgconf $D/tb.key 100.64.0.2 $D/wa.pub 100.64.0.1 "" bencher > $D/tb.conf
up_server $D/tb.conf
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
TGWG=$(measure $A "100.64.0.2 -R")
WGTG=$(measure $A 100.64.0.2)
ns_kill; ip -n $A link del $WA 2>/dev/null || true

echo "== tailgate <-> tailgate" >&2
tgconf $D/ta.key 100.64.0.1 $D/tb.pub 100.64.0.2 10.203.0.2:51820 bencher > $D/ta.conf
tgconf $D/tb.key 100.64.0.2 $D/ta.pub 100.64.0.1 "" bencher > $D/tb.conf
up_server $D/tb.conf
tg_up $A sa --wg-config $D/ta.conf --no-ssh --local-forward 127.0.0.1:15201=100.64.0.2:5201
wait_handshake $A sa
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
