#!/bin/bash
# The distillation behind the smollm2-135m eagle3 heads (issue 22): data goes to runs/data/ (not committed).
# Resumable: rerun to continue where it stopped. `mtp` is the command the README installs.
set -e
cd "$(dirname "$0")/../../.."  # the project root
M="mtp distill --model smollm2-135m --engine llama.cpp --target q8_0 --batch-size 16 --max-new-tokens 256"
SETS="--prompts general --prompts varied --prompts chat --prompts code --prompts code-tasks --prompts prose-tasks"
[ -f runs/data/heldout.jsonl ] || $M $SETS --prompts translation --split eval --limit 40 --follow-ups 0.25 --out runs/data/heldout.jsonl
[ -f runs/data/train_main.jsonl ] || $M $SETS --follow-ups 0.25 --out runs/data/train_main.jsonl
[ -f runs/data/train_translation.jsonl ] || $M --prompts translation --limit 2500 --out runs/data/train_translation.jsonl
echo ALL DONE
