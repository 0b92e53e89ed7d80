"""Prompt lookup's n-gram match, the old Python scan against the vectorized one, side by side on the same
sequences (the first L tokens of the held-out code document `mtp bench context` uses, and the same with a tail
that matches nowhere: the scan's worst case). Run: python docs/results/decoding/context/lookup_cost.py"""

import statistics
import time

import torch

from mtp.backbones import load_backbone
from mtp.bench.context import context_prompts
from mtp.decode.proposers import LookupProposer


def scan(seq, max_ngram=3, draft_len=8):
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == seq[-n:]:
                return seq[start + n: start + n + draft_len]
    return []


torch.set_num_threads(2)
_, tok = load_backbone("smollm2-135m")
lookup = LookupProposer(8, 3)
for length, seq in zip((256, 2048, 4096), context_prompts(tok, "code", [256, 2048, 4096])):
    for case, s in (("tail found near the end", seq), ("tail found nowhere", seq + [49000, 49001, 49002])):
        ta, tb = [], []
        for _ in range(30):
            t = time.perf_counter()
            a = scan(s)
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = lookup._continuation(s)
            tb.append(time.perf_counter() - t)
            assert a == b
        print(f"L={length:5d} {case:24s} scan {1e3 * statistics.median(ta):6.3f} ms, "
              f"vectorized {1e3 * statistics.median(tb):6.3f} ms (median of 30)")
