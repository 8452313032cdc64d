#!/usr/bin/env bash
# Path benchmark (run as root; not a pass/fail test): the same two nodes over
# a direct UDP path and over the relay (the control server's TCP port), in
# one run. Prints time to first byte, bulk MB/s, and how long a relay path
# takes to upgrade to direct once UDP is allowed again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath ${TAILGATE_BIN:-target/release/tailgate})
[ -x "$BIN" ] || cargo build --release --quiet
SECS=${SECS:-5}
# Names carry our pid so two runs (or engineers) never share a namespace.
C=tgpb_c$$; V=tgpb_v$$; L=tgpb_l$$; H=tgpb_h$$
D=$(mktemp -d /tmp/tgpathbench.XXXX)
cleanup() {
  for n in $C $V $L $H; do for p in $(ip netns pids $n 2>/dev/null); do kill -9 $p 2>/dev/null || true; done; done
  sleep 0.2; for n in $C $V $L $H; do ip netns del $n 2>/dev/null || true; done; rm -rf "$D"
}
trap cleanup EXIT
now() { date +%s.%N; }
for n in $C $V $L $H; do ip netns add $n; ip -n $n link set lo up; done
ip -n $H link add br0 type bridge; ip -n $H link set br0 up
i=1; for n in $C $V $L; do
  ip link add tgpb$$u$i type veth peer name tgpb$$v$i
  ip link set tgpb$$u$i netns $H; ip link set tgpb$$v$i netns $n
  ip -n $H link set tgpb$$u$i master br0; ip -n $H link set tgpb$$u$i up
  ip -n $n addr add 10.204.0.$i/24 dev tgpb$$v$i; ip -n $n link set tgpb$$v$i up
  i=$((i+1))
done
cat > $D/policy.toml <<CONF
[tag_owners]
"tag:bench" = ["bencher"]
[[acl]]
src = ["bencher"]
dst = ["tag:bench:*"]
[[tests]]
src = "bencher"
dst = "tag:bench"
reach = [5201]
CONF
(ip netns exec $C $BIN control --state-dir $D/ctl --listen 10.204.0.1:8443 --policy $D/policy.toml ${RELAY_RATE:+--relay-rate $RELAY_RATE} > $D/ctl.log 2>&1 &)
sleep 1
ip netns exec $C $BIN control --state-dir $D/ctl users add bencher >/dev/null
VK=$(ip netns exec $C $BIN control --state-dir $D/ctl keys create --tag tag:bench | tail -1)
LK=$(ip netns exec $C $BIN control --state-dir $D/ctl keys create --user bencher | tail -1)
ip netns exec $V iperf3 -s -D -B 127.0.0.1 -p 5201
(ip netns exec $V $BIN up --authkey $VK --state-dir $D/vps --hostname vps --forward 5201=127.0.0.1:5201 > $D/vps.log 2>&1 &)
for i in $(seq 50); do ip netns exec $V $BIN status --state-dir $D/vps >/dev/null 2>&1 && break; sleep 0.1; done
VIP=$(ip netns exec $V $BIN status --json --state-dir $D/vps | python3 -c 'import json,sys; print(json.load(sys.stdin)["addresses"][0])')
(ip netns exec $L $BIN up --authkey $LK --state-dir $D/laptop --hostname laptop --no-ssh --local-forward 127.0.0.1:15201=$VIP:5201 > $D/laptop.log 2>&1 &)
path() { ip netns exec $L $BIN status --json --state-dir $D/laptop 2>/dev/null | python3 -c 'import json,sys
try: print(json.load(sys.stdin)["peers"][0]["path"])
except Exception: print("none")'; }
wait_path() { for i in $(seq 200); do p=$(path); case "$p" in $1*) return 0;; esac; sleep 0.1; done; echo "path stayed $p" >&2; return 1; }
ttfb() { # mean ms of 20 connect + SSH banner through the daemon
  local t0 t1; t0=$(now)
  for i in $(seq 20); do ip netns exec $L bash -c "$BIN nc --state-dir $D/laptop vps 22 </dev/null | head -c 4 >/dev/null"; done
  t1=$(now); echo "($t1 - $t0) * 1000 / 20" | bc -l
}
mbps() { awk '/sender/ {for(i=1;i<=NF;i++) if($i ~ /bits\/sec/){v=$(i-1); u=$i}} END { if(u ~ /^G/) v*=1000; if (u ~ /^K/) v/=1000; printf "%.1f", v/8 }'; }

wait_path direct
DT=$(ttfb); DB=$(ip netns exec $L iperf3 -c 127.0.0.1 -p 15201 -t $SECS | mbps)
# UDP blocked on the laptop: only TCP to the control port gets out.
ip netns exec $L nft add table inet f
ip netns exec $L nft "add chain inet f out { type filter hook output priority 0; }"
ip netns exec $L nft "add chain inet f in { type filter hook input priority 0; }"
ip netns exec $L nft add rule inet f out meta l4proto udp drop
ip netns exec $L nft add rule inet f in meta l4proto udp drop
wait_path relay
RT=$(ttfb)
# Relay CPU: the control process's utime+stime (clock ticks) around the bulk run.
cpu() { awk '{print $14 + $15}' /proc/$(ip netns pids $C | head -1)/stat; }
C0=$(cpu); RB=$(ip netns exec $L iperf3 -c 127.0.0.1 -p 15201 -t $SECS | mbps); C1=$(cpu)
RCPU=$(echo "($C1 - $C0) / $(getconf CLK_TCK)" | bc -l)
ip netns exec $L nft flush table inet f
t0=$(now); wait_path direct; t1=$(now)
UP=$(echo "$t1 - $t0" | bc -l)
echo
printf "direct: connect+banner %6.1f ms   bulk %7.1f MB/s\n" "$DT" "$DB"
printf "relay:  connect+banner %6.1f ms   bulk %7.1f MB/s   (relay/direct bulk %.2fx)\n" "$RT" "$RB" "$(echo "$RB / $DB" | bc -l)"
printf "relay CPU (control process): %.2f s for %.0f MB = %.2f ms/MB\n" "$RCPU" "$(echo "$RB * $SECS" | bc -l)" "$(echo "$RCPU * 1000 / ($RB * $SECS)" | bc -l)"
printf "relay -> direct upgrade after UDP returns: %.1f s\n" "$UP"
# Each NAT router kind: the path reached and the time to reach it.
cleanup; trap - EXIT
exec bench/nat-kinds.sh
