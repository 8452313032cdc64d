#!/usr/bin/env bash
# Which path each kind of NAT router gets, and how fast (run as root; not a
# pass/fail test). For every case: control on the "internet", a vps and a
# laptop each behind its own router; prints the path the laptop reached and
# the seconds from its `tailgate up` returning to that path (20 s at most).
# Sourced by bench/paths.sh; REPEAT=N runs each case N times.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bench_init tgnk
REPEAT=${REPEAT:-3}
NET=45.50.0   # public-looking (miniupnpd maps nothing on private WAN addresses); exists only in these namespaces
NSS="${P}h ${P}c ${P}ra ${P}rb ${P}na ${P}nb"
# Each case builds its namespaces afresh; the EXIT trap (bench_cleanup)
# covers the case that is running when we stop.
teardown() {
  local n   # bash scoping: one_case's $p must survive this
  ns_kill $NSS
  for n in $NSS; do ip netns del $n 2>/dev/null || true; done
  BENCH_NSS=()
}

# router NS NODE_NS LAN KIND: KIND is fullcone | masq | masqfw | symmetric | udpblock | natpmp | upnp
# (natpmp: miniupnpd answering PCP and NAT-PMP; tailgate maps with PCP there;
# upnp: miniupnpd offering UPnP IGD only, SSDP on the LAN interface)
router() {
  local r=$1 n=$2 lan=$3 kind=$4 x
  ip link add ${r}l type veth peer name ${n}l; ip link set ${r}l netns $r; ip link set ${n}l netns $n
  ip -n $r addr add $lan.1/24 dev ${r}l; ip -n $r link set ${r}l up; ip netns exec $r sysctl -qw net.ipv4.ip_forward=1
  ip -n $n addr add $lan.2/24 dev ${n}l; ip -n $n link set ${n}l up; ip -n $n route add default via $lan.1
  x="ip netns exec $r nft"
  $x add table ip nat; $x "add chain ip nat post { type nat hook postrouting priority 100; }"
  $x "add chain ip nat pre { type nat hook prerouting priority -100; }"
  $x add table ip filter; $x "add chain ip filter forwarding { type filter hook forward priority 0; }"
  case $kind in
    fullcone|udpblock) $x add rule ip nat post oifname != ${r}l masquerade persistent
              $x add rule ip nat pre iifname != ${r}l udp dport 41641 dnat to $lan.2:41641 ;;
    symmetric) $x add rule ip nat post oifname != ${r}l masquerade fully-random ;;
    masq|masqfw|natpmp|upnp) $x add rule ip nat post oifname != ${r}l masquerade ;;
  esac
  [ $kind = udpblock ] && $x add rule ip filter forwarding meta l4proto udp drop
  if [ $kind = masqfw ]; then
    $x "add chain ip filter input { type filter hook input priority 0; policy drop; }"
    $x add rule ip filter input iifname "{ lo, ${r}l }" accept
    $x add rule ip filter input ct state established,related accept
  fi
  if [ $kind = natpmp ] || [ $kind = upnp ]; then
    local pmp=yes igd=no; [ $kind = upnp ] && pmp=no igd=yes
    local wan; wan=$(ip -n $r -o -4 addr show | awk "/$NET./ {print \$2}")
    $x -f - <<'EOF'
table inet filter {
    chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
EOF
    printf 'ext_ifname=%s\next_ip=%s\nlistening_ip=%s\nenable_natpmp=%s\nenable_upnp=%s\nsecure_mode=yes\nsystem_uptime=yes\nuuid=bab1079e-342b-48ae-b32e-d198949be7c7\nallow 1024-65535 %s.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n' \
      "$wan" "$NET.3" "${r}l" $pmp $igd "$lan" > $D/s/upnp-$r.conf
    # A fresh pid file per run: miniupnpd refuses to start ("already
    # running") while the pid in an old file still exists, and the previous
    # run's miniupnpd, killed with its namespace, can linger as a zombie.
    # -d: stay in the foreground and log to stderr, kept with the run's logs.
    (ip netns exec $r miniupnpd -d -f $D/s/upnp-$r.conf -P $D/s/upnp-$r.pid > $D/s/miniupnpd-$r.log 2>&1 &)
  fi
}

# one_case KIND_A KIND_B RUN: prints "PATH SECONDS"
one_case() {
  local H=${P}h C=${P}c RA=${P}ra RB=${P}rb NA=${P}na NB=${P}nb i n p t0 t1 m
  ns_add $NSS
  ip -n $H link add br0 type bridge; ip -n $H link set br0 up
  i=1; for n in $C $RA $RB; do
    ip link add ${P}u$i type veth peer name ${P}v$i; ip link set ${P}u$i netns $H; ip link set ${P}v$i netns $n
    ip -n $H link set ${P}u$i master br0; ip -n $H link set ${P}u$i up
    ip -n $n addr add $NET.$i/24 dev ${P}v$i; ip -n $n link set ${P}v$i up; i=$((i+1))
  done
  # The routers reach each other through the hub as a router (one hop, as on
  # the Internet), so an opener (TTL 2) passes its own NAT and dies before the other.
  ip -n $H addr add $NET.254/24 dev br0; ip netns exec $H sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.br0.send_redirects=0
  ip -n $RA route add $NET.3/32 via $NET.254; ip -n $RB route add $NET.2/32 via $NET.254
  rm -rf $D/s; mkdir -p $D/s
  router $RA $NA 192.168.1 $1; router $RB $NB 192.168.2 $2
  printf '[tag_owners]\n"tag:bench" = ["bencher"]\n[[acl]]\nsrc = ["bencher"]\ndst = ["tag:bench:*"]\n' > $D/s/policy.toml
  (ip netns exec $C $BIN control --state-dir $D/s/ctl --listen $NET.1:8443 --policy $D/s/policy.toml > $D/s/ctl.log 2>&1 &)
  for i in $(seq 50); do grep -q "listening on" $D/s/ctl.log 2>/dev/null && break; sleep 0.1; done
  ip netns exec $C $BIN control --state-dir $D/s/ctl users add bencher >/dev/null
  VK=$(ip netns exec $C $BIN control --state-dir $D/s/ctl keys create --tag tag:bench | tail -1)
  LK=$(ip netns exec $C $BIN control --state-dir $D/s/ctl keys create --user bencher | tail -1)
  (ip netns exec $NA $BIN up --authkey $VK --state-dir $D/s/vps --hostname vps --no-ssh --listen-port 41641 > $D/s/vps.log 2>&1 &)
  for i in $(seq 100); do grep -q "up at" $D/s/vps.log 2>/dev/null && break; sleep 0.1; done
  (ip netns exec $NB env RUST_LOG=${LAPTOP_LOG:-warn,tailgate::dataplane::portmap=info} $BIN up --authkey $LK --state-dir $D/s/laptop --hostname laptop --no-ssh --listen-port 41641 > $D/s/laptop.log 2>&1 &)
  for i in $(seq 100); do grep -q "up at" $D/s/laptop.log 2>/dev/null && break; sleep 0.1; done
  t0=$(now); p=none
  while [ "$(echo "$(now) - $t0 < 20" | bc -l)" = 1 ]; do
    p=$(peer_field $NB s/laptop path)
    case "$p" in direct*) break;; esac
    sleep 0.1
  done
  t1=$(now)
  # Which protocol mapped a port on the laptop's router, if any (waiting up
  # to 8 s more for it: the path may come first, and a gateway still
  # starting is asked again 5 s later).
  for i in $(seq 80); do grep -q "the gateway maps" $D/s/laptop.log && break; sleep 0.1; done
  m=$(grep -o '[A-Za-z-]*: the gateway maps' $D/s/laptop.log | head -1 | cut -d: -f1 || true)
  teardown
  # LOG_DIR=dir keeps each run's logs (control, vps, laptop, miniupnpd) in dir/CASE-RUN.
  if [ -n "${LOG_DIR:-}" ]; then mkdir -p "$LOG_DIR/$1-$2-$3"; cp $D/s/*.log "$LOG_DIR/$1-$2-$3/"; fi
  echo "${p%% *} $(echo "$t1 - $t0" | bc -l) ${m:--}" > $D/result
}

printf "\n%-44s %-8s %-10s %s\n" "routers (vps side / laptop side)" "path" "mapped by" "seconds to that path (each run)"
# CASES="masq masq,masq symmetric" runs only those pairs.
IFS=, read -ra cases <<< "${CASES:-fullcone fullcone,masqfw masqfw,masq masq,fullcone symmetric,masq symmetric,symmetric symmetric,fullcone udpblock,masq natpmp,masq upnp,symmetric masq,symmetric natpmp,symmetric upnp}"
for c in "${cases[@]}"; do
  paths=""; times=""; maps=""
  for r in $(seq $REPEAT); do one_case $c $r >/dev/null; set -- $(cat $D/result); paths="$paths $1"; times="$times $(printf %.1f $2)"; maps="$maps $3"; done
  printf "%-44s %-8s %-10s %s\n" "$c" "$(echo $paths | tr ' ' '\n' | sort | uniq -c | awk '{printf "%s%sx%s", sep, $1, $2; sep=","}')" \
    "$(echo $maps | tr ' ' '\n' | sort -u | paste -sd,)" "$times"
done
