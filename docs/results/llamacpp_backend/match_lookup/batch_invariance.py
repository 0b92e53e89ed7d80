# qwen2.5-coder-0.5b Q4_K_M: a k-token decode (a verify) against k one-token decodes, after an edit request's prompt.
# usage: python batch_invariance.py GGUF   (edit_answers.json: the 12 edit requests' prompt ids and llama-server's greedy answers)
import json, sys, numpy as np
from mtp.engines.llamacpp_lib import LlamaContext, RowCache
d = json.load(open(__import__('pathlib').Path(__file__).with_name('edit_answers.json')))
p, o = d['prompts'][2], d['theirs'][2]
gguf = sys.argv[1]
ctx = LlamaContext(gguf, n_ctx=4096, n_seq=64, n_batch=512, threads=2)
def one_by_one(k):
    rows = RowCache(ctx); rows.add_rows([p]); out = []
    for tok in o[:k]:
        l, _ = rows.verify([[tok]], [[]], [[]]); rows.commit({0: [0]}); out.append(l[0, 0])
    rows.keep_rows([]); return np.stack(out)
ref = one_by_one(33)
for k in (2, 3, 4, 5, 8, 9, 16, 17, 32):
    rows = RowCache(ctx); rows.add_rows([p])
    l, _ = rows.verify([o[:k]], [list(range(-1, k - 2))], [[True] * (k - 1)])
    rows.keep_rows([])
    diff = np.abs(l[0] - ref[:k]).max(axis=1)
    print(k, "max diff", float(diff.max()), "argmax same", bool((l[0].argmax(1) == ref[:k].argmax(1)).all()))
