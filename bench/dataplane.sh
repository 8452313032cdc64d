#!/usr/bin/env bash
# Data-plane benchmark (run as root; not a pass/fail test).
# Two namespaces joined by a veth. The same run measures:
#   anchor:   wireguard-go on both ends + kernel TCP (iperf3 straight through)
#   tailgate: two `tailgate up` nodes; iperf3 enters through --local-forward on
#             one and leaves through --forward on the other (userspace TCP
#             both ends, plus a loopback hop each side that the anchor lacks)
# and prints MB/s, the ratio, TCP connect + first byte latency, and idle RSS.
# SECS=8 per bulk run (SECS=2 for a quick look). Set-up helpers: bench/lib.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bench_init tgbench
SECS=${SECS:-8}
A=${P}a; B=${P}b; WA=wgba$$; WB=wgbb$$
ns_add $A $B
veth $A $B 10.202.0.1/24 10.202.0.2/24
keys wa wb ta tb

echo "== anchor: wireguard-go + kernel TCP"
wggo $A $WA $D/wa.key 100.64.0.1; wggo $B $WB $D/wb.key 100.64.0.2
ip netns exec $A wg set $WA peer $(cat $D/wb.pub) allowed-ips 100.64.0.2/32 endpoint 10.202.0.2:51820
ip netns exec $B wg set $WB peer $(cat $D/wa.pub) allowed-ips 100.64.0.1/32 endpoint 10.202.0.1:51820
ip -n $A route add 100.64.0.2/32 dev $WA; ip -n $B route add 100.64.0.1/32 dev $WB
ip netns exec $B iperf3 -s -D -B 100.64.0.2 -p 5201; (ip netns exec $B socat TCP-LISTEN:7001,bind=100.64.0.2,fork,reuseaddr EXEC:cat &); sleep 0.5
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
WG=$(ip netns exec $A iperf3 -c 100.64.0.2 -p 5201 -t $SECS | iperf_mbps sender)
WGLAT=$(latency $A 100.64.0.2 7001)
ip -n $A link del $WA; ip -n $B link del $WB
# Only the anchor's iperf3 server, found in our own namespace.
for p in $(ip netns pids $B); do if [ "$(cat /proc/$p/comm 2>/dev/null)" = iperf3 ]; then kill $p; fi; done; sleep 0.2

echo "== tailgate: two userspace nodes"
tgconf $D/ta.key 100.64.0.1 $D/tb.pub 100.64.0.2 10.202.0.2:51820 bencher > $D/ta.conf
tgconf $D/tb.key 100.64.0.2 $D/ta.pub 100.64.0.1 "" bencher > $D/tb.conf
# The inbound filter opens only what the policy grants.
cat > $D/policy.toml <<CONF
[[acl]]
src = ["bencher"]
dst = ["*:5201,7001"]
CONF
ip netns exec $B iperf3 -s -D -B 127.0.0.1 -p 5201
(ip netns exec $B socat TCP-LISTEN:7001,bind=127.0.0.1,fork,reuseaddr EXEC:cat &)
tg_up $B sb --wg-config $D/tb.conf --policy $D/policy.toml --no-ssh --forward 5201=127.0.0.1:5201 --forward 7001=127.0.0.1:7001
tg_up $A sa --wg-config $D/ta.conf --no-ssh --local-forward 127.0.0.1:15201=100.64.0.2:5201 --local-forward 127.0.0.1:17001=100.64.0.2:7001
wait_handshake $A sa
TG=$(ip netns exec $A iperf3 -c 127.0.0.1 -p 15201 -t $SECS | iperf_mbps sender)
TGLAT=$(latency $A 127.0.0.1 17001)
sleep 2
RSS=$(ps -o rss= -p $(tg_pid $B) | tr -d ' ')

echo
printf "bulk TCP   wireguard-go+kernel: %8s MB/s   tailgate: %8s MB/s   ratio %.2fx\n" "$WG" "$TG" "$(echo "$TG / $WG" | bc -l)"
printf "connect+1st byte (mean of 50)  wireguard-go: %s ms   tailgate: %s ms\n" "$(echo "scale=2; $WGLAT/1000" | bc)" "$(echo "scale=2; $TGLAT/1000" | bc)"
printf "tailgate idle RSS after the run: %s KiB\n" "$RSS"
