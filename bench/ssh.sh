#!/usr/bin/env bash
# SSH benchmark (run as root; not a pass/fail test). Same run, same machine:
#   anchor:   OpenSSH sshd behind wireguard-go, kernel TCP (../shared/lab/anchor-lab.sh)
#   tailgate: `tailgate up` with its embedded SSH server in one namespace, stock
#             `ssh` with `ProxyCommand tailgate nc` in another
# Prints 512 MiB bulk time, MB/s, mean `ssh true` time over 20 logins, ratios.
set -euo pipefail
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

echo "== anchor: OpenSSH over wireguard-go"
"$LAB" down >/dev/null 2>&1 || true
"$LAB" up >/dev/null 2>&1
AD=$(cat /tmp/anchorlab.dir)
measure anchor "ip netns exec tgla ssh -i $AD/userkey $SO root@100.64.0.2"
AB=$BULK; AL=$LOGIN
"$LAB" down >/dev/null 2>&1 || true

echo "== tailgate: embedded SSH, client via tailgate nc"
ip netns add $A; ip netns add $B
ip link add tgsva type veth peer name tgsvb
ip link set tgsva netns $A; ip link set tgsvb netns $B
ip -n $A addr add 10.203.0.1/24 dev tgsva; ip -n $B addr add 10.203.0.2/24 dev tgsvb
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set tgsva up; ip -n $B link set tgsvb up
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
t0=$(now); ip netns exec $A bash -c "echo | $BIN nc --state-dir $D/laptop vps 22 | head -c 7 >/dev/null"; t1=$(now)
ONESHOT=$(echo "($t1 - $t0)*1000" | bc -l)
(ip netns exec $A $BIN up --state-dir $D/laptop --hostname laptop --no-ssh > $D/laptop2.log 2>&1 &)
sleep 1
# The daemon needs its netmap before the first login (slow on a busy machine).
for i in $(seq 40); do ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps true 2>/dev/null && break; sleep 0.5; done
t0=$(now); for i in $(seq $N); do ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps true; done; t1=$(now)
WARM=$(echo "($t1 - $t0) * 1000 / $N" | bc -l)
printf "tailgate  warm daemon: tailgate ssh vps true: %6.1f ms mean of %d\n" "$WARM" "$N"

echo "== recording cost: 512 MiB of text over \`tailgate ssh vps\`, unrecorded vs record = true (spooled + shipped to control)"
# Text, not zeros: a terminal recording stores output as JSON strings, where a
# NUL byte costs six characters; both runs carry the same bytes.
bulk_ctl() {
  local t0 t1 n
  t0=$(now); n=$(ip netns exec $A $BIN ssh --state-dir $D/laptop root@vps "head -c $BYTES /dev/zero | tr '\\0' x" | wc -c); t1=$(now)
  [ "$n" = "$BYTES" ] || { echo "recording bench: bulk transfer returned $n bytes" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}
PLAIN=$(bulk_ctl)
sed -i 's/^action = "accept"$/action = "accept"\nrecord = true/' $D/cpolicy.toml   # control polls the file every second
sleep 3
REC=$(bulk_ctl)
ls $D/vps/recordings/*.cast >/dev/null 2>&1 || { echo "recording bench: no recording was made" >&2; exit 1; }
printf "unrecorded   512 MiB in %6.2f s (%6.1f MB/s)\n" "$PLAIN" "$(echo "$BYTES/1000000/$PLAIN" | bc -l)"
printf "record=true  512 MiB in %6.2f s (%6.1f MB/s)\n" "$REC" "$(echo "$BYTES/1000000/$REC" | bc -l)"
printf "recording cost (recorded/unrecorded time, 1.00 = free; target <= 1.10): %.2fx\n" "$(echo "$REC / $PLAIN" | bc -l)"
echo
printf "throughput ratio (tailgate/anchor, higher is better): %.2fx\n" "$(echo "$AB / $TB" | bc -l)"
printf "login time ratio, static nc (tailgate/anchor, lower is better):  %.2fx\n" "$(echo "$TL / $AL" | bc -l)"
printf "login time ratio, warm daemon (tailgate/anchor, lower is better): %.2fx\n" "$(echo "$WARM / $AL" | bc -l)"
printf "one-shot tailgate nc join + SSH banner: static config %.1f ms, control mode (login + netmap) %.1f ms\n" "$STATIC_JOIN" "$ONESHOT"
