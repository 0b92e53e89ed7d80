"""``mtp bench train-memory``: peak memory and step time of one training step, memory-efficient head order vs
naive (all heads' logits alive); each order runs in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from mtp.analysis.run import machine_info
from mtp.backbones import backbone_config, check_context, resolve_backbone
from mtp.config import BenchTrainMemoryConfig, TrainConfig
from mtp.errors import UserError
from mtp.training.losses import head_weights
from mtp.training.train import build_model, mtp_step, naive_step

PROBE_TIMEOUT = 3600  # seconds for one probe process (load, a measured step and --repeats timed steps)



def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_step_probe(model_name: str, order: str, heads: int, kind: str, mode: str, batch_size: int, seq_len: int,
                     chunk_tokens: int, repeats: int, device: str, dtype: str, tap: str = "last") -> dict:
    """One process, one order: peak memory of the first training step, and the median time of the next ones."""
    import resource

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
    args = [sys.executable, "-m", "mtp.bench.train_memory", "train-step", model, order, str(heads), kind, mode, str(batch_size),
            str(seq_len), str(chunk_tokens), str(repeats), device, dtype, tap]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench: the {what} step took more than {PROBE_TIMEOUT // 60} minutes: stopped (lower "
                        f"--batch-size, --seq-len or --repeats)") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench: the {what} step failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train_memory(cfg: BenchTrainMemoryConfig, command: str = "") -> dict:
    """Memory-efficient head order vs naive (all heads' logits alive): peak memory and step time, side by side.

    On CPU each order runs in a fresh process (peak RSS cannot be reset within one); on a GPU the same
    per-process probe reads torch.cuda.max_memory_allocated.
    """

    model_name, heads, kind, mode, batch_size, seq_len = (cfg.model, cfg.heads, cfg.kind, cfg.mode, cfg.batch_size,
                                                          cfg.seq_len)
    chunk_tokens, repeats, device, dtype = cfg.chunk_tokens, cfg.repeats, cfg.device, cfg.dtype
    resolve_backbone(model_name)
    check_context(seq_len, "--seq-len", backbone_config(model_name))
    results = {order: _probe(model_name, order, heads, kind, mode, batch_size, seq_len, chunk_tokens, repeats,
                             device, dtype, "last", order) for order in ("efficient", "naive")}
    eff, naive = results["efficient"], results["naive"]
    return {"model": model_name, "heads": heads, "kind": kind, "mode": mode, "batch_size": batch_size,
            "seq_len": seq_len, "chunk_tokens": chunk_tokens, "dtype": dtype, "efficient": eff, "naive": naive,
            "memory_ratio": eff["peak_bytes"] / naive["peak_bytes"],
            "time_ratio": eff["median_step_seconds"] / naive["median_step_seconds"],
            "machine": machine_info(device), "command": command}


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


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "train-step":
    a = sys.argv[2:]
    print(json.dumps(train_step_probe(a[0], a[1], int(a[2]), a[3], a[4], int(a[5]), int(a[6]), int(a[7]), int(a[8]),
                                      a[9], a[10], *a[11:12])))
