"""Benchmarks: one harness for every timing figure, methods timed side by side in one run.

``bench_analyze``: batched marginalization (cached prefix, tree-masked candidate batches) against the
naive method (one full forward per candidate path) on the same positions, with the largest difference
between their marginals.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm import tqdm

from mtp.analysis.marginal import CachedEvaluator, NaiveEvaluator, marginalize
from mtp.analysis.run import load_corpora, machine_info
from mtp.backbones import load_backbone, resolve_backbone
from mtp.data import make_windows
from mtp.errors import UserError


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_analyze(model_name: str, data: str, *, context: int = 256, positions: int = 8,
                  positions_per_window: int = 4, k: int = 2, top_p: float = 0.99, max_candidates: int = 64,
                  chunk_tokens: int = 128, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                  progress: bool = True) -> dict:
    """Time batched vs naive marginalization on the same positions; report both, the ratio and the max diff."""
    if not 1 <= k <= 3 or not 0 < top_p <= 1 or positions < 1 or max_candidates < 1 or context < 1:
        raise UserError("bench analyze needs 1 <= --k <= 3, 0 < --top-p <= 1, and positive --positions, "
                        "--max-candidates and --context")
    resolve_backbone(model_name)
    corpus = next(iter(load_corpora([data]).values()))
    model, tokenizer = load_backbone(model_name, dtype=dtype, device=device)
    windows = make_windows(corpus, tokenizer, context=context, max_positions=positions,
                           per_window=positions_per_window, horizon=k, seed=seed)
    batched, naive = CachedEvaluator(model, chunk_tokens), NaiveEvaluator(model)
    marginalize(batched, windows[0].input_ids, windows[0].positions[:1], k, [top_p], max_candidates)  # warm-up
    t_batched, t_naive, ratios, max_diff, n_paths = [], [], [], 0.0, 0
    for w in tqdm(windows, desc="bench analyze", unit="win", disable=not progress, file=sys.stderr):
        args = (w.input_ids, w.positions, k, [top_p], max_candidates)
        a, ta = _timed(lambda: marginalize(batched, *args))
        b, tb = _timed(lambda: marginalize(naive, *args))
        t_batched.append(ta)
        t_naive.append(tb)
        ratios.append(tb / ta)
        n_paths += sum(int(c.sum()) for c in a.candidates)
        for ma, mb in zip(a.marginals, b.marginals):
            max_diff = max(max_diff, (ma - mb).abs().max().item())
    n = sum(len(w.positions) for w in windows)
    return {
        "model": model_name, "data": corpus.name, "positions": n, "windows": len(windows), "k": k,
        "top_p": top_p, "max_candidates": max_candidates, "context": context, "dtype": dtype,
        "candidate_paths": n_paths,
        "batched_seconds": sum(t_batched), "naive_seconds": sum(t_naive),
        "speedup": sum(t_naive) / sum(t_batched), "median_window_speedup": statistics.median(ratios),
        "max_abs_diff": max_diff, "machine": machine_info(device), "torch_threads": torch.get_num_threads(),
    }


def format_bench_analyze(r: dict) -> str:
    return "\n".join([
        f"bench analyze: {r['model']} on {r['data']}, {r['positions']} positions in {r['windows']} windows, "
        f"k={r['k']}, top-p {r['top_p']:g}, cap {r['max_candidates']}, context >= {r['context']}, {r['dtype']}",
        f"  candidate paths evaluated: {r['candidate_paths']}",
        f"  batched (cached prefix + tree mask): {r['batched_seconds']:.2f} s",
        f"  naive (one full forward per path):   {r['naive_seconds']:.2f} s",
        f"  speedup: {r['speedup']:.1f}x (median per window {r['median_window_speedup']:.1f}x)",
        f"  largest difference between the marginals: {r['max_abs_diff']:.2e}",
        f"  machine: {r['machine']['cpu']}, {r['torch_threads']} torch threads, device {r['machine']['device']}",
    ])
