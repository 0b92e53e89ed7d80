"""``mtp bench verify``: the verify-cost curve, time of one forward over k tokens, t(k)/t(1)."""

from __future__ import annotations


import torch

from mtp.analysis.run import machine_info
from mtp.backbones import backbone_config, check_context, load_backbone, resolve_backbone
from mtp.config import BenchVerifyConfig
from mtp.decode.methods import COST_POINTS, verify_cost



def bench_verify(cfg: BenchVerifyConfig, command: str = "", points=None) -> dict:
    """The verify-cost curve t(k) / t(1): one forward over k new tokens against a cached prefix, per dtype."""
    model_name, dtypes, context, repeats, device = cfg.model, cfg.dtypes, cfg.context, cfg.repeats, cfg.device
    resolve_backbone(model_name)
    longest = max(points or COST_POINTS)  # the verify forwards run after the cached prefix
    check_context(context + longest, f"--context {context} + the longest verify forward ({longest})",
                  backbone_config(model_name))
    curves = {}
    for dtype in dtypes:
        model, _ = load_backbone(model_name, dtype=dtype, device=device, require_tokenizer=False)
        cost = verify_cost(model.eval(), context, points or COST_POINTS, repeats)
        curves[dtype] = {"seconds": {str(k): v for k, v in cost.items()},
                         "ratio": {str(k): v / cost[1] for k, v in cost.items()}}
        del model
    return {"model": model_name, "context": context, "repeats": repeats, "curves": curves,
            "machine": machine_info(device), "torch_threads": torch.get_num_threads(),
            "command": command}


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
