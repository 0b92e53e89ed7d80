"""What attending each query alone in float32 costs in bfloat16 (hf_compat.float32_attention, on by default):
a method's decoding with it on and off, alternating which goes first per prompt, on the held-out prompts;
medians of the per-prompt tokens/s ratios, and how many answers the two settings share.

    .venv/bin/python docs/results/bf16_identity/cost.py --method plain|tree|hybrid [--limit 12] [--max-new-tokens 64]
"""

import argparse
import json
import statistics
import sys

import torch

from mtp.analysis.run import machine_info
from mtp.config import DraftOptions
from mtp.decode.run import encode_prompt, eos_ids, open_target
from mtp.prompts import load_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--method", default="plain")
ap.add_argument("--prompts", default="docs/results/drafts/outside_prompts.jsonl")
ap.add_argument("--limit", type=int, default=12)
ap.add_argument("--max-new-tokens", type=int, default=64)
ap.add_argument("--json")
a = ap.parse_args()

opts = DraftOptions(dtype="bfloat16")
loaded = open_target(opts, a.model, "default", [a.method], {}, None)
eos = eos_ids(loaded.backbone, loaded.tokenizer)
decs = {}
for on in (True, False):
    decs[on], _ = loaded.decoder(a.method, opts)
    decs[on].executor.invariant_attention = on
prompts = [encode_prompt(loaded.tokenizer, t, True) for t in load_prompts(a.prompts, "eval", a.limit, 0)]
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
     "model": a.model, "method": a.method, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
     "tokens_per_s_invariant_median": statistics.median(tps[True]),
     "tokens_per_s_bf16_attention_median": statistics.median(tps[False]),
     "speed_ratio_median": statistics.median(ratios), "answers_identical_between_settings": same}
print(json.dumps(r, indent=1))
if a.json:
    with open(a.json, "w") as f:
        json.dump(r, f, indent=1)
