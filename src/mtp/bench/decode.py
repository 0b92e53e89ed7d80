"""``mtp bench decode``: self-speculative decoding against plain baselines, side by side in one run."""

from __future__ import annotations

import dataclasses
import statistics
import sys

import torch
from tqdm import tqdm

from mtp.analysis.run import machine_info
from mtp.config import BenchDecodeConfig
from mtp.decode.accept import Sampling
from mtp.decode.run import adaptive_sizes, encode_prompt, eos_ids, hf_generate, open_target
from mtp.io import save_figure
from mtp.prompts import load_prompts



def bench_decode(cfg: BenchDecodeConfig, command: str = "") -> dict:
    """Every method and two plain baselines (transformers' generate, our own loop) on the same prompts,
    side by side per batch: tokens/s, tau, speedup against the fastest plain baseline, acceptance lengths
    and the share of prompts whose output equals plain greedy decoding."""
    model_name, prompts, methods, heads, batch_size = cfg.model, cfg.prompts, cfg.methods, cfg.heads, cfg.batch_size
    max_new_tokens, limit, dtype, device, seed = cfg.max_new_tokens, cfg.limit, cfg.dtype, cfg.device, cfg.seed
    chat, progress, sampling = cfg.chat, not cfg.quiet, Sampling.of(cfg)
    texts = load_prompts(prompts, "eval", limit, seed)
    loaded = open_target(cfg, model_name, heads, methods, {"--max-new-tokens": max_new_tokens}, cfg.exit_layer,
                         n_ctx=_llama_cells(cfg, len(texts)))
    backbone, tokenizer, folder = loaded.backbone, loaded.tokenizer, loaded.folder
    on_torch = loaded.backend == "torch"  # on llama.cpp our plain loop is the baseline (no transformers model)
    eos = eos_ids(backbone, tokenizer)
    encoded = [encode_prompt(tokenizer, t, chat) for t in texts]
    decoders, infos = {}, {}
    for m in ["plain"] + [m for m in methods if m != "plain"]:
        decoders[m], infos[m] = loaded.decoder(m, cfg)
        if cfg.compare_adaptive and not cfg.adapt and m in ("blockwise", "tree", "hybrid"):  # sizes re-chosen online
            dec, info = loaded.decoder(m, dataclasses.replace(cfg, adapt=True))
            if info.adaptive:
                decoders[f"{m}-adaptive"], infos[f"{m}-adaptive"] = dec, info
        if cfg.compare_guarded and not cfg.guard and m != "plain":  # drafts kept only where they are timed to pay
            decoders[f"{m}-guarded"], infos[f"{m}-guarded"] = loaded.decoder(m, dataclasses.replace(cfg, guard=True))
    if not on_torch and batch_size > 1:  # llama.cpp measures a batch's curve only with its context to itself
        for dec in decoders.values():
            dec.prepare(min(batch_size, len(encoded)))
    baselines = ("transformers", "plain") if on_torch else ("plain",)
    names = (["transformers"] if on_torch else []) + list(decoders)
    stats = {n: {"seconds": 0.0, "tokens": 0, "row_steps": 0, "hist": {}, "outputs": [], "batch_tps": [],
                 "verify_forwards": 0, "verify_tokens": 0}
             for n in names}
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    if on_torch:  # warm-up: first-call costs out of the timings
        hf_generate(backbone, tokenizer, batches[0], 8, eos, sampling)
    for dec in decoders.values():
        dec.generate(batches[0], 8, eos)
    for batch in tqdm(batches, desc="bench decode", unit="batch", disable=not progress, file=sys.stderr):
        runs = {"transformers": hf_generate(backbone, tokenizer, batch, max_new_tokens, eos, sampling)} if on_torch \
            else {}
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
    reference = stats[baselines[0]]["outputs"]
    baseline_tps = max(stats[b]["tokens"] / stats[b]["seconds"] for b in baselines)
    results = {}
    for name in names:
        st = stats[name]
        tps = st["tokens"] / st["seconds"]
        per_batch = [a / max(bs) for a, *bs in zip(st["batch_tps"], *(stats[b]["batch_tps"] for b in baselines))]
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
            **({"config": infos[name].as_dict()} if name in infos else {}),
            **({"adaptive_sizes": sizes} if name in decoders and (sizes := adaptive_sizes(decoders[name])) else {}),
            **({"guard": decoders[name].guard.report()} if name in decoders and decoders[name].guard else {}),
        }
    return {"model": model_name, "heads": str(folder) if folder else None, "prompts": prompts,
            "n_prompts": len(texts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "dtype": dtype if on_torch else f"GGUF {cfg.target}", "backend": loaded.backend,
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "command": command,
            "baselines": list(baselines),
            "baseline": "fastest of transformers generate and our plain loop" if on_torch else
            "our plain loop on llama.cpp", "baseline_tokens_per_s": baseline_tps, "methods": results,
            "machine": machine_info(device), "torch_threads": torch.get_num_threads(),
            **({} if on_torch else {"llama_threads": backbone.ctx.threads}),
            "identical_reference": (("transformers generate" if on_torch else "our plain loop on llama.cpp")
                                    + " (greedy)") if sampling.greedy else None}


def _llama_cells(cfg: BenchDecodeConfig, n_prompts: int) -> int:
    """llama.cpp's KV cells for a batch: every row's prompt (up to the model's context) and answer, and a tree."""
    return min(1 << 17, min(cfg.batch_size, n_prompts) * (4096 + cfg.max_new_tokens + 64))


def format_bench_decode(r: dict) -> str:
    lines = [f"bench decode: {r['model']} ({r['dtype']}), {r['n_prompts']} {r['prompts']} prompts, batch "
             f"{r['batch_size']}, {r['max_new_tokens']} new tokens, temperature {r['temperature']:g}", ""]
    both = r["baselines"][0] != "plain"  # on llama.cpp our plain loop is the reference itself: one column
    lines += ["| method | tokens/s | tau | tokens per verify forward | speedup | median batch speedup "
              f"| identical to {r['baselines'][0]} |" + (" identical to plain |" if both else ""),
              "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if both else "")]
    for name, m in r["methods"].items():
        greedy = r["temperature"] == 0
        ident = f"{m['identical_share']:.0%}" if greedy else "n/a (sampling)"
        plain = f"{m['identical_to_plain_loop_share']:.0%}" if greedy and name != "transformers" else "–"
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['tau']:.2f} | "
                     f"{m['verify_tokens_per_forward']:.1f} | {m['speedup']:.2f}x | "
                     f"{m['median_batch_speedup']:.2f}x | {ident} |" + (f" {plain} |" if both else ""))
    for name, m in r["methods"].items():
        if m.get("guard"):
            shares = ", ".join(f"batch {k}: {g['draft_share']:.0%} of {g['drafted_steps'] + g['plain_steps']} steps"
                               for k, g in m["guard"].items())
            lines.append(f"\n{name}: drafted {shares}; the guard decoded the other steps plainly")
    threads = (f"{r['llama_threads']} llama.cpp threads" if "llama_threads" in r else
               f"{r['torch_threads']} torch threads, device {r['machine']['device']}")
    lines.append(f"\nspeedup: against {r['baseline']} ({r['baseline_tokens_per_s']:.1f} tokens/s); "
                 f"machine: {r['machine']['cpu']}, {threads}")
    return "\n".join(lines)


def plot_bench_decode(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["methods"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    speed = [r["methods"][n]["speedup"] for n in names]
    n_base = len(r.get("baselines", ("transformers", "plain")))
    bars = a.bar(names, speed, color=["#999"] * n_base + ["C0"] * (len(names) - n_base))
    for bar, n in zip(bars, names):
        a.annotate(f"tau {r['methods'][n]['tau']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                   ha="center", va="bottom", fontsize=8)
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("speedup vs fastest plain baseline")
    a.set_title(f"{r['model']} {r['dtype']}, {r['prompts']} prompts, batch {r['batch_size']}")
    a.tick_params(axis="x", rotation=30)
    for n in names[n_base:]:
        hist = {int(k): v for k, v in r["methods"][n]["acceptance_histogram"].items()}
        total = sum(hist.values()) or 1
        xs = sorted(hist)
        b.plot(xs, [hist[x] / total for x in xs], marker="o", label=n)
    b.set_xlabel("tokens emitted per verify step")
    b.set_ylabel("share of steps")
    b.set_title("acceptance lengths")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
