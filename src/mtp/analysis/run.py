"""``mtp analyze``: marginalization MTP and logit-lens figures for every model x corpus."""

from __future__ import annotations

import gc
import platform
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from mtp.analysis.lens import entropy_along, logit_lens
from mtp.analysis.marginal import CachedEvaluator, marginalize
from mtp.backbones import backbone_config, check_context, check_vocab, load_backbone, resolve_backbone
from mtp.config import AnalyzeConfig
from mtp.data import Corpus, CorpusUnavailable, load_corpus, make_windows
from mtp.errors import UserError
from mtp.machine import cpu_name


def machine_info(device: str = "cpu") -> dict:
    """What produced a result: CPU model and cores, accelerator, library versions."""
    import transformers

    info = {"cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_corpora(sources: list[str]) -> dict[str, Corpus]:
    """Evaluation splits of built-in corpora (skipping unavailable ones with a message) and user files."""
    corpora = {}
    for source in dict.fromkeys(sources):
        try:
            corpora[source] = load_corpus(source, split="eval")
        except CorpusUnavailable as e:
            print(f"mtp: skipping {source}: {e}", file=sys.stderr)
    if not corpora:
        raise UserError("none of the requested corpora is available on this machine")
    return corpora


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": int(x.max())}


def analyze_corpus(model, tokenizer, model_name: str, corpus: Corpus, cfg: AnalyzeConfig,
                   progress: bool = True) -> dict:
    """All figures for one model on one corpus."""
    start = time.perf_counter()
    windows = make_windows(corpus, tokenizer, context=cfg.context, max_positions=cfg.max_positions,
                           per_window=cfg.positions_per_window, horizon=cfg.k, seed=cfg.seed)
    n_pos = sum(len(w.positions) for w in windows)
    if n_pos < cfg.max_positions:
        print(f"mtp: {corpus.name}: only {n_pos} positions available for {model_name} "
              f"(asked for {cfg.max_positions})", file=sys.stderr)
    longest = max(len(w.input_ids) for w in windows) + cfg.k
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise UserError(f"windows of {longest} tokens exceed {model_name}'s context of {limit}: lower --context")

    hit1 = [[] for _ in range(cfg.k)]  # per k: (nq, P) chunks
    hit5 = [[] for _ in range(cfg.k)]
    mass, counts, capped = ([[] for _ in range(cfg.k)] for _ in range(3))
    kl_sum = agree_sum = None
    evaluator = CachedEvaluator(model, cfg.chunk_tokens)
    bar = tqdm(windows, desc=f"{model_name} x {corpus.name}", unit="win", disable=not progress, file=sys.stderr)
    for w in bar:
        res = marginalize(evaluator, w.input_ids, w.positions, cfg.k, cfg.top_p, cfg.max_candidates,
                          hidden_states=cfg.lens)
        ids = w.input_ids.to(res.root_logits.device)
        for k in range(1, cfg.k + 1):
            marg = res.marginals[k - 1]  # (nq, P, V)
            target = ids[w.positions.to(ids.device) + k]  # x_{t+k}
            top = marg.topk(min(5, marg.shape[-1]), dim=-1).indices  # (nq, P, 5)
            hit1[k - 1].append((top[..., 0] == target).cpu())
            hit5[k - 1].append((top == target[:, None]).any(-1).cpu())
            mass[k - 1].append(marg.sum(-1).cpu())
            if k >= 2:
                counts[k - 1].append(res.candidates[k - 2].cpu())
                capped[k - 1].append(res.capped[k - 2].cpu())
        if cfg.lens:
            kl, agree = logit_lens(model, res.hidden_states, res.root_logits)
            kl_sum = kl.sum(1).cpu() if kl_sum is None else kl_sum + kl.sum(1).cpu()
            agree_sum = agree.sum(1).cpu() if agree_sum is None else agree_sum + agree.sum(1).cpu()
        bar.set_postfix(ntp_top1=f"{sum(h[0].sum().item() for h in hit1[0]) / sum(h.shape[1] for h in hit1[0]):.3f}")

    row: dict = {"model": model_name, "data": corpus.name, "positions": n_pos, "windows": len(windows),
                 "documents": len({w.doc_id for w in windows})}
    h1 = [torch.cat(h, 1).float().numpy() for h in hit1]
    h5 = [torch.cat(h, 1).float().numpy() for h in hit5]
    row["ntp"] = {"top1": float(h1[0][0].mean()), "top5": float(h5[0][0].mean())}
    row["marginal"], row["candidate_counts"] = [], {}
    for k in range(2, cfg.k + 1):
        c = torch.cat(counts[k - 1], 1).numpy()
        cap = torch.cat(capped[k - 1], 1).float().numpy()
        ms = torch.cat(mass[k - 1], 1).numpy()
        row["candidate_counts"][str(k)] = {str(p): c[q].tolist() for q, p in enumerate(cfg.top_p)}
        for q, p in enumerate(cfg.top_p):
            row["marginal"].append({"k": k, "top_p": p, "top1": float(h1[k - 1][q].mean()),
                                    "top5": float(h5[k - 1][q].mean()), "candidates": _stats(c[q]),
                                    "capped_share": float(cap[q].mean()), "mass": float(ms[q].mean())})
    if cfg.lens:
        row["lens"] = {"layers": list(range(len(kl_sum))), "kl": (kl_sum / n_pos).tolist(),
                       "top1_agreement": (agree_sum.double() / n_pos).tolist()}
    example = windows[0].input_ids
    row["entropy"] = {"doc_id": windows[0].doc_id, "entropy": entropy_along(model, example).cpu().tolist(),
                      "tokens": [tokenizer.decode([i]) for i in example.tolist()]}
    row["seconds"] = time.perf_counter() - start
    return row


def analyze(cfg: AnalyzeConfig, progress: bool = True) -> dict:
    """Run the whole analysis; returns the JSON-ready report."""
    for name in cfg.models:
        resolve_backbone(name)  # fail on a bad name or path before any slow work
    for name in cfg.models:  # and on flags beyond any model's context or vocabulary
        model_config = backbone_config(name)
        check_context(cfg.context + cfg.positions_per_window + cfg.k,
                      f"--context {cfg.context} + --positions-per-window {cfg.positions_per_window} + --k {cfg.k}",
                      model_config)
        check_vocab(cfg.max_candidates, "--max-candidates", model_config)
    corpora = load_corpora(cfg.data)
    results = []
    for name in cfg.models:
        model, tokenizer = load_backbone(name, dtype=cfg.dtype, device=cfg.device)
        for corpus in corpora.values():
            results.append(analyze_corpus(model, tokenizer, name, corpus, cfg, progress))
        del model
        gc.collect()
    import mtp

    return {"mtp_version": mtp.__version__, "config": cfg.to_dict(), "machine": machine_info(cfg.device),
            "results": results}


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def analyze_command(cfg: AnalyzeConfig, command: str = "") -> dict:
    """How much multi-token prediction the models already have; plots into cfg.out."""
    from mtp.analysis.plots import write_plots  # matplotlib only for a run that plots

    report = analyze(cfg, progress=not cfg.quiet)
    report["command"] = command
    if cfg.out:
        for path in write_plots(report, cfg.out):
            print(f"plot: {path}", file=sys.stderr)
    return report
