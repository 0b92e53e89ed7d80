#!/bin/bash
# Issue 23's measurements: llama.cpp's costs on this machine (verify curve, draft rounds; cached per CPU, target,
# draft and threads), the draft settings they choose, and every configuration side by side on requests from
# outside our prompt sets (greedy, 128 new tokens, chat template, 2 threads, one request at a time).
# Alone on the machine: llama.cpp's threads spin. From the project root:
#   bash docs/results/llamacpp_cpu/run.sh [QWEN_HEADS (runs/qwen-e3/heads)]
set -e
cd "$(dirname "$0")/../../.."
OUT=docs/results/llamacpp_cpu
QWEN_HEADS=${1:-runs/qwen-e3/heads}
B="mtp bench engine --engine llama.cpp --max-new-tokens 128 --threads 2 --mtp-methods '' --overwrite"
# smollm2-135m with its shipped eagle3 heads: the packaged Q4_1 file, and Q4_0 / Q8_0 made from the same weights
for t in packaged q4_0 q8_0; do
  eval $B --model smollm2-135m --heads eagle3 --target $t --prompts docs/results/drafts/outside_prompts.jsonl \
          --limit 28 --json $OUT/smollm2_$t.json
done
# the same with the draft itself in Q4_0 (llama-quantize; its lm_head stays Q8_0)
eval $B --model smollm2-135m --heads eagle3 --target packaged --draft-type q4_0 --ngram-modes '' \
        --prompts docs/results/drafts/outside_prompts.jsonl --limit 28 --json $OUT/smollm2_packaged_draftq4.json
# qwen2.5-coder-0.5b (packaged Q4_K_M) with the eagle3 heads trained for it, on code requests
if [ -d "$QWEN_HEADS" ]; then
  eval $B --model qwen2.5-coder-0.5b --heads "$QWEN_HEADS" --target packaged --ngram-modes ngram-map-k,ngram-mod \
          --prompts $OUT/outside_code_prompts.jsonl --limit 16 --json $OUT/qwen_packaged.json
fi
python $OUT/plot_costs.py $OUT/costs.png $OUT/smollm2_packaged.json $OUT/smollm2_q4_0.json $OUT/smollm2_q8_0.json \
       $([ -f $OUT/qwen_packaged.json ] && echo $OUT/qwen_packaged.json)
