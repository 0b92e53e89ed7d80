#!/usr/bin/env bash
# Reruns every figure of docs/results/engines.md once the heads are trained (see there), in this order.
# Run it alone on the machine: llama.cpp's threads spin and collapse beside any other load.
set -euo pipefail
R=docs/results/engines
H=src/mtp/default_heads/smollm2-135m-eagle3
# held-out per-depth accuracy (sizes mtp's trees): the backbone's greedy answers to 110 eval-split prompts
mtp eval --model smollm2-135m --heads "$H" --text runs/eagle/distill_eval.jsonl --context 16 --max-positions 3000 \
         --no-marginal --write-accuracy --json $R/eval_eagle3.json --quiet
M="--heads eagle3 --limit 10 --max-new-tokens 128 --rounds 2"
mtp bench engine --engine llama.cpp --prompts chat $M --mtp-methods blockwise,tree,dynamic,hybrid \
                 --json $R/llamacpp_chat.json | tee $R/llamacpp_chat.md
mtp bench engine --engine llama.cpp --prompts code $M --mtp-methods blockwise,tree,dynamic,hybrid \
                 --json $R/llamacpp_code.json | tee $R/llamacpp_code.md
mtp bench engine --engine llama.cpp --prompts $R/outside_prompts.jsonl $M --limit 12 --mtp-methods tree,hybrid \
                 --json $R/llamacpp_outside.json | tee $R/llamacpp_outside.md
mtp bench engine --engine llama.cpp --prompts chat $M --target f16 --mtp-methods "" \
                 --json $R/llamacpp_chat_f16.json | tee $R/llamacpp_chat_f16.md
mtp bench engine --engine vllm --prompts chat $M --rounds 1 --mtp-methods "" --json $R/vllm_chat.json | tee $R/vllm_chat.md
python $R/plot.py $R/engines.png $R/llamacpp_chat.json $R/vllm_chat.json
# the shipped hydra heads in mtp's engine on the same prompts, for the choice of default heads
for P in chat code $R/outside_prompts.jsonl; do
  N=$(basename "$P" .jsonl)
  mtp bench decode --model smollm2-135m --heads default --prompts "$P" --limit 12 --max-new-tokens 128 \
                   --methods plain,tree,dynamic,hybrid --json $R/hydra_$N.json --quiet | tee $R/hydra_$N.md
done
