"""``mtp bench context``: the cost per generated token as the context grows, plain and speculative, side by side.

Each prompt is the first L tokens of one long held-out document (no chat template), for every L in the
sweep; every method generates the same number of tokens after it. Methods alternate within each round and
the median over rounds is kept, so load drift on a shared machine hits all of them. The figure a decoding
engine is judged by is ``growth``: the time per token at the longest context over that at the shortest
(an engine whose per-step work grows with the sequence shows it here).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import torch
from tqdm import tqdm

from mtp.analysis.run import load_corpora, machine_info
from mtp.config import BenchContextConfig
from mtp.decode.accept import Sampling
from mtp.decode.run import hf_generate, open_target
from mtp.errors import UserError
from mtp.io import save_figure


def context_prompts(tokenizer, data: str, lengths: list[int]) -> list[list[int]]:
    """The first L tokens of the longest held-out document of ``data``, for each L."""
    corpus = next(iter(load_corpora([data]).values()))
    longest = max(corpus.documents, key=lambda d: len(d.text))
    ids = tokenizer(longest.text, add_special_tokens=True)["input_ids"]
    if len(ids) < max(lengths):
        raise UserError(f"the longest {data} document has {len(ids)} tokens, fewer than --contexts {max(lengths)}: "
                        f"lower it or give a longer --data file")
    return [ids[:n] for n in lengths]


def bench_context(cfg: BenchContextConfig, command: str = "") -> dict:
    if cfg.backend == "llama.cpp" and cfg.methods == BenchContextConfig().methods:  # the default: its own loop only
        cfg = dataclasses.replace(cfg, methods=[m for m in cfg.methods if m != "transformers"])
    if cfg.backend == "llama.cpp" and "transformers" in cfg.methods:
        raise UserError("--methods transformers is transformers' own generate, a PyTorch model: leave it out on "
                        "--backend llama.cpp (its plain loop is `plain`)")
    needs = {f"--contexts {max(cfg.contexts)} + --max-new-tokens {cfg.max_new_tokens}":
             max(cfg.contexts) + cfg.max_new_tokens}
    loaded = open_target(cfg, cfg.model, cfg.heads, cfg.methods, needs, cfg.exit_layer,
                         n_ctx=max(cfg.contexts) + cfg.max_new_tokens + 256)
    backbone, tokenizer, folder = loaded.backbone, loaded.tokenizer, loaded.folder
    prompts = context_prompts(tokenizer, cfg.data, cfg.contexts)
    decoders, configs = {}, {}
    for m in cfg.methods:
        if m != "transformers":
            decoders[m], configs[m] = loaded.decoder(m, cfg)
    no_eos: list[int] = []  # every run generates exactly max_new_tokens: equal work per context

    def run(name: str, prompt: list[int], n: int):
        if name == "transformers":
            return hf_generate(backbone, tokenizer, [prompt], n, no_eos, Sampling.of(cfg))
        return decoders[name].generate([prompt], n, no_eos)

    for name in cfg.methods:  # warm-up: first-call costs out of the timings
        run(name, prompts[0], 4)
    runs = {(m, n): [] for m in cfg.methods for n in cfg.contexts}
    prefills = {(m, n): [] for m in cfg.methods for n in cfg.contexts}
    for _ in tqdm(range(cfg.rounds), desc="bench context", unit="round", disable=cfg.quiet, file=sys.stderr):
        for n, prompt in zip(cfg.contexts, prompts):
            for m in cfg.methods:  # the prompt's forward and its one token, then the whole answer
                prefills[(m, n)].append(run(m, prompt, 1).seconds)
                out = run(m, prompt, cfg.max_new_tokens)
                runs[(m, n)].append((out.seconds, out.new_tokens, out.rows[0].steps))
    methods = {}
    for m in cfg.methods:
        rows = [_row(n, runs[(m, n)], prefills[(m, n)], m != "transformers") for n in cfg.contexts]
        methods[m] = {"rows": rows, "growth": rows[-1]["decode_ms_per_token"] / rows[0]["decode_ms_per_token"],
                      "growth_with_prefill": rows[-1]["ms_per_token"] / rows[0]["ms_per_token"],
                      **({"config": configs[m].as_dict()} if m in configs else {})}
    return {"model": cfg.model, "heads": str(folder) if folder else None, "data": cfg.data,
            "dtype": cfg.dtype if loaded.backend == "torch" else f"GGUF {cfg.target}", "backend": loaded.backend,
            **({} if loaded.backend == "torch" else {"llama_threads": backbone.ctx.threads}),
            "contexts": cfg.contexts, "max_new_tokens": cfg.max_new_tokens, "rounds": cfg.rounds,
            "methods": methods, "command": command, "machine": machine_info(cfg.device),
            "torch_threads": torch.get_num_threads()}


def _row(context: int, runs: list[tuple[float, int, int]], prefills: list[float], own: bool) -> dict:
    """One method at one length: median times over the rounds (greedy: the same tokens every round), and the time
    per token after the first (the prefill, timed apart as a one-token answer, taken off)."""
    seconds, (_, tokens, steps) = statistics.median(r[0] for r in runs), runs[0]
    prefill = statistics.median(prefills)
    return {"context": context, "seconds": seconds, "new_tokens": tokens, "steps": steps,
            "ms_per_token": 1000 * seconds / tokens, "tokens_per_s": tokens / seconds,
            "prefill_seconds": prefill, "decode_ms_per_token": 1000 * (seconds - prefill) / max(1, tokens - 1),
            "tau": tokens / steps if own else 1.0, "all_seconds": [r[0] for r in runs], "all_prefill_seconds": prefills}


def format_bench_context(r: dict) -> str:
    ctx = r["contexts"]
    lines = [f"bench context: {r['model']} ({r['dtype']}), prompts = the first L tokens of a held-out {r['data']} "
             f"document, {r['max_new_tokens']} new tokens, median of {r['rounds']} round(s)", "",
             "ms per generated token after the first (prefill timed apart and taken off); in brackets: tau, and "
             "the prefill's seconds", "",
             "| method | " + " | ".join(f"at {n}" for n in ctx) + f" | growth {ctx[-1]} / {ctx[0]} | with prefill |",
             "|---|" + "---:|" * (len(ctx) + 2)]
    for name, m in r["methods"].items():
        tau = (lambda row: f"tau {row['tau']:.2f}, ") if name != "transformers" else (lambda row: "")
        cells = [f"{row['decode_ms_per_token']:.1f} ({tau(row)}{row['prefill_seconds']:.2f} s)" for row in m["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['growth']:.2f}x | {m['growth_with_prefill']:.2f}x |")
    threads = (f"{r['llama_threads']} llama.cpp threads" if "llama_threads" in r else
               f"{r['torch_threads']} torch threads, device {r['machine']['device']}")
    lines.append(f"\nmachine: {r['machine']['cpu']}, {threads}")
    return "\n".join(lines)


def plot_bench_context(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, m in r["methods"].items():
        ax.plot([row["context"] for row in m["rows"]], [1000 / row["decode_ms_per_token"] for row in m["rows"]],
                marker="o", label=f"{name} (growth {m['growth']:.2f}x)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens before the first generated one)")
    ax.set_ylabel("tokens/s after the first token")
    ax.set_title(f"{r['model']} {r['dtype']}: speed vs context ({r['machine']['cpu']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
