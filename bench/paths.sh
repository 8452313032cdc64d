#!/usr/bin/env bash
# Path benchmark (run as root; not a pass/fail test): the same two nodes over
# a direct UDP path and over the relay (the control server's TCP port), in
# one run, RUNS times interleaved (median and min-max). Prints time to first
# byte, bulk MB/s, the relay's CPU per MB, how long a relay path takes to
# upgrade to direct once UDP is allowed again, and (FAIR=1) two nodes sending
# through the relay to the same node at once.
#   RUNS=3 SECS=5 RELAY_RATE=<MB/s, 0 = none> FAIR=1 NAT_KINDS=1 bench/paths.sh
#   PERF=1: `perf record -g` the control process and both nodes during the
#   last relay run; prints each process's share and the top symbols.
#   PIN=1: the relay as deployed, on its own CPU: the control process on
#   CPU 1, both nodes and iperf3 on CPU 0 (direct and relay runs alike, so
#   both get the same node CPU).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bench_init tgpb
SECS=${SECS:-5}; RUNS=${RUNS:-3}; FAIR=${FAIR:-1}; NAT_KINDS=${NAT_KINDS:-1}; PERF=${PERF:-0}; PIN=${PIN:-0}
# PC runs the control process, PN the nodes and iperf3.
PC=""; PN=""
if [ "$PIN" = 1 ]; then PC="taskset -c 1"; PN="taskset -c 0"; fi
C=${P}c; V=${P}v; L=${P}l; M=${P}m; H=${P}h
ns_add $C $V $L $M $H
# One LAN: a bridge in the hub namespace, each node's veth end on it.
ip -n $H link add br0 type bridge; ip -n $H link set br0 up
i=1; for n in $C $V $L $M; do
  ip link add ${P}u$i type veth peer name ${P}w$i
  ip link set ${P}u$i netns $H; ip link set ${P}w$i netns $n
  ip -n $H link set ${P}u$i master br0; ip -n $H link set ${P}u$i up
  ip -n $n addr add 10.204.0.$i/24 dev ${P}w$i; ip -n $n link set ${P}w$i up
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
(ip netns exec $C $PC $BIN control --state-dir $D/ctl --listen 10.204.0.1:8443 --policy $D/policy.toml --metrics-listen 10.204.0.1:9464 ${RELAY_RATE:+--relay-rate $RELAY_RATE} > $D/ctl.log 2>&1 &)
sleep 1
ip netns exec $C $BIN control --state-dir $D/ctl users add bencher >/dev/null
VK=$(ip netns exec $C $PC $BIN control --state-dir $D/ctl keys create --tag tag:bench | tail -1)
LK=$(ip netns exec $C $PC $BIN control --state-dir $D/ctl keys create --user bencher | tail -1)
MK=$(ip netns exec $C $PC $BIN control --state-dir $D/ctl keys create --user bencher | tail -1)
ip netns exec $V $PN iperf3 -s -D -B 127.0.0.1 -p 5201
ip netns exec $V $PN iperf3 -s -D -B 127.0.0.1 -p 5202
(ip netns exec $V $PN $BIN up --authkey $VK --state-dir $D/vps --hostname vps --forward 5201=127.0.0.1:5201 --forward 5202=127.0.0.1:5202 > $D/vps.log 2>&1 &)
for i in $(seq 50); do ip netns exec $V $BIN status --state-dir $D/vps >/dev/null 2>&1 && break; sleep 0.1; done
VIP=$(ip netns exec $V $BIN status --json --state-dir $D/vps | python3 -c 'import json,sys; print(json.load(sys.stdin)["addresses"][0])')
(ip netns exec $L $PN $BIN up --authkey $LK --state-dir $D/laptop --hostname laptop --no-ssh --local-forward 127.0.0.1:15201=$VIP:5201 > $D/laptop.log 2>&1 &)
block_udp() { # only TCP to the control port gets out of namespace $1
  ip netns exec $1 nft add table inet f
  ip netns exec $1 nft "add chain inet f out { type filter hook output priority 0; }"
  ip netns exec $1 nft "add chain inet f in { type filter hook input priority 0; }"
  ip netns exec $1 nft add rule inet f out meta l4proto udp drop
  ip netns exec $1 nft add rule inet f in meta l4proto udp drop
}
# The second laptop never has UDP: it always relays (the fairness run).
if [ "$FAIR" = 1 ]; then
  block_udp $M
  (ip netns exec $M $PN $BIN up --authkey $MK --state-dir $D/m --hostname m --no-ssh --local-forward 127.0.0.1:15202=$VIP:5202 > $D/m.log 2>&1 &)
fi
# wait_for_path WANT [NS NAME]: the laptop's (or NAME's) path to the vps.
wait_for_path() { wait_path "$1" "${2:-$L}" "${3:-laptop}" vps; }
ttfb() { # mean ms of 20 connect + SSH banner through the daemon
  local t0 t1; t0=$(now)
  for i in $(seq 20); do ip netns exec $L bash -c "$BIN nc --state-dir $D/laptop vps 22 </dev/null | head -c 4 >/dev/null"; done
  t1=$(now); echo "($t1 - $t0) * 1000 / 20" | bc -l
}
mbps() { iperf_mbps sender; }
bulk() { ip netns exec ${1:-$L} $PN iperf3 -c 127.0.0.1 -p ${2:-15201} -t $SECS | mbps; }
# median and min-max of the arguments
stat3() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%7.2f (%.2f-%.2f)", m, v[1], v[NR]}'; }
# Relay CPU: the control process's utime+stime (clock ticks).
CPID=$(tg_pid $C); LPID=$(tg_pid $L); VPID=$(tg_pid $V)
metric() { ip netns exec $C curl -s http://10.204.0.1:9464/metrics | awk -v m="$1" '$1 ~ m {print $2}'; }
cpu() { awk '{print $14 + $15}' /proc/$CPID/stat; }

wait_for_path direct
DT=$(ttfb)
block_udp $L; wait_for_path relay; RT=$(ttfb); ip netns exec $L nft delete table inet f; wait_for_path direct
DBS=(); RBS=(); RATIO=(); MSPMB=(); UPS=()
for r in $(seq $RUNS); do
  db=$(bulk)
  block_udp $L; wait_for_path relay
  if [ "$PERF" = 1 ] && [ $r = $RUNS ]; then
    PP=""; for p in $CPID $LPID $VPID; do
      perf record -g -o $D/perf.$p -p $p -- sleep $SECS >$D/perf.$p.log 2>&1 & PP="$PP $!"
    done
  fi
  c0=$(cpu); rb=$(bulk); c1=$(cpu)
  [ "$PERF" = 1 ] && [ $r = $RUNS ] && wait $PP
  ip netns exec $L nft delete table inet f
  t0=$(now); wait_for_path direct; t1=$(now)
  DBS+=($db); RBS+=($rb); RATIO+=($(echo "$rb / $db" | bc -l)); UPS+=($(echo "$t1 - $t0" | bc -l))
  MSPMB+=($(echo "($c1 - $c0) * 1000 / $(getconf CLK_TCK) / ($rb * $SECS)" | bc -l))
  echo "run $r: direct $db MB/s, relay $rb MB/s" >&2
done
echo
echo "median (min-max) of $RUNS interleaved runs, ${SECS}s each, relay rate ${RELAY_RATE:-default}$([ "$PIN" = 1 ] && echo ", pinned: control on CPU 1, nodes + iperf3 on CPU 0")"
printf "direct: connect+banner %6.1f ms   bulk %s MB/s\n" "$DT" "$(stat3 ${DBS[@]})"
printf "relay:  connect+banner %6.1f ms   bulk %s MB/s\n" "$RT" "$(stat3 ${RBS[@]})"
printf "relay/direct bulk:                      %s x\n" "$(stat3 ${RATIO[@]})"
printf "relay CPU (control process):            %s ms/MB\n" "$(stat3 ${MSPMB[@]})"
printf "relay -> direct upgrade after UDP returns: %s s\n" "$(stat3 ${UPS[@]})"
if [ "$FAIR" = 1 ]; then
  # Both laptops relay to the vps at once, each its own iperf3.
  block_udp $L; wait_for_path relay; wait_for_path relay $M m
  FA=(); FB=()
  for r in $(seq $RUNS); do
    ip netns exec $M $PN iperf3 -c 127.0.0.1 -p 15202 -t $SECS | mbps > $D/fair_m &
    a=$(bulk); wait; b=$(cat $D/fair_m)
    FA+=($a); FB+=($b)
  done
  printf "relay, two senders at once: laptop %s MB/s   m %s MB/s\n" "$(stat3 ${FA[@]})" "$(stat3 ${FB[@]})"
fi
printf "relay drops (queue full): %s of %s datagrams\n" "$(metric 'relay_dropped.*queue_full')" "$(metric 'relay_forwarded_packets')"
if [ "$PERF" = 1 ]; then
  echo "perf, last relay run: samples and top symbols (self) of control $CPID, laptop $LPID, vps $VPID"
  for p in $CPID $LPID $VPID; do
    echo "-- pid $p: $(perf report -i $D/perf.$p --stdio 2>/dev/null | awk '/^# Samples/ {print $3, $4; exit}') samples"
    grep -i error $D/perf.$p.log || true
    perf report -i $D/perf.$p --no-children --stdio --sort symbol 2>/dev/null | grep -E '^ +[0-9]' | head -12 | cut -c1-110 || true
  done
fi
[ "$NAT_KINDS" = 1 ] || exit 0
# Each NAT router kind: the path reached and the time to reach it.
bench_cleanup; trap - EXIT
exec bench/nat-kinds.sh
