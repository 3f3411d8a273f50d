#!/usr/bin/env bash
# One bundle under two environments, alternating in fresh processes
# (`vit-msn bench --batch 1,8 --iters 12` each), so the machine's drift hits
# both alike. Prints each side's median of the rounds' medians and the median
# of the per-round ratios B/A.
#
#   bash benches/env_pair.sh BUNDLE ROUNDS "A=1 ..." "B=1 ..."
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/vit-msn
bundle=$1; rounds=$2; A=$3; Bv=$4
for r in $(seq $rounds); do
  for m in A B; do
    if [ $m = A ]; then e=$A; else e=$Bv; fi
    env $e $B bench --bundle $bundle --batch 1,8 --iters 12 --json 2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); print('$m', ' '.join(f\"{x['median_ms']:.2f}\" for x in r['results']))"
  done
done | python3 -c "
import sys,statistics as st
rows=[l.split() for l in sys.stdin]
A=[list(map(float,r[1:])) for r in rows if r[0]=='A']; B=[list(map(float,r[1:])) for r in rows if r[0]=='B']
for i,b in enumerate((1,8)):
  a=[x[i] for x in A]; bb=[x[i] for x in B]
  print(f'batch {b}: A median {st.median(a):.2f} B median {st.median(bb):.2f} paired B/A median {st.median([y/x for x,y in zip(a,bb)]):.3f} ratios', ' '.join(f'{y/x:.2f}' for x,y in zip(a,bb)))
"
