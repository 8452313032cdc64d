#!/usr/bin/env bash
# Disco seal + open cost per datagram (not a pass/fail test): the per-datagram
# X25519 path (`disco::seal`/`open`) against box keys cached per peer
# (`disco::PeerBoxes`), measured in the same process, REPS times; prints each
# run and the median. DISCO_BENCH_N datagrams per run (default 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
export DISCO_BENCH_N=${DISCO_BENCH_N:-20000}
runs=$(for _ in $(seq "$REPS"); do
  nice cargo test --release --quiet --lib dataplane::disco::tests::seal_open_cost -- --ignored --nocapture 2>/dev/null |
    sed -n 's/.*uncached \([0-9]*\) ns, cached \([0-9]*\) ns.*/\1 \2/p'
done)
echo "$runs" | awk '{ printf "run %d: uncached %d ns, cached %d ns\n", NR, $1, $2 }'
med() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
u=$(echo "$runs" | awk '{ print $1 }' | med); c=$(echo "$runs" | awk '{ print $2 }' | med)
echo "median seal+open per datagram: uncached $u ns, cached $c ns ($(awk -v u="$u" -v c="$c" 'BEGIN { printf "%.1fx", u / c }') faster)"
