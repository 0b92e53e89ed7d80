"""The prefill alone, ours against transformers' generate, side by side: the first 2048 tokens of bench
context's document, one new token, 3 runs each, median seconds.
Run: python docs/results/decoding/context/prefill.py bfloat16|float32"""
import statistics
import sys
import time

import torch
from mtp.config import BenchContextConfig
from mtp.decode.run import build_decoder, load_for_decoding, hf_generate
from mtp.bench.context import context_prompts
dtype = sys.argv[1]
cfg = BenchContextConfig(dtype=dtype, quiet=True)
torch.set_num_threads(2)
b, tok, mh, folder = load_for_decoding(cfg.model, None, dtype, "cpu")
p = context_prompts(tok, "code", [2048])[0]
dec, _ = build_decoder(b, tok, None, None, cfg.model, "plain", cfg)
a, h = [], []
for r in range(3):
    t = time.perf_counter(); out = dec.generate([p], 1, []); a.append(time.perf_counter() - t)
    t = time.perf_counter(); ref = hf_generate(b, tok, [p], 1, []); h.append(time.perf_counter() - t)
print(dtype, "prefill 2048: ours", round(statistics.median(a), 2), "generate", round(statistics.median(h), 2), "same token", out.rows[0].tokens == ref.rows[0].tokens)
