"""``mtp bench engine``: a real engine on the same prompts three ways in one run -- its own plain greedy
decoding, its own training-free speculation (llama.cpp's n-gram modes, vLLM's ngram) and our exported
EAGLE-3 heads -- and, beside them, ``mtp``'s own engine with the same heads.

Every configuration gets the same token ids (the chat template applied by the model's tokenizer) and
decodes them one at a time (batch 1), greedily, after a warm-up request. Reported per configuration:
``tokens_per_s`` (generated tokens over generation time, the engine's own clock: llama-server's
``predicted_ms``; vLLM's request wall time), ``speedup`` (the median over prompts of the per-prompt rate
ratio to the engine's own plain run, so a slow prompt does not dominate), ``acceptance_length`` (tokens per
target forward: generated / (generated - accepted drafts)) and ``identical_share`` (outputs token-identical to
the engine's own plain greedy output). Configurations run ``rounds`` times, alternating, mtp's own rows right
after each of the engine's rounds, and per prompt the median is kept: a drift in the machine's speed shifts
all of them alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mtp.config import DraftOptions
from mtp.errors import UserError
from mtp.machine import cpu_name, cpu_signature

LLAMA_NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-mod")


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}


def _prompt_ids(cfg, tokenizer) -> list[list[int]]:
    from mtp.decode.run import encode_prompt
    from mtp.prompts import load_prompts

    prompts = load_prompts(cfg.prompts, "eval", cfg.limit, cfg.seed)
    return [encode_prompt(tokenizer, p, chat=cfg.chat) for p in prompts]


def _draft_folder(cfg, fmt: str, draft_vocab: int | None = None) -> Path:
    """The heads exported for the engine (``draft_vocab``: the draft's vocabulary cut to that size, 0 = as
    trained; default ``--draft-vocab`` or as trained), cached by the heads' content (exported once)."""
    from mtp.config import ExportConfig
    from mtp.export.run import GGUF_NAME, export
    from mtp.heads_format import CONFIG, WEIGHTS, resolve_heads
    from mtp.io import cache_dir

    if draft_vocab is None:
        draft_vocab = cfg.draft_vocab or 0
    folder = resolve_heads(cfg.heads, cfg.model)
    digest = hashlib.sha1((folder / WEIGHTS).read_bytes() + (folder / CONFIG).read_bytes())
    kind = f"{fmt}-{cfg.draft_type}" if fmt == "gguf" and cfg.draft_type != "f16" else fmt
    kind += f"-v{draft_vocab}" if draft_vocab else ""
    out = cache_dir("engines", "drafts", f"{kind}-{digest.hexdigest()[:16]}")
    done = out / GGUF_NAME if fmt == "gguf" else out / "config.json"
    if not done.is_file():
        export(ExportConfig(heads=str(folder), format=fmt, out=str(out), model=cfg.model, overwrite=True,
                            gguf_type=cfg.draft_type, draft_vocab=draft_vocab))
    return out


def _draft_ranking(cfg) -> list[int] | None:
    """The eagle3 draft's target ids, most frequent training target first (None: heads saved without counts)."""
    from mtp.heads_format import load_heads_weights, resolve_heads

    weights = load_heads_weights(resolve_heads(cfg.heads, cfg.model))
    d2t = next((v for k, v in weights.heads.items() if k.endswith("d2t")), None)
    if weights.token_counts is None or d2t is None:
        return None
    import torch

    ids = d2t.long() + torch.arange(d2t.numel())
    order = torch.sort(weights.token_counts[ids], descending=True, stable=True).indices
    return ids[order].tolist()


def _summarize(name: str, rows: list[dict], plain: list[dict] | None) -> dict:
    """rows: per prompt {tokens, gen_seconds, accepted (or None)}."""
    n = sum(len(r["tokens"]) for r in rows)
    secs = sum(r["gen_seconds"] for r in rows)
    out = {"name": name, "prompts": len(rows), "tokens": n, "gen_seconds": round(secs, 6),
           "tokens_per_s": round(n / secs, 3) if secs else None}
    accepted = [r["accepted"] for r in rows if r.get("accepted") is not None]
    if accepted:
        acc = sum(accepted)
        out["accepted_drafts"] = acc
        out["acceptance_length"] = round(n / max(1, n - acc), 3)
    if plain is not None:
        ratios = [(len(r["tokens"]) / r["gen_seconds"]) / (len(p["tokens"]) / p["gen_seconds"])
                  for r, p in zip(rows, plain) if r["gen_seconds"] and p["gen_seconds"] and p["tokens"]]
        out["speedup"] = round(statistics.median(ratios), 3) if ratios else None
        out["speedup_of_totals"] = round(out["tokens_per_s"] / _rate(plain), 3) if secs else None
        out["identical_share"] = round(sum(r["tokens"] == p["tokens"] for r, p in zip(rows, plain)) / len(rows), 3)
    return out


def _rate(rows):
    return sum(len(r["tokens"]) for r in rows) / sum(r["gen_seconds"] for r in rows)


def _median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per prompt, the round with the median generation time (outputs are the same every round)."""
    out = []
    for per_prompt in zip(*runs):
        ranked = sorted(per_prompt, key=lambda r: r["gen_seconds"])
        out.append(ranked[len(ranked) // 2])
    return out


# ----------------------------------------------------------------------------- llama.cpp


def _llama_configs(cfg, draft: Path | None) -> list[tuple[str, list[str]]]:
    configs = [("plain", [])]
    for mode in cfg.ngram_modes:
        configs.append((mode, ["--spec-type", mode, "--spec-draft-n-max", str(cfg.draft_len)]))
    if draft is not None:
        configs.append(("eagle3", ["--spec-type", "draft-eagle3", "-md", str(draft / "eagle3-draft.gguf"),
                                   "--spec-draft-n-max", str(cfg.draft_len), "--spec-draft-p-min", str(cfg.p_min)]))
    return configs


def _server_cmd(cfg, server: Path, target: Path, port: int, extra: list[str]) -> list[str]:
    return [str(server), "-m", str(target), "--host", "127.0.0.1", "--port", str(port), "-c", "4096",
            "-t", str(cfg.threads), "-np", "1", "--no-webui", *extra]


def measure_costs(cfg, server: Path, target: Path, draft_gguf: Path, tokenizer, workdir: Path,
                  base=None):
    """llama.cpp's costs on this machine for ``target`` with ``draft_gguf`` (see :mod:`mtp.engines.policy`),
    measured on prompts of the built-in ``general`` set's train split (never a set the benchmark reports on),
    or read from the per-machine cache. ``base``: the target's costs, measured already (another draft's rounds)."""
    from mtp.decode.run import encode_prompt
    from mtp.engines import llamacpp, policy
    from mtp.prompts import load_prompts

    cached = policy.load_cached(target, draft_gguf, cfg.threads)
    if cached is not None:
        return cached, policy.cache_file(target, draft_gguf, cfg.threads)
    calib = [encode_prompt(tokenizer, p, chat=cfg.chat) for p in load_prompts("general", "train", 6, 0)]
    if base is not None:
        costs = policy.Costs(t1=base.t1, verify=dict(base.verify), outputs=base.outputs)
    else:
        pool = [t for ids in calib for t in ids]
        prefix = (pool * (1 + 300 // max(1, len(pool))))[:300]
        print(f"mtp: measuring llama.cpp's costs on this machine (target {target.name}, cached once) ...",
              file=sys.stderr)
        port = llamacpp.free_port()
        outputs: list[list[int]] = []
        with llamacpp.Server(_server_cmd(cfg, server, target, port, []), port, workdir / "llama-costs.log",
                             cfg.timeout) as srv:
            for p in calib[:2]:  # warm-up: weights paged in, caches filled (a cold first pass read 40 % slow)
                srv.complete(p, 32, timeout=cfg.timeout)
            # 128 tokens each: the decode cost, and the target's own outputs that size the draft's vocabulary
            t1 = policy.measure_decode(srv, calib, n=128, timeout=cfg.timeout, outputs=outputs)
            verify = policy.measure_verify(srv, prefix, pool[::-1], timeout=cfg.timeout)
        costs = policy.Costs(t1=t1, verify=verify, outputs=outputs)
    print(f"mtp: measuring llama.cpp's draft rounds with {draft_gguf.parent.name} (cached once) ...", file=sys.stderr)
    for d in policy.ROUND_LENGTHS:
        port = llamacpp.free_port()
        extra = ["--spec-type", "draft-eagle3", "-md", str(draft_gguf), "--spec-draft-n-max", str(d),
                 "--spec-draft-p-min", "0"]
        with llamacpp.Server(_server_cmd(cfg, server, target, port, extra), port, workdir / f"llama-costs-d{d}.log",
                             cfg.timeout) as srv:
            srv.complete(calib[0], 8, timeout=cfg.timeout)
            answers = [srv.complete(p, 64, timeout=cfg.timeout) for p in calib]
        costs.rounds.append(policy.round_row(d, answers))

    path = policy.save_cached(target, draft_gguf, cfg.threads, costs,
                              {"cpu": cpu_signature(), "threads": cfg.threads, "target": str(target),
                               "draft": str(draft_gguf)})
    return costs, path


def size_draft_vocab(cfg, server: Path, target: Path, costs, tokenizer, workdir: Path):
    """The draft vocabulary that pays best here (:func:`mtp.engines.policy.choose_vocab`): the trained draft's
    rounds (``costs``) and those of one 8 times smaller, the coverage of the target's own outputs; the chosen
    size is exported and its rounds measured too, so that its draft settings come from its own costs.
    Returns (the choice or None, the chosen draft's folder, its costs or None, their cache file or None)."""
    from mtp.engines import policy

    full_draft = _draft_folder(cfg, "gguf", 0)
    ranked = _draft_ranking(cfg)
    if ranked is None or len(ranked) < 512 or not costs.outputs:
        return None, full_draft, None, None
    full = len(ranked)
    small = max(256, full // 8 // 64 * 64)
    small_draft = _draft_folder(cfg, "gguf", small)
    small_costs, _ = measure_costs(cfg, server, target, small_draft / "eagle3-draft.gguf", tokenizer, workdir,
                                   base=costs)
    sizes = sorted(set(policy.vocab_sizes(full)) | {small})
    pick = policy.choose_vocab(costs, {full: costs, small: small_costs}, policy.coverage(costs.outputs, ranked, sizes))
    n = pick["draft_vocab"]
    if n == full:
        return pick, full_draft, costs, None
    folder = _draft_folder(cfg, "gguf", n)
    chosen, cache = measure_costs(cfg, server, target, folder / "eagle3-draft.gguf", tokenizer, workdir, base=costs)
    return pick, folder, chosen, cache


def run_llamacpp(cfg, prompts: list[list[int]], workdir: Path, tokenizer=None,
                 after_round=None) -> tuple[dict, list]:
    """llama-server's configurations, ``cfg.rounds`` rounds in alternating order; ``after_round()`` runs after
    each round (mtp's own rows, interleaved with the engine's)."""
    from mtp.engines import llamacpp, policy
    from mtp.engines.targets import target_gguf

    server = llamacpp.require_server()
    draft = _draft_folder(cfg, "gguf") if cfg.heads != "none" else None  # none: plain and n-gram rows only
    target = target_gguf(cfg.model, cfg.target)
    runs: dict[str, list[list[dict]]] = {}
    configs = _llama_configs(cfg, draft)
    chosen = None
    if cfg.policy and draft is not None:
        costs, cache = measure_costs(cfg, server, target, draft / "eagle3-draft.gguf", tokenizer, workdir)
        measured_draft, vocab = draft, None
        if cfg.draft_vocab is None:  # size the draft's vocabulary by measurement
            vocab, measured_draft, costs_v, cache = size_draft_vocab(cfg, server, target, costs, tokenizer, workdir)
            costs = costs_v if costs_v is not None else costs
        choice = policy.choose(costs)
        chosen = {"costs": costs.as_dict(), "choice": choice, "cache": str(cache), "vocab": vocab,
                  "draft_gguf": str(measured_draft / "eagle3-draft.gguf")}
        # run what the costs choose even where they say plain decoding wins: the prediction is checked either way
        measured = policy.flags(dict(choice, pays=True))
        configs.append(("eagle3 measured", ["--spec-type", "draft-eagle3",
                                            "-md", str(measured_draft / "eagle3-draft.gguf"), *measured]))
    commands = {}
    for r in range(cfg.rounds):
        for name, extra in (configs if r % 2 == 0 else configs[::-1]):
            port = llamacpp.free_port()
            cmd = _server_cmd(cfg, server, target, port, extra)
            commands[name] = cmd
            print(f"mtp: llama.cpp {name} (round {r + 1}/{cfg.rounds}) ...", file=sys.stderr)
            with llamacpp.Server(cmd, port, workdir / f"llama-{name}.log", cfg.timeout) as srv:
                srv.complete(prompts[0], 8, timeout=cfg.timeout)  # warm-up
                rows = []
                for p in prompts:
                    res = srv.complete(p, cfg.max_new_tokens, timeout=cfg.timeout, return_tokens=True)
                    t = res.get("timings", {})
                    rows.append({"tokens": list(res.get("tokens", [])), "gen_seconds": t.get("predicted_ms", 0) / 1e3,
                                 "accepted": t.get("draft_n_accepted", 0 if extra else None),
                                 "drafted": t.get("draft_n", 0 if extra else None)})
            runs.setdefault(name, []).append(rows)
        if after_round is not None:
            after_round()
    rows = {name: _median_rows(rs) for name, rs in runs.items()}
    results = [_summarize(name, rows[name], rows["plain"] if name != "plain" else None) for name, _ in configs]
    info = {"target_gguf": str(target), "draft_gguf": str(draft / "eagle3-draft.gguf") if draft else None,
            "commands": {k: " ".join(v) for k, v in commands.items()},
            "plain_rows": [{"tokens": r["tokens"], "gen_seconds": r["gen_seconds"]} for r in rows["plain"]]}
    if chosen is not None:
        info["policy"] = chosen
        for r in results:
            if r["name"] == "eagle3 measured":
                r["predicted_speedup"] = chosen["choice"]["predicted_speedup"]
    return info, results


# ----------------------------------------------------------------------------- vLLM


def run_vllm(cfg, prompts: list[list[int]], workdir: Path, after_round=None) -> tuple[dict, list]:
    from mtp.backbones import local_model_folder
    from mtp.engines import vllm

    vllm.require()
    draft = _draft_folder(cfg, "eagle3")
    target = str(local_model_folder(cfg.model))
    configs = [("plain", None),
               ("ngram", {"method": "ngram", "num_speculative_tokens": cfg.draft_len, "prompt_lookup_max": 3,
                          "prompt_lookup_min": 1}),
               ("eagle3", {"method": "eagle3", "model": str(draft), "num_speculative_tokens": cfg.draft_len})]
    runs: dict[str, list[list[dict]]] = {}
    meta = {}
    for r in range(cfg.rounds):
        for name, spec in (configs if r % 2 == 0 else configs[::-1]):
            print(f"mtp: vLLM {name} (round {r + 1}/{cfg.rounds}) ...", file=sys.stderr)
            job = {"name": name, "target": target, "prompts": prompts, "max_tokens": cfg.max_new_tokens,
                   "dtype": cfg.vllm_dtype, "enforce_eager": cfg.enforce_eager, "speculative": spec,
                   "max_model_len": 4096}
            out = vllm.run_offline(job, cfg.timeout, workdir / f"vllm-{name}.log")
            counters = out["spec_counters"]
            accepted = counters.get("vllm:spec_decode_num_accepted_tokens")
            rows = [{"tokens": row["tokens"], "gen_seconds": row["seconds"], "accepted": None}
                    for row in out["rows"]]
            if accepted is not None and rows:  # the counters cover the whole run: spread over its tokens
                total = sum(len(x["tokens"]) for x in rows)
                for x in rows:
                    x["accepted"] = accepted * len(x["tokens"]) / max(1, total)
            runs.setdefault(name, []).append(rows)
            meta[name] = {"load_seconds": round(out["load_seconds"], 1), "spec_counters": counters,
                          "vllm": out.get("vllm")}
        if after_round is not None:
            after_round()
    rows = {name: _median_rows(rs) for name, rs in runs.items()}
    results = [_summarize(name, rows[name], rows["plain"] if name != "plain" else None) for name, _ in configs]
    return {"target": target, "draft": str(draft), "dtype": cfg.vllm_dtype, "runs": meta}, results


# ----------------------------------------------------------------------------- mtp's own engine


def _base_method(method: str) -> str:
    """METHOD[-exact|-inexact][-guarded] (with --bit-exact / --no-bit-exact; with the speed guard,
    mtp.decode.guard) -> METHOD."""
    return method.removesuffix("-guarded").removesuffix("-exact").removesuffix("-inexact")


class MtpRuns:
    """mtp's engine on the same token ids: its plain loop and ``--mtp-methods``, one prompt at a time, on PyTorch
    (``--mtp-backend torch``) or on llama.cpp's kernels with the same GGUF as the engine (``llama.cpp``, the same
    threads). Like the engine's own figures, each row's time is its decoding after the prefill (from its first
    token to its last). One :meth:`round` per engine round, run right after it, methods in alternating order, so a
    drift in the machine's speed shifts the engine's rows and ours alike; per prompt the median round is kept.
    The target stays loaded (idle) while the engine runs: a second copy of the model in memory beside the engine's,
    and every method of ours runs ``--rounds`` times (it ran once before the rounds were interleaved)."""

    def __init__(self, cfg, prompts: list[list[int]]):
        from mtp.decode.run import eos_ids, open_target

        self.cfg, self.prompts = cfg, prompts
        self.methods = ["plain", *cfg.mtp_methods]
        self.on_llama = cfg.mtp_backend == "llama.cpp"
        self.opts = DraftOptions(backend=cfg.mtp_backend, target=cfg.target, dtype=cfg.mtp_dtype)
        self.loaded = open_target(self.opts, cfg.model,
                                  cfg.mtp_heads or (cfg.heads if cfg.heads != "none" else "default"),
                                  [_base_method(m) for m in self.methods], {}, threads=cfg.threads)
        self.eos = eos_ids(self.loaded.backbone, self.loaded.tokenizer)
        self.runs: dict[str, list[list[dict]]] = {}
        self.rounds = 0

    def round(self):
        """Every method once over the prompts (the order reversed every other round)."""
        methods = self.methods if self.rounds % 2 == 0 else self.methods[::-1]
        self.rounds += 1
        for method in methods:
            print(f"mtp: mtp {method} (round {self.rounds}) ...", file=sys.stderr)
            kind = method.removesuffix("-guarded")
            exact = True if kind.endswith("-exact") else False if kind.endswith("-inexact") else None  # None: default
            opts = dataclasses.replace(self.opts, guard=method.endswith("-guarded"), bit_exact=exact)
            dec, _ = self.loaded.decoder(_base_method(method), opts)
            dec.generate(self.prompts[:1], max_new_tokens=8, eos_token_ids=self.eos)  # warm-up
            rows = []
            for p in self.prompts:
                first = []
                out = dec.generate([p], max_new_tokens=self.cfg.max_new_tokens, eos_token_ids=self.eos,
                                   callback=lambda row, new: first or first.append(time.perf_counter()))
                done = time.perf_counter()
                row = out.rows[0]
                rows.append({"tokens": row.tokens, "gen_seconds": max(done - first[0], 1e-9),
                             "accepted": len(row.tokens) - row.steps if method != "plain" else None})
            self.runs.setdefault(method, []).append(rows)

    def results(self, engine_plain: list[dict] | None = None) -> list:
        """Per method the summary of its median rows; ``engine_plain``: the engine's plain rows, to compare
        with (speedup and identical share)."""
        rows = {m: _median_rows(self.runs[m]) for m in self.methods}
        out = []
        for method in self.methods:
            name = f"mtp{' llama.cpp' if self.on_llama else ''} {method}"
            summary = _summarize(name, rows[method], rows["plain"] if method != "plain" else None)
            summary["rounds"] = len(self.runs[method])
            if engine_plain is not None:
                vs = _summarize(name, rows[method], engine_plain)
                summary["speedup_vs_engine_plain"] = vs["speedup"]
                summary["identical_to_engine_plain"] = vs["identical_share"]
            out.append(summary)
        return out

    def close(self):
        if self.on_llama:
            self.loaded.backbone.close()


def run_mtp(cfg, prompts: list[list[int]], engine_plain: list[dict] | None = None) -> list:
    """:class:`MtpRuns` alone, one round."""
    runs = MtpRuns(cfg, prompts)
    try:
        runs.round()
        return runs.results(engine_plain)
    finally:
        runs.close()


def bench_engine(cfg, command: str = "") -> dict:
    from mtp.backbones import backbone_config, check_context, load_backbone
    from mtp.heads_format import resolve_heads

    if cfg.engine == "llama.cpp":  # a missing engine, before any model is loaded
        from mtp.engines import llamacpp

        llamacpp.require_server()
    else:
        from mtp.engines import vllm

        vllm.require()
    if cfg.heads != "none":
        resolve_heads(cfg.heads, cfg.model)
    check_context(cfg.max_new_tokens, "--max-new-tokens", backbone_config(cfg.model))
    _, tokenizer = load_backbone(cfg.model)
    prompts = _prompt_ids(cfg, tokenizer)
    workdir = Path(cfg.json).expanduser().resolve().parent if cfg.json else Path.cwd()
    workdir = workdir / ".mtp-bench-engine-logs"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ours = MtpRuns(cfg, prompts) if cfg.mtp_methods or cfg.mtp_backend == "llama.cpp" else None
    try:
        after = ours.round if ours is not None else None
        if cfg.engine == "llama.cpp":
            info, results = run_llamacpp(cfg, prompts, workdir, tokenizer, after_round=after)
        else:
            info, results = run_vllm(cfg, prompts, workdir, after_round=after)
        engine_plain = info.pop("plain_rows", None)
        mtp_results = ours.results(engine_plain) if ours is not None else []
    finally:
        if ours is not None:
            ours.close()
    return {"engine": cfg.engine, "config": asdict(cfg), "command": command, "machine": machine(), "engine_info": info,
            "results": results, "mtp": mtp_results, "seconds": round(time.time() - started, 1)}


def format_bench_engine(result: dict) -> str:
    lines = [f"{result['engine']} on {result['config']['prompts']} ({result['results'][0]['prompts']} prompts, "
             f"{result['config']['max_new_tokens']} new tokens, greedy, batch 1; {result['machine']['cpu']})",
             "| configuration | tokens/s | speedup vs own plain | acceptance length | identical to own plain |",
             "|---|---:|---:|---:|---:|"]
    pol = result.get("engine_info", {}).get("policy")
    if pol:
        c, costs = pol["choice"], pol["costs"]
        curve = ", ".join(f"{k}: {v / costs['verify']['1']:.2f}" for k, v in costs["verify"].items())
        lines[:0] = [f"llama.cpp costs here: plain token {costs['t1'] * 1e3:.1f} ms; verify t(k)/t(1) {curve}; "
                     f"draft token {c['fit']['draft_token_s'] * 1e3:.2f} ms, round overhead "
                     f"{c['fit']['round_overhead_s'] * 1e3:.2f} ms",
                     f"chosen: --spec-draft-n-max {c['n_max']} --spec-draft-n-min {c['n_min']} --spec-draft-p-min "
                     f"{c['p_min']:g}, predicted {c['predicted_speedup']:.2f}x; ceiling (every draft accepted "
                     f"and free) {c['ceiling']:.2f}x"
                     + ("" if c["pays"] else " (below 1: plain decoding is the faster choice here)"), ""]
        v = pol.get("vocab")
        if v:
            table = ", ".join(f"{n}: {s:.2f}x" for n, s in v["predicted"].items())
            checks = "; ".join(f"{n} rows: draft token {m['draft_token_s'] * 1e3:.2f} ms, acceptance a "
                               f"{m['accept_a']:.2f} (predicted {m['predicted_accept_a']:.2f})"
                               for n, m in v["measured"].items())
            lines[-1:-1] = [f"draft vocabulary by measurement: {v['draft_vocab']} rows (predicted speedup by size: "
                            f"{table}); measured {checks}"]
    for r in result["results"] + result.get("mtp", []):
        def fmt(key, pattern):
            return pattern.format(r[key]) if r.get(key) is not None else "-"
        name = r["name"] + (f" (predicted {r['predicted_speedup']:.2f}x)" if r.get("predicted_speedup") else "")
        lines.append(f"| {name} | {fmt('tokens_per_s', '{:.1f}')} | {fmt('speedup', '{:.2f}x')} | "
                     f"{fmt('acceptance_length', '{:.2f}')} | {fmt('identical_share', '{:.0%}')} |")
    engine_rows = [r for r in result.get("mtp", []) if r.get("speedup_vs_engine_plain") is not None]
    if engine_rows:
        lines += ["", f"against {result['engine']}'s plain decoding (per-prompt medians, same prompts):"]
        lines += [f"- {r['name']}: {r['speedup_vs_engine_plain']:.2f}x, identical output "
                  f"{r['identical_to_engine_plain']:.0%}"
                  + ("" if "llama.cpp" in r["name"] else " (PyTorch on the dequantized weights: other arithmetic)")
                  for r in engine_rows]
    return "\n".join(lines)


def plot_bench_engine(results: list[dict] | dict, path: str) -> None:
    """Tokens/s per engine x configuration, from one or more bench results."""
    results = [results] if isinstance(results, dict) else results
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtp.io import save_figure

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, values, colors = [], [], []
    for i, res in enumerate(results):
        for r in res["results"] + res.get("mtp", []):
            engine = "mtp" if r["name"].startswith("mtp ") else res["engine"]
            labels.append(f"{engine}: {r['name'].removeprefix('mtp ')}")
            values.append(r["tokens_per_s"] or 0)
            colors.append(f"C{i if engine != 'mtp' else len(results)}")
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    cpu = results[0].get("machine", {}).get("cpu", "") if results else ""
    ax.set_title(f"each engine's plain decoding, its own speculation and our EAGLE-3 heads ({cpu})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def load_results(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"{p} is not a `mtp bench engine` JSON result ({e})") from None
    return out
