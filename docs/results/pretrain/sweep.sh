#!/usr/bin/env bash
# The n sweep of docs/results/pretrain.md: preset mini (12 layers, parameter-matched), built-in code
# corpus, equal compute (same steps x batch x length for every n). Reruns skip finished runs and resume
# interrupted ones. Usage: sweep.sh bytes|bpe [n ...]   (default n: 1 2 4 8)
set -euo pipefail
tok=${1:?bytes or bpe}; shift
ns=${*:-1 2 4 8}
MTP=${MTP:-mtp}
ROOT=${SWEEP_ROOT:-runs/pretrain_sweep}
for n in $ns; do
  out=$ROOT/${tok}_n$n
  [ -f "$out/eval.json" ] && { echo "done: $out"; continue; }
  resume=(); [ -d "$out/checkpoint" ] && resume=(--resume)
  $MTP pretrain --preset mini --heads "$n" --tokenizer "$tok" --data code --max-steps 1000 \
      --save-every 100 --log-every 20 --out "$out" "${resume[@]}"
done
