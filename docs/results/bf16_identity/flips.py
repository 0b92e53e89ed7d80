"""Where bfloat16 answers of a speculative method part from our plain loop's: for every held-out prompt whose
answers differ, the first differing position, the two tokens chosen there, and how far apart the float32 model
puts them (its logit of plain's token minus the other's) -- near zero: a near-tie that bfloat16's rounding decides
either way; large: a real error.

    .venv/bin/python docs/results/bf16_identity/flips.py --method hybrid [--invariant | --no-invariant] [--limit 20]
"""

import argparse
import json
import statistics
import sys

import torch

from mtp.backbones import load_backbone
from mtp.config import DraftOptions
from mtp.decode.run import encode_prompt, eos_ids, open_target
from mtp.analysis.run import machine_info
from mtp.prompts import load_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--method", default="hybrid")
ap.add_argument("--prompts", default="docs/results/drafts/outside_prompts.jsonl")
ap.add_argument("--limit", type=int, default=20)
ap.add_argument("--max-new-tokens", type=int, default=128)
ap.add_argument("--invariant", action=argparse.BooleanOptionalAction, default=True)
ap.add_argument("--json")
a = ap.parse_args()

opts = DraftOptions(dtype="bfloat16")
loaded = open_target(opts, a.model, "default", [a.method, "plain"], {}, None)
tok = loaded.tokenizer
eos = eos_ids(loaded.backbone, tok)
plain, _ = loaded.decoder("plain", opts)
method, _ = loaded.decoder(a.method, opts)
plain.executor.invariant_attention = method.executor.invariant_attention = a.invariant
ref32, _ = load_backbone(a.model, "float32")
prompts = [encode_prompt(tok, t, True) for t in load_prompts(a.prompts, "eval", a.limit, 0)]
rows = []
for p in prompts:
    x = plain.generate([p], a.max_new_tokens, eos).rows[0].tokens
    y = method.generate([p], a.max_new_tokens, eos).rows[0].tokens
    if x == y:
        continue
    i = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    if i >= min(len(x), len(y)):
        rows.append({"position": i, "kind": "length"})
        continue
    with torch.no_grad():
        logits = ref32(torch.tensor([p + x[:i]])).logits[0, -1].float()
    top2 = logits.topk(2)
    rows.append({"position": i, "plain": x[i], "method": y[i],
                 "fp32_gap": float(logits[x[i]] - logits[y[i]]),
                 "fp32_top1_top2_margin": float(top2.values[0] - top2.values[1]),
                 "fp32_argmax_is_plain": int(logits.argmax()) == x[i]})
gaps = [abs(r["fp32_gap"]) for r in rows if "fp32_gap" in r]
r = {"command": " ".join(sys.argv), "machine": machine_info("cpu"), "method": a.method, "invariant_attention": a.invariant,
     "prompts": len(prompts), "differing": len(rows), "median_abs_fp32_gap": statistics.median(gaps) if gaps else None,
     "max_abs_fp32_gap": max(gaps, default=None), "rows": rows}
print(json.dumps(r, indent=1))
if a.json:
    with open(a.json, "w") as f:
        json.dump(r, f, indent=1)
