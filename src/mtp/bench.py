"""Benchmarks: one harness for every timing figure, methods timed side by side in one run.

``bench_analyze``: batched marginalization (cached prefix, tree-masked candidate batches) against the
naive method (one full forward per candidate path) on the same positions, with the largest difference
between their marginals.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def bench_analyze(model_name: str, data: str, *, context: int = 256, positions: int = 32,
                  positions_per_window: int = 16, k: int = 2, top_p: float = 0.99, max_candidates: int = 128,
                  chunk_tokens: int = 256, repeats: int = 3, dtype: str = "float32", device: str = "cpu",
                  seed: int = 0, progress: bool = True) -> dict:
    """Time batched vs naive marginalization on the same positions; report both, the ratio and the max diff.

    The defaults are those of ``mtp analyze`` (16 positions share a window's prefix). Per window, the two
    methods run side by side ``repeats`` times each; the figures are sums over windows of per-window medians.
    """
    if (not 1 <= k <= 3 or not 0 < top_p <= 1 or positions < 1 or max_candidates < 1 or context < 1
            or positions_per_window < 1 or repeats < 1):
        raise UserError("bench analyze needs 1 <= --k <= 3, 0 < --top-p <= 1, and positive --positions, "
                        "--positions-per-window, --max-candidates, --context and --repeats")
    resolve_backbone(model_name)
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
        "torch_threads": torch.get_num_threads(),
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_step_probe(model_name: str, order: str, heads: int, kind: str, mode: str, batch_size: int, seq_len: int,
                     chunk_tokens: int, repeats: int, device: str, dtype: str, tap: str = "last") -> dict:
    """One process, one order: peak memory of the first training step, and the median time of the next ones."""
    import resource

    from mtp.config import TrainConfig
    from mtp.losses import head_weights
    from mtp.train import build_model, mtp_step, naive_step

    cfg = TrainConfig(model=model_name, heads=heads, kind=kind, mode=mode, device=device, dtype=dtype, lora_r=16,
                      tap=tap, init_from_last=False if tap != "last" else TrainConfig.init_from_last)
    model, _ = build_model(cfg, device)
    model.train()
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    weights = head_weights(heads)

    def step():
        if order == "efficient":
            mtp_step(model, ids, weights, train_backbone=mode != "frozen", chunk_tokens=chunk_tokens)
        else:
            naive_step(model, ids, weights)
        model.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"order": order, "peak_bytes": peak, "median_step_seconds": statistics.median(times), "times": times}


def _probe(model: str, order: str, heads: int, kind: str, mode: str, batch_size: int, seq_len: int,
           chunk_tokens: int, repeats: int, device: str, dtype: str, tap: str, what: str) -> dict:
    args = [sys.executable, "-m", "mtp.bench", "train-step", model, order, str(heads), kind, mode, str(batch_size),
            str(seq_len), str(chunk_tokens), str(repeats), device, dtype, tap]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench: the {what} step failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train_memory(model_name: str = "smollm2-135m", heads: int = 4, kind: str = "mlp", mode: str = "frozen",
                       batch_size: int = 8, seq_len: int = 512, chunk_tokens: int = 4096, repeats: int = 3,
                       device: str = "cpu", dtype: str = "float32") -> dict:
    """Memory-efficient head order vs naive (all heads' logits alive): peak memory and step time, side by side.

    On CPU each order runs in a fresh process (peak RSS cannot be reset within one); on a GPU the same
    per-process probe reads torch.cuda.max_memory_allocated.
    """
    from mtp.backbones import resolve_backbone

    resolve_backbone(model_name)
    results = {order: _probe(model_name, order, heads, kind, mode, batch_size, seq_len, chunk_tokens, repeats,
                             device, dtype, "last", order) for order in ("efficient", "naive")}
    eff, naive = results["efficient"], results["naive"]
    return {"model": model_name, "heads": heads, "kind": kind, "mode": mode, "batch_size": batch_size,
            "seq_len": seq_len, "chunk_tokens": chunk_tokens, "dtype": dtype, "efficient": eff, "naive": naive,
            "memory_ratio": eff["peak_bytes"] / naive["peak_bytes"],
            "time_ratio": eff["median_step_seconds"] / naive["median_step_seconds"],
            "machine": machine_info(device)}


def format_bench_train_memory(r: dict) -> str:
    gib = 1024 ** 3
    return "\n".join([
        f"bench train-memory: {r['model']}, {r['heads']} {r['kind']} heads, {r['mode']} backbone, "
        f"batch x length = {r['batch_size']} x {r['seq_len']}, {r['dtype']}",
        f"  memory-efficient order: peak {r['efficient']['peak_bytes'] / gib:.2f} GiB, "
        f"step {r['efficient']['median_step_seconds']:.2f} s (median)",
        f"  naive (all logits alive): peak {r['naive']['peak_bytes'] / gib:.2f} GiB, "
        f"step {r['naive']['median_step_seconds']:.2f} s (median)",
        f"  memory ratio {r['memory_ratio']:.2f}x, time ratio {r['time_ratio']:.2f}x",
        f"  machine: {r['machine']['cpu']}, device {r['machine']['device']}",
    ])


def bench_pretrain_step(preset_name: str = "mini", n: int = 4, vocab: int | None = None, batch_size: int | None = None,
                        seq_len: int | None = None, chunk_tokens: int = 4096, repeats: int = 5, rounds: int = 2,
                        device: str = "cpu", dtype: str = "float32") -> dict:
    """Training cost of n-token pretraining (Gloeckle et al. Table S5's question), side by side in one run.

    Random-weight models of the preset, one joint training step (trunk + heads) on random tokens:
    - ``n``: the preset's parameter-matched n-token model (L - n + 1 layers + n - 1 head layers);
    - ``n1_same_trunk``: that model without its extra heads (the same trunk, next-token only);
    - ``n1_matched``: the preset's next-token model (L layers, the same parameter count as ``n``);
    - ``n_naive``: the n-token model with all heads' logits alive at once (memory).
    Each probe runs in a fresh process (peak RSS); the probes alternate over ``rounds`` so that load drift on a
    shared machine hits all of them, and each time is the median over rounds x repeats steps.
    """
    import tempfile

    from mtp.pretrain import byte_tokenizer, get_preset, trunk_config, write_initial_model

    preset = get_preset(preset_name)
    if n < 2:
        raise UserError(f"--heads must be at least 2 to compare with next-token training, got {n}")
    if preset.layers - (n - 1) < 2:
        raise UserError(f"preset {preset_name!r} has {preset.layers} layers: too few for {n} heads and a trunk")
    seq_len = seq_len or preset.seq_len
    batch_size = batch_size or preset.batch_size
    if seq_len > preset.context:
        raise UserError(f"--seq-len {seq_len} is above the {preset_name!r} model's context ({preset.context} tokens)")
    tok = byte_tokenizer()
    vocab = vocab or len(tok)
    if vocab < len(tok):
        raise UserError(f"--vocab must be at least {len(tok)} (bytes + specials), got {vocab}")
    variants = {"n": (n, None), "n_naive": (n, None), "n1_same_trunk": (1, preset.layers - (n - 1)),
                "n1_matched": (1, preset.layers)}
    with tempfile.TemporaryDirectory(prefix="mtp-bench-pretrain-") as tmp:
        folders, layers = {}, {}
        for name, (heads, n_layers) in variants.items():
            if name == "n_naive":
                continue
            config = trunk_config(preset, heads, vocab, seq_len, tok)
            if n_layers is not None:
                config.num_hidden_layers = n_layers
            folders[name] = write_initial_model(Path(tmp) / name, config, tok, seed=0)
            layers[name] = config.num_hidden_layers
        folders["n_naive"], layers["n_naive"] = folders["n"], layers["n"]
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (heads, _) in variants.items():
                order = "naive" if name == "n_naive" else "efficient"
                runs[name].append(_probe(str(folders[name]), order, heads - 1, "transformer", "joint", batch_size,
                                         seq_len, chunk_tokens, repeats, device, dtype,
                                         f"layer:{layers[name] - 1}", name))
    out = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        out[name] = {"heads": variants[name][0], "layers": layers[name] + variants[name][0] - 1,
                     "order": rs[0]["order"], "peak_bytes": max(r["peak_bytes"] for r in rs),
                     "median_step_seconds": statistics.median(times), "times": times}
    step_tokens = batch_size * seq_len
    for r in out.values():
        r["tokens_per_s"] = step_tokens / r["median_step_seconds"]
    t = {name: r["median_step_seconds"] for name, r in out.items()}
    return {"preset": preset_name, "n": n, "vocab": vocab, "batch_size": batch_size, "seq_len": seq_len,
            "chunk_tokens": chunk_tokens, "dtype": dtype, "rounds": rounds, "repeats": repeats, "variants": out,
            "time_ratio_same_trunk": t["n"] / t["n1_same_trunk"], "time_ratio_matched": t["n"] / t["n1_matched"],
            "time_ratio_naive": t["n"] / t["n_naive"],
            "memory_ratio_naive": out["n"]["peak_bytes"] / out["n_naive"]["peak_bytes"],
            "machine": machine_info(device)}


def format_bench_pretrain_step(r: dict) -> str:
    mib = 1024 ** 2
    n = r["n"]
    names = {"n": f"n = {n}, memory-efficient order", "n_naive": f"n = {n}, naive (all logits alive)",
             "n1_same_trunk": "n = 1, same trunk (no extra heads)", "n1_matched": "n = 1, parameter-matched"}
    lines = [f"bench pretrain-step: preset {r['preset']}, vocab {r['vocab']}, batch x length = "
             f"{r['batch_size']} x {r['seq_len']}, {r['dtype']}, joint training step (median of "
             f"{r['rounds']} x {r['repeats']})",
             "| model | layers (trunk + heads) | step (s) | tokens/s | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for key in ("n1_matched", "n1_same_trunk", "n", "n_naive"):
        v = r["variants"][key]
        lines.append(f"| {names[key]} | {v['layers']} | {v['median_step_seconds']:.3f} | {v['tokens_per_s']:.0f} | "
                     f"{v['peak_bytes'] / mib:.0f} |")
    lines += [f"step time n = {n} / n = 1: {r['time_ratio_same_trunk']:.3f}x on the same trunk, "
              f"{r['time_ratio_matched']:.3f}x parameter-matched; memory-efficient / naive: memory "
              f"{r['memory_ratio_naive']:.2f}x, time {r['time_ratio_naive']:.2f}x",
              f"machine: {r['machine']['cpu']}, device {r['machine']['device']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- decoding


def bench_verify(model_name: str, dtypes: list[str], context: int = 256, repeats: int = 7, device: str = "cpu",
                 points=None) -> dict:
    """The verify-cost curve t(k) / t(1): one forward over k new tokens against a cached prefix, per dtype."""
    from mtp.backbones import load_backbone, resolve_backbone
    from mtp.decode.methods import COST_POINTS, verify_cost

    resolve_backbone(model_name)
    if context < 1 or repeats < 1:
        raise UserError("--context and --repeats must be >= 1")
    curves = {}
    for dtype in dtypes:
        model, _ = load_backbone(model_name, dtype=dtype, device=device, require_tokenizer=False)
        cost = verify_cost(model.eval(), context, points or COST_POINTS, repeats)
        curves[dtype] = {"seconds": {str(k): v for k, v in cost.items()},
                         "ratio": {str(k): v / cost[1] for k, v in cost.items()}}
        del model
    return {"model": model_name, "context": context, "repeats": repeats, "curves": curves,
            "machine": machine_info(device), "torch_threads": torch.get_num_threads()}


def format_bench_verify(r: dict) -> str:
    dtypes = list(r["curves"])
    ks = list(r["curves"][dtypes[0]]["ratio"])
    lines = [f"bench verify: {r['model']}, one forward over k tokens after a {r['context']}-token cached prefix, "
             f"median of {r['repeats']}", "",
             "| k | " + " | ".join(f"{d} t(k) ms | {d} t(k)/t(1)" for d in dtypes) + " |",
             "|---:|" + "---:|---:|" * len(dtypes)]
    for k in ks:
        cells = [f"{r['curves'][d]['seconds'][k] * 1e3:.1f} | {r['curves'][d]['ratio'][k]:.2f}" for d in dtypes]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append(f"\nmachine: {r['machine']['cpu']}, {r['torch_threads']} torch threads, device "
                 f"{r['machine']['device']}")
    return "\n".join(lines)


def bench_decode(model_name: str, prompts: str, methods: list[str], heads: str | None = "default",
                 batch_size: int = 1, max_new_tokens: int = 128, limit: int | None = 20, dtype: str = "float32",
                 device: str = "cpu", seed: int = 0, temperature: float = 0.0, chat: bool = True,
                 nodes: int | None = None, progress: bool = True, draft_len: int | None = None,
                 adapt: bool = False, compare_adaptive: bool = False, draft_vocab: int | None = None) -> dict:
    """Every method and two plain baselines (transformers' generate, our own loop) on the same prompts,
    side by side per batch: tokens/s, tau, speedup against the fastest plain baseline, acceptance lengths
    and the share of prompts whose output equals plain greedy decoding."""
    from mtp.decode.accept import Sampling
    from mtp.decode.methods import HEAD_METHODS, METHODS
    from mtp.decode.run import adaptive_sizes, build_decoder, encode_prompt, eos_ids, hf_generate, load_for_decoding
    from mtp.prompts import load_prompts

    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}: use {', '.join(METHODS)}")
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError("--batch-size, --max-new-tokens and --limit must be >= 1")
    sampling = Sampling(temperature=temperature)
    texts = load_prompts(prompts, "eval", limit, seed)
    need_heads = any(m in HEAD_METHODS for m in methods)
    backbone, tokenizer, mtp_model, folder = load_for_decoding(model_name, heads if need_heads else None, dtype,
                                                              device)
    eos = eos_ids(backbone, tokenizer)
    encoded = [encode_prompt(tokenizer, t, chat) for t in texts]
    decoders, infos = {}, {}
    for m in ["plain"] + [m for m in methods if m != "plain"]:
        decoders[m], infos[m] = build_decoder(backbone, tokenizer, mtp_model, folder, model_name, m,
                                              sampling=sampling, nodes=nodes, draft_len=draft_len, seed=seed,
                                              adapt=adapt, draft_vocab=draft_vocab)
        if compare_adaptive and not adapt and m in ("blockwise", "tree", "hybrid"):  # sizes re-chosen online
            dec, info = build_decoder(backbone, tokenizer, mtp_model, folder, model_name, m, sampling=sampling,
                                      nodes=nodes, draft_len=draft_len, seed=seed, adapt=True,
                                      draft_vocab=draft_vocab)
            if "adaptive" in info:
                decoders[f"{m}-adaptive"], infos[f"{m}-adaptive"] = dec, info
    names = ["transformers"] + list(decoders)
    stats = {n: {"seconds": 0.0, "tokens": 0, "row_steps": 0, "hist": {}, "outputs": [], "batch_tps": [],
                 "verify_forwards": 0, "verify_tokens": 0}
             for n in names}
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    hf_generate(backbone, tokenizer, batches[0], 8, eos, sampling)  # warm-up: first-call costs out of the timings
    for dec in decoders.values():
        dec.generate(batches[0], 8, eos)
    for batch in tqdm(batches, desc="bench decode", unit="batch", disable=not progress, file=sys.stderr):
        runs = {"transformers": hf_generate(backbone, tokenizer, batch, max_new_tokens, eos, sampling)}
        for name, dec in decoders.items():
            runs[name] = dec.generate(batch, max_new_tokens, eos)
        for name, out in runs.items():
            st = stats[name]
            st["seconds"] += out.seconds
            st["tokens"] += out.new_tokens
            st["batch_tps"].append(out.new_tokens / out.seconds)
            st["verify_forwards"] += out.verify_forwards
            st["verify_tokens"] += out.verify_tokens
            for row in out.rows:
                st["outputs"].append(row.tokens)
                st["row_steps"] += row.steps
                for a in row.accepted:
                    st["hist"][a] = st["hist"].get(a, 0) + 1
    reference = stats["transformers"]["outputs"]
    baseline_tps = max(stats[b]["tokens"] / stats[b]["seconds"] for b in ("transformers", "plain"))
    results = {}
    for name in names:
        st = stats[name]
        tps = st["tokens"] / st["seconds"]
        per_batch = [a / max(b, c) for a, b, c in zip(st["batch_tps"], stats["transformers"]["batch_tps"],
                                                       stats["plain"]["batch_tps"])]
        results[name] = {
            "tokens_per_s": tps, "new_tokens": st["tokens"], "seconds": st["seconds"],
            "tau": st["tokens"] / max(1, st["row_steps"]) if name != "transformers" else 1.0,
            "speedup": tps / baseline_tps, "median_batch_speedup": statistics.median(per_batch),
            "acceptance_histogram": {str(k): v for k, v in sorted(st["hist"].items())},
            "verify_tokens_per_forward": (st["verify_tokens"] / st["verify_forwards"]
                                          if name != "transformers" and st["verify_forwards"] else 1.0),
            "identical_share": sum(a == b for a, b in zip(st["outputs"], reference)) / len(reference),
            "identical_to_plain_loop_share": sum(a == b for a, b in zip(st["outputs"], stats["plain"]["outputs"]))
            / len(reference),
            **({"config": infos[name]} if name in infos else {}),
            **({"adaptive_sizes": sizes} if name in decoders and (sizes := adaptive_sizes(decoders[name])) else {}),
        }
    return {"model": model_name, "heads": str(folder) if folder else None, "prompts": prompts,
            "n_prompts": len(texts), "batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": dtype,
            "temperature": temperature, "baseline": "fastest of transformers generate and our plain loop",
            "baseline_tokens_per_s": baseline_tps, "methods": results, "machine": machine_info(device),
            "torch_threads": torch.get_num_threads(),
            "identical_reference": "transformers generate (greedy)" if sampling.greedy else None}


def format_bench_decode(r: dict) -> str:
    lines = [f"bench decode: {r['model']} ({r['dtype']}), {r['n_prompts']} {r['prompts']} prompts, batch "
             f"{r['batch_size']}, {r['max_new_tokens']} new tokens, temperature {r['temperature']:g}", "",
             "| method | tokens/s | tau | tokens per verify forward | speedup | median batch speedup "
             "| identical to greedy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["methods"].items():
        ident = f"{m['identical_share']:.0%}" if r["temperature"] == 0 else "n/a (sampling)"
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['tau']:.2f} | "
                     f"{m['verify_tokens_per_forward']:.1f} | {m['speedup']:.2f}x | "
                     f"{m['median_batch_speedup']:.2f}x | {ident} |")
    lines.append(f"\nspeedup: against the fastest plain baseline ({r['baseline_tokens_per_s']:.1f} tokens/s); "
                 f"machine: {r['machine']['cpu']}, {r['torch_threads']} torch threads, device {r['machine']['device']}")
    return "\n".join(lines)


def plot_bench_decode(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["methods"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    speed = [r["methods"][n]["speedup"] for n in names]
    bars = a.bar(names, speed, color=["#999"] * 2 + ["C0"] * (len(names) - 2))
    for bar, n in zip(bars, names):
        a.annotate(f"tau {r['methods'][n]['tau']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                   ha="center", va="bottom", fontsize=8)
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("speedup vs fastest plain baseline")
    a.set_title(f"{r['model']} {r['dtype']}, {r['prompts']} prompts, batch {r['batch_size']}")
    a.tick_params(axis="x", rotation=30)
    for n in names[2:]:
        hist = {int(k): v for k, v in r["methods"][n]["acceptance_histogram"].items()}
        total = sum(hist.values()) or 1
        xs = sorted(hist)
        b.plot(xs, [hist[x] / total for x in xs], marker="o", label=n)
    b.set_xlabel("tokens emitted per verify step")
    b.set_ylabel("share of steps")
    b.set_title("acceptance lengths")
    b.legend(fontsize=8)
    fig.tight_layout()
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "train-step":
    a = sys.argv[2:]
    print(json.dumps(train_step_probe(a[0], a[1], int(a[2]), a[3], a[4], int(a[5]), int(a[6]), int(a[7]), int(a[8]),
                                      a[9], a[10], *a[11:12])))
