"""Aggregate tokens/s of mtp's engine at batch 1, 4 and 8, plain and speculative, side by side.

The same 8 chat prompts (eval split, chat template) are decoded in batches of 1, 4 and 8 by each method; every
row generates exactly NEW tokens (no EOS stop: equal work per batch size), so a batch's tokens/s is
8 * NEW / the seconds all its batches took. Methods and batch sizes alternate within a round, the median of
ROUNDS rounds is kept. Run: python docs/results/decoding/batch/batch_scaling.py [float32|bfloat16] [OUT.json]
"""

import json
import statistics
import sys
import time

import torch

from mtp.analysis.run import machine_info
from mtp.config import BenchDecodeConfig
from mtp.decode.run import build_decoder, encode_prompt, hf_generate, load_for_decoding
from mtp.prompts import load_prompts

DTYPE = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
OUT = sys.argv[2] if len(sys.argv) > 2 else None
NEW, ROUNDS, SIZES, METHODS = 48, 3, (1, 4, 8), ("plain", "tree", "hybrid")

torch.set_num_threads(2)
cfg = BenchDecodeConfig(dtype=DTYPE, quiet=True)
backbone, tok, mtp_model, folder = load_for_decoding(cfg.model, cfg.heads, cfg.dtype, cfg.device)
prompts = [encode_prompt(tok, t, True) for t in load_prompts("chat", "eval", 8, 0)]
decoders = {m: build_decoder(backbone, tok, mtp_model, folder, cfg.model, m, cfg)[0] for m in METHODS}


def run(method: str, size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), size):
        batch = prompts[i:i + size]
        if method == "transformers":
            hf_generate(backbone, tok, batch, NEW, [], cfg.sampling())
        else:
            decoders[method].generate(batch, NEW, [])
    return len(prompts) * NEW / (time.perf_counter() - start)


names = ("transformers",) + METHODS
for name in names:
    run(name, 8)  # warm-up
tps = {(m, b): [] for m in names for b in SIZES}
for r in range(ROUNDS):
    order = [(m, b) for b in SIZES for m in names]
    for key in (order if r % 2 == 0 else order[::-1]):
        tps[key].append(run(*key))
table = {f"{m}@{b}": statistics.median(v) for (m, b), v in tps.items()}
print(f"smollm2-135m {DTYPE}, 8 chat prompts, {NEW} new tokens per row, median of {ROUNDS} rounds; tokens/s")
print("| method | batch 1 | batch 4 | batch 8 | batch 8 / batch 1 | vs plain at batch 1 / 4 / 8 |")
print("|---|---:|---:|---:|---:|---|")
for m in names:
    v = [table[f"{m}@{b}"] for b in SIZES]
    rel = " / ".join(f"{table[f'{m}@{b}'] / table[f'plain@{b}']:.2f}x" for b in SIZES)
    print(f"| {m} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[2] / v[0]:.2f}x | {rel} |")
if OUT:
    with open(OUT, "w") as f:
        json.dump({"tokens_per_s": table, "rounds": {f"{m}@{b}": v for (m, b), v in tps.items()}, "dtype": DTYPE,
                   "new_tokens": NEW, "prompts": "chat eval, first 8", "machine": machine_info("cpu"),
                   "command": "python " + " ".join(sys.argv)}, f, indent=1)
