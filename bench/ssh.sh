#!/usr/bin/env bash
# SSH benchmark (run as root; not a pass/fail test). Same run, same machine:
#   anchor:   OpenSSH sshd behind wireguard-go, kernel TCP (../shared/lab/anchor-lab.sh)
#   tailgate: `tailgate up` with its embedded SSH server in one namespace, stock
#             `ssh` with `ProxyCommand tailgate nc` in another
# Prints 512 MiB bulk time, MB/s, mean `ssh true` time over 20 logins, ratios.
#
# `bench/ssh.sh record` runs only the recording-cost part: for each size in
# RECORD_MIB (default "512 2048"), REPS (default 3) interleaved pairs
# unrecorded / record = true over the same warm daemon, each figure, the
# median and spread of the time ratio and of the CPU ratio (client + node +
# control, shipping included), and how long after each recorded session ended
# control held the complete recording (the shipping lag), and the node's CPU
# ratio per pair (what recording adds where the session runs). PERF_DIR=dir also
# profiles the node and control (perf record -g) during each recorded run
# (PERF_FREQ, default 499 Hz); with PERF_ALL=1 also the whole machine during
# both runs of each pair (perf record -a), to see the client and the kernel.
set -euo pipefail
MODE=${1:-all}; REPS=${REPS:-3}
cd "$(dirname "$0")/.."
BIN=$(realpath ${TAILGATE_BIN:-target/release/tailgate})
[ -x "$BIN" ] || cargo build --release --quiet
LAB=${ANCHOR_LAB:-../shared/lab/anchor-lab.sh}
BYTES=$((512*1024*1024)); N=${N:-20}
A=tgsb_a; B=tgsb_b
D=$(mktemp -d /tmp/tgsshbench.XXXX)
cleanup() {
  for n in $A $B; do for p in $(ip netns pids $n 2>/dev/null); do kill -9 $p 2>/dev/null || true; done; done
  sleep 0.2; ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true; rm -rf "$D"
  [ -x "$LAB" ] && "$LAB" down >/dev/null 2>&1 || true
}
trap cleanup EXIT
now() { date +%s.%N; }
SO="-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

measure() { # $1 = label, $2 = command prefix that runs ssh to the target (add the remote command)
  local t0 t1 n
  t0=$(now); n=$(eval "$2 'head -c $BYTES /dev/zero'" | wc -c); t1=$(now)
  [ "$n" = "$BYTES" ] || { echo "$1: bulk transfer returned $n bytes" >&2; exit 1; }
  BULK=$(echo "$t1 - $t0" | bc -l)
  t0=$(now); for i in $(seq $N); do eval "$2 true"; done; t1=$(now)
  LOGIN=$(echo "($t1 - $t0) * 1000 / $N" | bc -l)
  printf "%-9s 512 MiB in %6.2f s (%6.1f MB/s)   ssh true: %6.1f ms mean of %d\n" "$1" "$BULK" "$(echo "$BYTES/1000000/$BULK" | bc -l)" "$LOGIN" "$N"
}

ip netns add $A; ip netns add $B
ip link add tgsva type veth peer name tgsvb
ip link set tgsva netns $A; ip link set tgsvb netns $B
ip -n $A addr add 10.203.0.1/24 dev tgsva; ip -n $B addr add 10.203.0.2/24 dev tgsvb
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set tgsva up; ip -n $B link set tgsvb up
if [ "$MODE" != record ]; then
echo "== anchor: OpenSSH over wireguard-go"
"$LAB" down >/dev/null 2>&1 || true
"$LAB" up >/dev/null 2>&1
AD=$(cat /tmp/anchorlab.dir)
measure anchor "ip netns exec tgla ssh -i $AD/userkey $SO root@100.64.0.2"
AB=$BULK; AL=$LOGIN
"$LAB" down >/dev/null 2>&1 || true

echo "== tailgate: embedded SSH, client via tailgate nc"
for x in c s; do $BIN genkey > $D/$x.key; $BIN pubkey < $D/$x.key > $D/$x.pub; done
cat > $D/s.conf <<CONF
[Interface]
# tailgate-tags = tag:bench
PrivateKey = $(cat $D/s.key)
Address = 100.64.0.2/32
ListenPort = 51820
[Peer]
# tailgate-user = bencher
PublicKey = $(cat $D/c.pub)
AllowedIPs = 100.64.0.1/32
CONF
cat > $D/c.conf <<CONF
[Interface]
PrivateKey = $(cat $D/c.key)
Address = 100.64.0.1/32
[Peer]
PublicKey = $(cat $D/s.pub)
AllowedIPs = 100.64.0.2/32
Endpoint = 10.203.0.2:51820
CONF
cat > $D/policy.toml <<CONF
[tag_owners]
"tag:bench" = ["bencher"]
[[ssh]]
src = ["bencher"]
dst = ["tag:bench"]
users = ["root"]
action = "accept"
CONF
(ip netns exec $B $BIN up --wg-config $D/s.conf --policy $D/policy.toml --state-dir $D/state > $D/s.log 2>&1 &)
sleep 1
measure tailgate "ip netns exec $A ssh $SO -o ProxyCommand='$BIN nc --wg-config $D/c.conf %h %p' root@100.64.0.2"
TB=$BULK; TL=$LOGIN
t0=$(now); ip netns exec $A bash -c "echo | $BIN nc --wg-config $D/c.conf 100.64.0.2 22 | head -c 7 >/dev/null"; t1=$(now)
STATIC_JOIN=$(echo "($t1 - $t0)*1000" | bc -l)
pkill -f "state-dir $D/state" || true
fi

echo "== tailgate control mode: warm daemon on the laptop, \`tailgate ssh vps\`"
cat > $D/cpolicy.toml <<CONF
[tag_owners]
"tag:bench" = ["bencher"]
[[ssh]]
src = ["bencher"]
dst = ["tag:bench"]
users = ["root"]
action = "accept"
[[tests]]
src = "bencher"
dst = "tag:bench"
accept = ["root"]
CONF
(ip netns exec $B $BIN control --state-dir $D/ctl --listen 10.203.0.2:8443 --policy $D/cpolicy.toml > $D/ctl.log 2>&1 &)
sleep 1
ip netns exec $B $BIN control --state-dir $D/ctl users add bencher >/dev/null
SK=$(ip netns exec $B $BIN control --state-dir $D/ctl keys create --tag tag:bench | tail -1)
LK=$(ip netns exec $B $BIN control --state-dir $D/ctl keys create --user bencher | tail -1)
(ip netns exec $B $BIN up --authkey $SK --state-dir $D/vps --hostname vps --ssh-port 22 > $D/vps.log 2>&1 &)
sleep 1
# Register the laptop, then stop it: the one-shot join below uses its saved key.
(ip netns exec $A $BIN up --authkey $LK --state-dir $D/laptop --hostname laptop --no-ssh > $D/laptop.log 2>&1 &)
sleep 1; pkill -f "state-dir $D/laptop" || true; sleep 0.5
if [ "$MODE" != record ]; then
t0=$(now); ip netns exec $A bash -c "echo | $BIN nc --state-dir $D/laptop vps 22 | head -c 7 >/dev/null"; t1=$(now)
ONESHOT=$(echo "($t1 - $t0)*1000" | bc -l)
fi
(ip netns exec $A $BIN up --state-dir $D/laptop --hostname laptop --no-ssh > $D/laptop2.log 2>&1 &)
sleep 1
# The daemon needs its netmap before the first login (slow on a busy machine).
for i in $(seq 40); do ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps true 2>/dev/null && break; sleep 0.5; done
if [ "$MODE" != record ]; then
t0=$(now); for i in $(seq $N); do ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps true; done; t1=$(now)
WARM=$(echo "($t1 - $t0) * 1000 / $N" | bc -l)
printf "tailgate  warm daemon: tailgate ssh vps true: %6.1f ms mean of %d\n" "$WARM" "$N"

fi

# Recording cost: for each size in RECORD_MIB (MiB; `record` mode: 512 and a
# long case of 2048, whose bulk output lasts well past ship::MAX_HOLD), REPS
# interleaved pairs unrecorded / record = true over the same warm daemon.
RECORD_MIB=${RECORD_MIB:-$([ "$MODE" = record ] && echo "512 2048" || echo 512)}
# Text, not zeros: a terminal recording stores output as JSON strings, where a
# NUL byte costs six characters; both runs carry the same bytes.
bulk_ctl() { # prints "seconds client-CPU-seconds" (the `tailgate ssh` pipeline)
  local t0 t1 n c0 c1 me=$BASHPID
  c0=$(awk '{print $16 + $17}' /proc/$me/stat)
  t0=$(now); n=$(ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps "head -c $BYTES /dev/zero | tr '\\0' x" | wc -c); t1=$(now)
  c1=$(awk '{print $16 + $17}' /proc/$me/stat)
  [ "$n" = "$BYTES" ] || { echo "recording bench: bulk transfer returned $n bytes" >&2; exit 1; }
  echo "$(echo "$t1 - $t0" | bc -l) $(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)"
}
set_record() { # $1 = true|false; control polls the policy file every second
  sed -i '/^record = /d' $D/cpolicy.toml
  [ "$1" = true ] && sed -i 's/^action = "accept"$/action = "accept"\nrecord = true/' $D/cpolicy.toml
  sleep 3
}
complete_recordings() {
  ip netns exec $B $BIN control --state-dir $D/ctl --json recordings list 2>/dev/null | grep -c '"complete": true' || true
}
cpu_s() { # CPU seconds (user + system) used so far by the processes whose command line matches $1
  local t=0 p
  for p in $(pgrep -f "$1"); do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0))); done
  echo "$t / $(getconf CLK_TCK)" | bc -l
}
cpu3() { # CPU seconds so far of the laptop daemon, the node and control
  echo "$(cpu_s "up --state-dir $D/laptop") $(cpu_s "state-dir $D/vps") $(cpu_s "state-dir $D/ctl --listen")"
}
cpu_sum() { # total CPU seconds between two cpu3 snapshots
  local a=($1) b=($2)
  echo "${b[0]} + ${b[1]} + ${b[2]} - ${a[0]} - ${a[1]} - ${a[2]}" | bc -l
}
node_cpu() { # the node's CPU seconds between two cpu3 snapshots
  local a=($1) b=($2)
  echo "${b[1]} - ${a[1]}" | bc -l
}
cpu_diff() { # "laptop node control" CPU seconds between two cpu3 snapshots
  local a=($1) b=($2)
  printf "laptop %.2f + node %.2f + control %.2f = %.2f s" "$(echo "${b[0]} - ${a[0]}" | bc -l)" "$(echo "${b[1]} - ${a[1]}" | bc -l)" \
    "$(echo "${b[2]} - ${a[2]}" | bc -l)" "$(cpu_sum "$1" "$2")"
}
stats() { # median and spread (max - min) of the arguments
  printf "%s\n" "$@" | sort -g | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2; printf "%.2f %.2f\n", m, v[NR] - v[1]}'
}
SUMMARY=()
for MIB in $RECORD_MIB; do
BYTES=$((MIB*1024*1024))
echo "== recording cost: $MIB MiB of text over \`tailgate ssh vps\`, unrecorded vs record = true (spooled + shipped to control), $REPS interleaved pairs"
PLAINS=(); RECS=(); LAGS=(); RATIOS=(); CRATIOS=(); NRATIOS=()
for r in $(seq $REPS); do
  set_record false
  # PERF_ALL=1 (with PERF_DIR): also sample the whole machine during both runs,
  # to see what every process (client, laptop, node, kernel threads) spends.
  perf_all() { [ -n "${PERF_DIR:-}" ] && [ -n "${PERF_ALL:-}" ] && { perf record -q -a -F 999 -o "$PERF_DIR/all-$MIB-$r-$1.data" >/dev/null 2>&1 & echo $!; } || true; }
  PA=$(perf_all plain)
  c0=$(cpu3); read P PC < <(bulk_ctl); c1=$(cpu3)
  [ -n "$PA" ] && { kill -INT $PA; wait $PA 2>/dev/null || true; }
  set_record true
  before=$(complete_recordings)
  # PERF_DIR=dir: profile the node and control during the recorded run (`perf report -i dir/...`).
  PERFS=()
  if [ -n "${PERF_DIR:-}" ]; then
    for w in "node:state-dir $D/vps" "control:state-dir $D/ctl --listen"; do
      perf record -q -F ${PERF_FREQ:-499} -g -o "$PERF_DIR/${w%%:*}-$MIB-$r.data" -p "$(pgrep -f "${w#*:}" | head -1)" >/dev/null 2>&1 & PERFS+=($!)
    done
  fi
  PA=$(perf_all rec)
  c2=$(cpu3); read R RC < <(bulk_ctl); t1=$(now); c3=$(cpu3)
  [ -n "$PA" ] && { kill -INT $PA; wait $PA 2>/dev/null || true; }
  for p in "${PERFS[@]}"; do kill -INT $p 2>/dev/null || true; wait $p 2>/dev/null || true; done
  # Shipping lag: from the end of the session until control holds all of it.
  for i in $(seq 3000); do [ "$(complete_recordings)" -gt "$before" ] && break; sleep 0.1; done
  [ "$(complete_recordings)" -gt "$before" ] || { echo "recording bench: control never completed the recording" >&2; exit 1; }
  L=$(echo "$(now) - $t1" | bc -l); c4=$(cpu3)
  # CPU ratio: everything the recorded session cost (client, node, control,
  # including shipping after it ended) over the same for the unrecorded one.
  CR=$(echo "($RC + $(cpu_sum "$c2" "$c4")) / ($PC + $(cpu_sum "$c0" "$c1"))" | bc -l)
  # The node's own CPU during each session: what recording adds where the
  # session runs, less swayed than wall time by the client and by other load.
  NRATIOS+=("$(echo "$(node_cpu "$c2" "$c3") / $(node_cpu "$c0" "$c1")" | bc -l)")
  PLAINS+=("$P"); RECS+=("$R"); LAGS+=("$L"); RATIOS+=("$(echo "$R / $P" | bc -l)"); CRATIOS+=("$CR")
  printf "pair %d: unrecorded %6.2f s (%6.1f MB/s)   record=true %6.2f s (%6.1f MB/s)   ratio %.2fx   CPU ratio %.2fx   complete at control %.2f s after the session\n" \
    "$r" "$P" "$(echo "$BYTES/1000000/$P" | bc -l)" "$R" "$(echo "$BYTES/1000000/$R" | bc -l)" "$(echo "$R / $P" | bc -l)" "$CR" "$L"
  printf "        CPU unrecorded:          client %.2f + %s\n" "$PC" "$(cpu_diff "$c0" "$c1")"
  printf "        CPU record=true:         client %.2f + %s\n" "$RC" "$(cpu_diff "$c2" "$c3")"
  echo "        CPU after it, shipping:  $(cpu_diff "$c3" "$c4")"
done
ls $D/vps/recordings/*.cast >/dev/null 2>&1 || { echo "recording bench: no recording was made" >&2; exit 1; }
read PM PS < <(stats "${PLAINS[@]}"); read RM RS < <(stats "${RECS[@]}")
read QM QS < <(stats "${RATIOS[@]}"); read LM LS < <(stats "${LAGS[@]}"); read CM CS < <(stats "${CRATIOS[@]}"); read NM NS < <(stats "${NRATIOS[@]}")
SUMMARY+=("$(printf "unrecorded   %5d MiB: median %6.2f s (%6.1f MB/s), spread %.2f s" "$MIB" "$PM" "$(echo "$BYTES/1000000/$PM" | bc -l)" "$PS")")
SUMMARY+=("$(printf "record=true  %5d MiB: median %6.2f s (%6.1f MB/s), spread %.2f s" "$MIB" "$RM" "$(echo "$BYTES/1000000/$RM" | bc -l)" "$RS")")
SUMMARY+=("$(printf "recording cost %d MiB (recorded/unrecorded time per pair, 1.00 = free; target <= 1.10): median %.2fx, spread %.2f" "$MIB" "$QM" "$QS")")
SUMMARY+=("$(printf "CPU cost %d MiB (client + node + control CPU-s, shipping included, per pair): median %.2fx, spread %.2f" "$MIB" "$CM" "$CS")")
SUMMARY+=("$(printf "node CPU during the session %d MiB (recorded/unrecorded, per pair): median %.2fx, spread %.2f" "$MIB" "$NM" "$NS")")
SUMMARY+=("$(printf "shipping lag %d MiB (session end -> complete at control): median %.2f s, spread %.2f s" "$MIB" "$LM" "$LS")")
done
printf "%s\n" "${SUMMARY[@]}"
[ "$MODE" = record ] && exit 0
echo
printf "throughput ratio (tailgate/anchor, higher is better): %.2fx\n" "$(echo "$AB / $TB" | bc -l)"
printf "login time ratio, static nc (tailgate/anchor, lower is better):  %.2fx\n" "$(echo "$TL / $AL" | bc -l)"
printf "login time ratio, warm daemon (tailgate/anchor, lower is better): %.2fx\n" "$(echo "$WARM / $AL" | bc -l)"
printf "one-shot tailgate nc join + SSH banner: static config %.1f ms, control mode (login + netmap) %.1f ms\n" "$STATIC_JOIN" "$ONESHOT"
