"""What recomputing a bfloat16 model's best logits in float32 costs (model.trunk.exact_top_logits, on by default):
our plain loop in bfloat16 with it on and off, alternating per prompt, on the held-out prompts; medians of the
per-prompt ratios, and how many answers the two settings share.

    .venv/bin/python docs/results/bf16_identity/cost.py [--limit 20] [--max-new-tokens 64] [--model smollm2-135m]
"""

import argparse
import json
import statistics
import sys

import torch

from mtp.backbones import load_backbone
from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.run import encode_prompt, eos_ids
from mtp.analysis.run import machine_info
from mtp.prompts import load_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--prompts", default="docs/results/drafts/outside_prompts.jsonl")
ap.add_argument("--limit", type=int, default=20)
ap.add_argument("--max-new-tokens", type=int, default=64)
ap.add_argument("--json")
a = ap.parse_args()

backbone, tok = load_backbone(a.model, "bfloat16")
eos = eos_ids(backbone, tok)
prompts = [encode_prompt(tok, t, True) for t in load_prompts(a.prompts, "eval", a.limit, 0)]
decs = {on: SpeculativeDecoder(backbone, tok, invariant_attention=on) for on in (True, False)}
for d in decs.values():
    d.generate([prompts[0]], 8, eos)
ratios, same, tps = [], 0, {True: [], False: []}
for i, p in enumerate(prompts):
    order = (True, False) if i % 2 == 0 else (False, True)
    out = {on: decs[on].generate([p], a.max_new_tokens, eos) for on in order}
    for on in order:
        tps[on].append(out[on].new_tokens / out[on].seconds)
    ratios.append(tps[True][-1] / tps[False][-1])
    same += out[True].rows[0].tokens == out[False].rows[0].tokens
r = {"command": " ".join(sys.argv), "machine": machine_info("cpu"), "torch_threads": torch.get_num_threads(),
     "model": a.model, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
     "tokens_per_s_exact_median": statistics.median(tps[True]), "tokens_per_s_bf16_median": statistics.median(tps[False]),
     "speed_ratio_median": statistics.median(ratios), "answers_identical": same}
print(json.dumps(r, indent=1))
if a.json:
    with open(a.json, "w") as f:
        json.dump(r, f, indent=1)
