"""A decoder with the shipped heads forced to plain steps (the speed guard never drafting) against the plain decoder,
on llama.cpp, alternating, 12 generations each: what a guarded head method costs on the steps it does not draft.

    python docs/results/llamacpp_backend/plain_steps_with_heads.py
"""
import statistics, dataclasses
from mtp.config import DraftOptions
from mtp.decode.run import open_target
from mtp.decode.guard import SpeedGuard
SpeedGuard.drafting = lambda self, rows: (setattr(self, "_start", None) or False)
opts = DraftOptions(guard=True)
import mtp.config as c
cfg = c.GenerateConfig(backend="llama.cpp", prompt="x")
loaded = open_target(cfg, "smollm2-135m", "default", ["tree", "plain"], {}, None)
tok = loaded.tokenizer
decs = {m: loaded.decoder(m, cfg)[0] for m in ("plain", "tree")}
prompts = ["Write a story about a robot. Once upon a time", "def quicksort(arr):\n", "Explain how a hash map works."]
res = {m: [] for m in decs}
for r in range(4):
    for m in (("plain", "tree") if r % 2 == 0 else ("tree", "plain")):
        for p in prompts:
            out = decs[m].generate([tok(p).input_ids], 96, eos_token_ids=[])
            res[m].append(len(out.rows[0].tokens) / out.seconds)
for m in res: print(m, round(statistics.median(res[m]), 1))
print("tree-all-plain-steps / plain", round(statistics.median(a / b for a, b in zip(res["tree"], res["plain"])), 3))
