#!/bin/bash
# Held-out accuracy and outside-prompt acceptance of the shipped eagle3 heads against newly trained ones, alone on
# the machine (greedy, 128 new tokens, chat template, 2 threads). From the project root:
#   bash docs/results/drafts/run.sh [NEW_HEADS (runs/e3/heads)] [OLD_HEADS (eagle3: the shipped ones)]
# Needs runs/data/heldout.jsonl (docs/results/drafts/distill.sh) and llama.cpp (`mtp engines setup llama.cpp`).
set -e
cd "$(dirname "$0")/../../.."
NEW=${1:-runs/e3/heads}
OLD=${2:-eagle3}
OUT=docs/results/drafts
for h in "$OLD" "$NEW"; do
  name=$([ "$h" = "$NEW" ] && echo new || echo old)
  # --write-accuracy: per-rank accuracies beside the heads, which size the decoding trees below
  mtp eval --model smollm2-135m --heads "$h" --text runs/data/heldout.jsonl --context 16 --max-positions 2000 \
           --no-marginal $([ "$name" = new ] && echo --write-accuracy) --json $OUT/eval_heldout_${name}.json --overwrite
done
for h in "$OLD" "$NEW"; do
  name=$([ "$h" = "$NEW" ] && echo new || echo old)
  mtp bench engine --engine llama.cpp --model smollm2-135m --heads "$h" --prompts $OUT/outside_prompts.jsonl \
                   --limit 28 --max-new-tokens 128 --threads 2 --ngram-modes "" --mtp-methods blockwise,tree,hybrid \
                   --json $OUT/outside_${name}.json --overwrite
done
