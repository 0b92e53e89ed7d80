#!/bin/bash
# The eagle3 transfer to qwen2.5-coder-0.5b (issue 22), as far as a 2-core CPU session goes. From the project root,
# after `bash docs/results/drafts/distill.sh qwen2.5-coder-0.5b` (stopped or finished: .partial is used as is):
#   bash docs/results/drafts/train_qwen.sh [STEPS (70)]
# The recipe kept for smollm2 except the loss: qwen's own answers come at ~45 tokens/s here, so its distilled
# text is mixed with 200 k tokens of smollm2's distilled answers (runs/data/train_a.jsonl, a seeded random sample)
# and every position learns qwen's own distribution there (--draft-loss soft, EAGLE-3's recipe), not the text's
# next token (which, on smollm2's answers, would teach smollm2's choices).
set -e
cd "$(dirname "$0")/../../.."
STEPS=${1:-70}
D=runs/data/qwen2.5-coder-0.5b
[ -f $D/train_main.jsonl ] || [ -f $D/train_qwen_part.jsonl ] || cp $D/train_main.jsonl.partial $D/train_qwen_part.jsonl
TRAIN=$([ -f $D/train_main.jsonl ] && echo $D/train_main.jsonl || echo $D/train_qwen_part.jsonl)
[ -f $D/mix_smollm2_texts.jsonl ] || python - <<'PY'
import json, random
lines = open("runs/data/train_a.jsonl").read().splitlines()
random.Random(0).shuffle(lines)
out, chars = [], 0
for line in lines:
    out.append(line); chars += len(json.loads(line)["response"])
    if chars > 200_000 * 3.6: break
open("runs/data/qwen2.5-coder-0.5b/mix_smollm2_texts.jsonl", "w").write("\n".join(out) + "\n")
PY
mtp train --model qwen2.5-coder-0.5b --kind eagle3 --heads 4 --eagle-layers default --draft-init random \
          --draft-loss soft --draft-vocab 32768 --data $TRAIN --data $D/mix_smollm2_texts.jsonl --seq-len 512 \
          --batch-size 8 --max-steps $STEPS --lr 1e-3 --warmup-steps 8 --head-weights decay:0.8 \
          --eval-data $D/heldout.jsonl --eval-every 30 --eval-blocks 24 --save-every 10 --save-dtype bfloat16 \
          --out runs/qwen-e3 $([ -d runs/qwen-e3/checkpoint ] && echo --resume)
