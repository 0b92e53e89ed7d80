#!/bin/bash
# The distillation behind the eagle3 heads of issue 22: data goes to runs/data/ (not committed).
# Resumable: rerun to continue where it stopped. `mtp` is the command the README installs.
#   bash docs/results/drafts/distill.sh                       # smollm2-135m: runs/data/{heldout,train_main,train_translation}.jsonl
#   bash docs/results/drafts/distill.sh qwen2.5-coder-0.5b    # the code model: runs/data/qwen2.5-coder-0.5b/{heldout,train_main}.jsonl
set -e
cd "$(dirname "$0")/../../.."  # the project root
MODEL=${1:-smollm2-135m}
M="mtp distill --model $MODEL --engine llama.cpp --target q8_0 --batch-size 16 --max-new-tokens 256"
if [ "$MODEL" = smollm2-135m ]; then
  D=runs/data
  SETS="--prompts general --prompts varied --prompts chat --prompts code --prompts code-tasks --prompts prose-tasks"
else
  # a code model: what people ask a local code assistant (code requests, requests about their own code, everyday
  # requests, which hold code questions too), and the held-out split of the same sources
  D=runs/data/$MODEL
  SETS="--prompts code --prompts code-tasks --prompts general --prompts varied"
fi
mkdir -p $D
[ -f $D/heldout.jsonl ] || $M $SETS --split eval --limit 40 --follow-ups 0.25 --out $D/heldout.jsonl
[ -f $D/train_main.jsonl ] || $M $SETS --follow-ups 0.25 --out $D/train_main.jsonl
if [ "$MODEL" = smollm2-135m ]; then
  [ -f $D/train_translation.jsonl ] || $M --prompts translation --limit 2500 --out $D/train_translation.jsonl
fi
echo ALL DONE
