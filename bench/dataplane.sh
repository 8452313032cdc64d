#!/usr/bin/env bash
# Data-plane benchmark (run as root; not a pass/fail test).
# Two namespaces joined by a veth. The same run measures:
#   anchor:   wireguard-go on both ends + kernel TCP (iperf3 straight through)
#   tailgate: two `tailgate up` nodes; iperf3 enters through --local-forward on
#             one and leaves through --forward on the other (userspace TCP
#             both ends, plus a loopback hop each side that the anchor lacks)
# and prints MB/s, the ratio, TCP connect + first byte latency, and idle RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TAILGATE_BIN:-target/release/tailgate}
[ -x "$BIN" ] || cargo build --release --quiet
SECS=${SECS:-8}
# Names carry our pid so two runs (or engineers) never share a namespace.
A=tgbench_a$$; B=tgbench_b$$; VA=tgbva$$; VB=tgbvb$$; WA=wgba$$; WB=wgbb$$
D=$(mktemp -d /tmp/tgbench.XXXX)
cleanup() {
  for n in $A $B; do for p in $(ip netns pids $n 2>/dev/null); do kill -9 $p 2>/dev/null || true; done; done
  sleep 0.2; ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  rm -f /var/run/wireguard/$WA.sock /var/run/wireguard/$WB.sock; rm -rf "$D"
}
trap cleanup EXIT
ip netns add $A; ip netns add $B
ip link add $VA type veth peer name $VB
ip link set $VA netns $A; ip link set $VB netns $B
ip -n $A addr add 10.202.0.1/24 dev $VA; ip -n $B addr add 10.202.0.2/24 dev $VB
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set $VA up; ip -n $B link set $VB up
for x in wa wb ta tb; do $BIN genkey > $D/$x.key; $BIN pubkey < $D/$x.key > $D/$x.pub; done

mbps() { awk '/sender/ {for(i=1;i<=NF;i++) if($i ~ /bits\/sec/){v=$(i-1); u=$i}} END { if(u ~ /^G/) v*=1000; if (u ~ /^K/) v/=1000; printf "%.1f", v/8 }'; }
latency() { # $1 ns, $2 host, $3 port: mean ms of 50 connect+echo+first-byte round trips
  ip netns exec $1 bash -c "s=\$(date +%s%N); for i in \$(seq 50); do echo x | nc -N -w 5 $2 $3 >/dev/null; done; e=\$(date +%s%N); echo \$(( (e-s)/50000 ))"
}

echo "== anchor: wireguard-go + kernel TCP"
ip netns exec $A env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go $WA >/dev/null 2>&1
ip netns exec $B env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go $WB >/dev/null 2>&1
ip netns exec $A wg set $WA private-key $D/wa.key listen-port 51820 peer $(cat $D/wb.pub) allowed-ips 100.64.0.2/32 endpoint 10.202.0.2:51820
ip netns exec $B wg set $WB private-key $D/wb.key listen-port 51820 peer $(cat $D/wa.pub) allowed-ips 100.64.0.1/32 endpoint 10.202.0.1:51820
ip -n $A addr add 100.64.0.1/32 dev $WA; ip -n $A link set $WA up; ip -n $A route add 100.64.0.2/32 dev $WA
ip -n $B addr add 100.64.0.2/32 dev $WB; ip -n $B link set $WB up; ip -n $B route add 100.64.0.1/32 dev $WB
ip netns exec $B iperf3 -s -D -B 100.64.0.2 -p 5201; (ip netns exec $B socat TCP-LISTEN:7001,bind=100.64.0.2,fork,reuseaddr EXEC:cat &); sleep 0.5
ip netns exec $A ping -c 1 -W 2 100.64.0.2 >/dev/null
WG=$(ip netns exec $A iperf3 -c 100.64.0.2 -p 5201 -t $SECS | mbps)
WGLAT=$(latency $A 100.64.0.2 7001)
ip -n $A link del $WA; ip -n $B link del $WB
# Only the anchor's iperf3 server, found in our own namespace.
for p in $(ip netns pids $B); do if [ "$(cat /proc/$p/comm 2>/dev/null)" = iperf3 ]; then kill $p; fi; done; sleep 0.2

echo "== tailgate: two userspace nodes"
cat > $D/ta.conf <<CONF
[Interface]
PrivateKey = $(cat $D/ta.key)
Address = 100.64.0.1/32
ListenPort = 51820
[Peer]
PublicKey = $(cat $D/tb.pub)
AllowedIPs = 100.64.0.2/32
Endpoint = 10.202.0.2:51820
CONF
cat > $D/tb.conf <<CONF
[Interface]
PrivateKey = $(cat $D/tb.key)
Address = 100.64.0.2/32
ListenPort = 51820
[Peer]
# tailgate-user = bencher
PublicKey = $(cat $D/ta.pub)
AllowedIPs = 100.64.0.1/32
CONF
# The inbound filter opens only what the policy grants.
cat > $D/policy.toml <<CONF
[[acl]]
src = ["bencher"]
dst = ["*:5201,7001"]
CONF
ip netns exec $B iperf3 -s -D -B 127.0.0.1 -p 5201
(ip netns exec $B socat TCP-LISTEN:7001,bind=127.0.0.1,fork,reuseaddr EXEC:cat &)
(ip netns exec $B $BIN up --wg-config $D/tb.conf --policy $D/policy.toml --state-dir $D/sb --no-ssh --forward 5201=127.0.0.1:5201 --forward 7001=127.0.0.1:7001 > $D/tb.log 2>&1 &)
sleep 0.5
(ip netns exec $A $BIN up --wg-config $D/ta.conf --state-dir $D/sa --no-ssh --local-forward 127.0.0.1:15201=100.64.0.2:5201 --local-forward 127.0.0.1:17001=100.64.0.2:7001 > $D/ta.log 2>&1 &)
sleep 1
TG=$(ip netns exec $A iperf3 -c 127.0.0.1 -p 15201 -t $SECS | mbps)
TGLAT=$(latency $A 127.0.0.1 17001)
sleep 2
RSS=$(ps -o rss= -p $(pgrep -f "up --wg-config $D/tb.conf") | tr -d ' ')

echo
printf "bulk TCP   wireguard-go+kernel: %8s MB/s   tailgate: %8s MB/s   ratio %.2fx\n" "$WG" "$TG" "$(echo "$TG / $WG" | bc -l)"
printf "connect+1st byte (mean of 50)  wireguard-go: %s ms   tailgate: %s ms\n" "$(echo "scale=2; $WGLAT/1000" | bc)" "$(echo "scale=2; $TGLAT/1000" | bc)"
printf "tailgate idle RSS after the run: %s KiB\n" "$RSS"
