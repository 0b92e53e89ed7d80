#!/usr/bin/env bash
# Decoding benchmarks of docs/results/pretrain.md: every sweep model on 10 held-out code-prefix prompts,
# 256 new tokens, greedy, float32. Per n > 1: the methods at the sizes chosen from the verify cost
# (decode_*), and blockwise with every head (decode_chain_*, the paper's tau). n = 1: lookup only.
# Usage: decode.sh bytes|bpe [n ...]   (default n: 1 2 4 8)
set -euo pipefail
tok=${1:?bytes or bpe}; shift
ns=${*:-1 2 4 8}
MTP=${MTP:-mtp}
ROOT=${SWEEP_ROOT:-runs/pretrain_sweep}
OUT=docs/results/pretrain
for n in $ns; do
  run=$ROOT/${tok}_n$n
  common=(--model "$run/init" --prompts code-prefix --no-chat --limit 10 --max-new-tokens 256 --quiet)
  if [ "$n" = 1 ]; then
    $MTP bench decode "${common[@]}" --methods lookup --json "$OUT/decode_${tok}_n$n.json"
  else
    $MTP bench decode "${common[@]}" --heads "$run/heads" --methods blockwise,tree,hybrid,lookup \
        --json "$OUT/decode_${tok}_n$n.json"
    $MTP bench decode "${common[@]}" --heads "$run/heads" --methods blockwise --draft-len $((n - 1)) \
        --json "$OUT/decode_chain_${tok}_n$n.json"
  fi
done
