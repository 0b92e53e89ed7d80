"""``mtp bench analyze``: batched marginalization (cached prefix, tree-masked candidate batches) against the
naive method (one full forward per candidate path) on the same positions, with the largest difference
between their marginals."""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm import tqdm

from mtp.analysis.marginal import CachedEvaluator, NaiveEvaluator, marginalize
from mtp.analysis.run import load_corpora, machine_info
from mtp.backbones import backbone_config, check_context, check_vocab, load_backbone, resolve_backbone
from mtp.data import make_windows
from mtp.config import BenchAnalyzeConfig



def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start



def bench_analyze(cfg: BenchAnalyzeConfig, command: str = "") -> dict:
    """Time batched vs naive marginalization on the same positions; report both, the ratio and the max diff.

    The defaults are those of ``mtp analyze`` (16 positions share a window's prefix). Per window, the two
    methods run side by side ``repeats`` times each; the figures are sums over windows of per-window medians.
    """
    model_name, data, context, positions, positions_per_window = (cfg.model, cfg.data, cfg.context, cfg.positions,
                                                                  cfg.positions_per_window)
    k, top_p, max_candidates, chunk_tokens, repeats = cfg.k, cfg.top_p, cfg.max_candidates, cfg.chunk_tokens, cfg.repeats
    dtype, device, seed, progress = cfg.dtype, cfg.device, cfg.seed, not cfg.quiet
    resolve_backbone(model_name)
    model_config = backbone_config(model_name)
    check_context(context + positions_per_window + k,
                  f"--context {context} + --positions-per-window {positions_per_window} + --k {k}", model_config)
    check_vocab(max_candidates, "--max-candidates", model_config)
    corpus = next(iter(load_corpora([data]).values()))
    model, tokenizer = load_backbone(model_name, dtype=dtype, device=device)
    windows = make_windows(corpus, tokenizer, context=context, max_positions=positions,
                           per_window=positions_per_window, horizon=k, seed=seed)
    batched, naive = CachedEvaluator(model, chunk_tokens), NaiveEvaluator(model)
    for w in windows:  # warm-up: first-call costs of every shape out of the timings
        marginalize(batched, w.input_ids, w.positions, k, [top_p], max_candidates)
    per_window, max_diff, n_paths = [], 0.0, 0
    for w in tqdm(windows, desc="bench analyze", unit="win", disable=not progress, file=sys.stderr):
        args = (w.input_ids, w.positions, k, [top_p], max_candidates)
        ta, tb = [], []
        for _ in range(repeats):
            a, t = _timed(lambda: marginalize(batched, *args))
            ta.append(t)
            b, t = _timed(lambda: marginalize(naive, *args))
            tb.append(t)
        n_paths += sum(int(c.sum()) for c in a.candidates)
        for ma, mb in zip(a.marginals, b.marginals):
            max_diff = max(max_diff, (ma - mb).abs().max().item())
        per_window.append({"positions": len(w.positions), "batched_seconds": statistics.median(ta),
                           "naive_seconds": statistics.median(tb), "batched_all": ta, "naive_all": tb})
    t_batched = sum(x["batched_seconds"] for x in per_window)
    t_naive = sum(x["naive_seconds"] for x in per_window)
    return {
        "model": model_name, "data": corpus.name, "positions": sum(len(w.positions) for w in windows),
        "windows": len(windows), "k": k, "top_p": top_p, "max_candidates": max_candidates, "context": context,
        "dtype": dtype, "repeats": repeats, "candidate_paths": n_paths,
        "batched_seconds": t_batched, "naive_seconds": t_naive, "speedup": t_naive / t_batched,
        "median_window_speedup": statistics.median(x["naive_seconds"] / x["batched_seconds"] for x in per_window),
        "max_abs_diff": max_diff, "per_window": per_window, "machine": machine_info(device),
        "torch_threads": torch.get_num_threads(), "command": command,
    }


def format_bench_analyze(r: dict) -> str:
    return "\n".join([
        f"bench analyze: {r['model']} on {r['data']}, {r['positions']} positions in {r['windows']} windows, "
        f"k={r['k']}, top-p {r['top_p']:g}, cap {r['max_candidates']}, context >= {r['context']}, {r['dtype']}",
        f"  candidate paths evaluated: {r['candidate_paths']}; per window, the median of {r['repeats']} runs",
        f"  batched (cached prefix + tree mask): {r['batched_seconds']:.2f} s",
        f"  naive (one full forward per path):   {r['naive_seconds']:.2f} s",
        f"  speedup: {r['speedup']:.1f}x (median per window {r['median_window_speedup']:.1f}x)",
        f"  largest difference between the marginals: {r['max_abs_diff']:.2e}",
        f"  machine: {r['machine']['cpu']}, {r['torch_threads']} torch threads, device {r['machine']['device']}",
    ])


# ----------------------------------------------------------------------------- training memory
