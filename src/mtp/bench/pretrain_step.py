"""``mtp bench pretrain-step``: training cost of n-token pretraining against next-token training."""

from __future__ import annotations

import statistics
from pathlib import Path


from mtp.analysis.run import machine_info
from mtp.bench.train_memory import _probe
from mtp.config import BenchPretrainStepConfig
from mtp.errors import UserError



def bench_pretrain_step(cfg: BenchPretrainStepConfig, command: str = "") -> dict:
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

    preset_name, n, vocab, batch_size, seq_len = cfg.preset, cfg.heads, cfg.vocab, cfg.batch_size, cfg.seq_len
    chunk_tokens, repeats, rounds, device, dtype = cfg.chunk_tokens, cfg.repeats, cfg.rounds, cfg.device, cfg.dtype

    from mtp.training.pretrain import byte_tokenizer, get_preset, trunk_config, write_initial_model

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
            "machine": machine_info(device), "command": command}


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
