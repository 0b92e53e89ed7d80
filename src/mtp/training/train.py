"""Training MTP heads: one loop for frozen, joint (full) and LoRA training.

The step follows the memory-efficient order of Gloeckle et al. (arXiv 2404.19737, §2): the backbone runs
once; its outputs are detached into leaves; then for each head in turn its forward, its loss and its
backward into those leaves (the gradients accumulate there) -- the head's logits are freed before the next
head starts, and ``chunked_head_loss`` never holds a (B, T, V) tensor; finally one backward carries the
accumulated gradients through the backbone (none when it is frozen).

The loop adds warmup + cosine learning rates (separate for heads and backbone), gradient accumulation and
clipping, bf16 autocast, atomic checkpoints with exact resume, a JSONL log, and data parallelism over
``torch.distributed`` (run it under ``torchrun --nproc_per_node=N``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mtp.backbones import DTYPES, backbone_config, check_context, load_backbone
from mtp.config import TrainConfig
from mtp.data import packed_blocks, target_counts, top_tokens
from mtp.errors import UserError
from mtp.heads_format import read_heads_config
from mtp.hf_compat import add_lora
from mtp.io import append_line, check_new_output, complete_lines, recover_dir, write_json
from mtp.machine import cpu_has
from mtp.model.eagle3 import parse_layers
from mtp.model.heads import parse_tap
from mtp.model.mtp import HeadsConfig, MTPModel
from mtp.training.checkpoint import gather_states, load_optimizer, load_weights, read_checkpoint, write_checkpoint
from mtp.training.eagle_layers import auto_layers
from mtp.training.evaluate import heldout_scores
from mtp.training.losses import chunked_head_loss, cross_entropy_sum, head_targets, head_weights


def mtp_step(model: MTPModel, input_ids: torch.Tensor, weights: list[float], *, train_backbone: bool,
             chunk_tokens: int = 4096, loss_mask: torch.Tensor | None = None, grad_scale: float = 1.0,
             hidden: list[torch.Tensor] | None = None, soft: bool = False) -> list[float]:
    """Forward and backward of one micro-batch in the memory-efficient order; returns the loss of each head.

    input_ids: (B, T). weights: [w_0, ..., w_n]; the gradient is that of grad_scale * sum_k w_k L_k, with
    L_k the mean cross-entropy of head k. ``hidden``: the backbone's tapped states, precomputed (frozen
    mode with a hidden-state cache), which skips the backbone; with ``soft`` the final normed state follows them.
    ``soft`` (eagle3): each draft step learns the target's whole distribution over the draft vocabulary at the
    position it drafts (EAGLE-3's distillation) instead of the one token in the text.
    """
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    n_tapped = len(model.tapped)
    if hidden is None:
        with torch.set_grad_enabled(train_backbone):  # a frozen trunk stops at its highest tap unless taught from
            final, states = model.trunk(input_ids, final=train_backbone or soft)
    else:
        states, final = hidden[:n_tapped], (hidden[n_tapped] if len(hidden) > n_tapped else None)
    leaves = [s.detach().requires_grad_(train_backbone) for s in states]  # the trunk boundary
    losses = []
    # Head 0: the backbone's own next-token head, on the final normed state (trained only with the backbone).
    targets = head_targets(input_ids, 0, loss_mask)
    if final is not None and train_backbone:
        final_leaf = final.detach().requires_grad_(weights[0] > 0)
        losses.append(chunked_head_loss(lambda h: model.logits(h, normed=True), final_leaf, targets,
                                        weights[0] * grad_scale, chunk_tokens, backward=final_leaf.requires_grad))
    elif model.tapped == [model.backbone.config.num_hidden_layers]:  # frozen, last layer tapped: NTP loss, for the log
        with torch.no_grad():
            losses.append(chunked_head_loss(model.logits, leaves[-1], targets, 0.0, chunk_tokens, backward=False))
    else:
        losses.append(torch.tensor(float("nan")))
    if model.autoregressive:
        teacher = final.detach() if soft else None
        losses += _eagle_losses(model, leaves, input_ids, weights, grad_scale, chunk_tokens, loss_mask, teacher)
    for k in range(1, model.n_heads + 1 if not model.autoregressive else 1):
        z = model.head_hidden(k, leaves, position_ids, tokens=input_ids)  # (B, T, H)
        losses.append(chunked_head_loss(model.head_logits, z, head_targets(input_ids, k, loss_mask),
                                        weights[k] * grad_scale, chunk_tokens, backward=weights[k] > 0))
        del z
    if train_backbone:
        outs, grads = [], []
        if final is not None and final_leaf.grad is not None:
            outs.append(final)
            grads.append(final_leaf.grad)
        for s, leaf in zip(states, leaves):
            if leaf.grad is not None:
                outs.append(s)
                grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)
    return [float(x) for x in losses]


def _eagle_losses(model: MTPModel, states, input_ids, weights, grad_scale, chunk_tokens, loss_mask,
                  teacher: torch.Tensor | None = None) -> list:
    """eagle3's training-time test: the unrolled draft steps' outputs (B, T, H) stay alive (the steps feed
    each other); each step's loss over the draft vocabulary is computed and differentiated a chunk at a time
    into a detached copy, then one backward carries every step's gradient through the unroll. ``teacher``: the
    target's final normed states (B, T, H); draft step k at position t then learns the target's distribution at
    position t + k (over the draft vocabulary) instead of the token x_{t+1+k}."""
    head = model.eagle
    outs = head.unroll(model.embed, states, input_ids, model.n_heads)
    losses, roots, grads = [], [], []
    teacher_flat = teacher.reshape(-1, teacher.shape[-1]) if teacher is not None else None
    with torch.no_grad():  # the teacher is a constant
        unembed_rows = head.teacher_rows(model.backbone) if teacher is not None else None
    for k, a in enumerate(outs, 1):
        targets = head.to_draft(head_targets(input_ids, k, loss_mask))  # outside the draft vocabulary: ignored
        soft = None
        if teacher is not None:  # flat row b*T + t drafts the token the target predicts at b*T + t + k
            @torch.no_grad()
            def soft(rows, k=k):
                z = head.teacher_logits(model.backbone, teacher_flat[rows + k], unembed_rows)
                return torch.softmax(z.float(), -1)
        leaf = a.detach().requires_grad_(weights[k] > 0 and torch.is_grad_enabled())
        losses.append(chunked_head_loss(head.draft_logits, leaf, targets, weights[k] * grad_scale, chunk_tokens,
                                        backward=leaf.requires_grad, soft=soft))
        if leaf.grad is not None:
            roots.append(a)
            grads.append(leaf.grad)
    if roots:
        torch.autograd.backward(roots, grads)
    return losses


def naive_step(model: MTPModel, input_ids: torch.Tensor, weights: list[float],
               loss_mask: torch.Tensor | None = None) -> list[float]:
    """Reference order: all heads' logits (K, B, T, V) alive at once, one backward. For tests and benchmarks."""
    logits = model(input_ids)  # (K, B, T, V)
    total, losses = 0.0, []
    for k in range(logits.shape[0]):
        targets = head_targets(input_ids, k, loss_mask)
        if k and model.autoregressive:  # eagle3 scores only targets in its draft vocabulary
            targets = torch.where(model.eagle.to_draft(targets) >= 0, targets, -100)
        loss = cross_entropy_sum(logits[k], targets) / (targets != -100).sum().clamp_min(1)
        total = total + weights[k] * loss
        losses.append(float(loss.detach()))
    total.backward()
    return losses


EAGLE_MIN_DRAFT_VOCAB = 16384  # tokens unseen in training keep the target's own unembedding rows: cheap coverage

# Settings a resumed run must share with its checkpoint (max_steps may grow; logging may change).
RESUME_MUST_MATCH = ("model", "heads", "kind", "eagle_layers", "draft_vocab", "draft_init", "draft_loss", "tap",
                     "mlp_layers",
                     "init_from_last", "mode", "lora_r",
                     "lora_alpha", "lora_targets", "data", "seq_len", "batch_size", "grad_accum", "lr",
                     "backbone_lr", "whs_lr", "warmup_steps", "min_lr_ratio", "weight_decay", "head_weights",
                     "ntp_weight", "seed", "dtype")


SETTINGS_BEFORE = {"draft_init": "random", "draft_loss": "hard"}
"""What eagle3 runs did before these settings existed: their checkpoints resume as such."""


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    if not dist.is_initialized():
        import atexit

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # leave the group while the interpreter is whole: a gloo group torn down during interpreter
        # finalization aborts the process now and then ("terminate called without an active exception")
        atexit.register(_leave_group)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_backbone(model: MTPModel) -> None:
    """FSDP (joint training under torchrun): shard every decoder layer's parameters across processes.

    Embeddings, final norm and unembedding stay replicated: the heads call them outside the trunk's
    forward, one chunk at a time, and they are a small share of the weights."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.backbone.get_decoder().layers:
        fully_shard(layer)


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Data parallelism: all-reduce the summed gradients into their mean over processes, in one flat buffer.
    Sharded (FSDP) gradients arrive averaged already, by FSDP's reduce-scatter."""
    grads = [p.grad for p in params if p.grad is not None and not _is_sharded(p.grad)]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class BatchOrder:
    """Which sequences form micro-batch m of step s: seeded permutations epoch after epoch, so a resumed run
    sees exactly the batches an uninterrupted one would. Each process takes its slice of the global batch."""

    def __init__(self, n: int, cfg: TrainConfig, ddp: Distributed):
        if cfg.batch_size % ddp.world:
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {ddp.world} processes")
        self.n, self.cfg, self.ddp, self._perms = n, cfg, ddp, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919
                                                                                                  + epoch))}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        b = self.cfg.batch_size
        per_rank = b // self.ddp.world
        start = (step * self.cfg.grad_accum + micro) * b + self.ddp.rank * per_rank
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + per_rank)]


class HiddenCache:
    """The frozen backbone's tapped hidden state for every training sequence, in a memmap on disk."""

    def __init__(self, path: Path, model: MTPModel, blocks: torch.Tensor, batch: int, progress: bool,
                 with_final: bool = False):
        dtype = model.backbone.get_output_embeddings().weight.dtype
        # eagle3 taps three layers: stored side by side; ``with_final``: the final normed state after them
        self.torch_dtype, self.parts = dtype, len(model.tapped) + with_final
        hidden = model.backbone.config.hidden_size * self.parts
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16,
                    torch.float64: np.float64}[dtype]  # bf16 kept as its 16 raw bits
        shape = (blocks.shape[0], blocks.shape[1], hidden)
        meta_path = path.with_suffix(".json")
        key = {"shape": list(shape), "dtype": str(dtype), "tap": model.tapped + (["final"] if with_final else []),
               "tokens": int(blocks.sum())}
        for p in (path, meta_path):  # the cache is ours and is rebuilt at will, but not over what is not a file
            if (p.exists() or p.is_symlink()) and not p.is_file():
                raise UserError(f"{p} is in the way of the hidden-state cache (it is not a file): remove it, and "
                                "mtp rebuilds the cache")
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        fresh = not (path.is_file() and path.stat().st_size == nbytes and _read_cache_key(meta_path) == key)
        if fresh:  # the states are written in place: the key, written last, says when they are complete
            meta_path.unlink(missing_ok=True)
            path.unlink(missing_ok=True)  # a cut or overlong file of another run is started afresh
        self.array = np.memmap(path, dtype=np_dtype, mode="w+" if fresh else "r", shape=shape)
        if fresh:
            with torch.inference_mode():
                for a in tqdm(range(0, shape[0], batch), desc="caching hidden states", disable=not progress,
                              file=sys.stderr):
                    final, states = model.trunk(blocks[a:a + batch].to(model.backbone.device), final=with_final)
                    self.array[a:a + batch] = self._to_numpy(torch.cat(states + ([final] if with_final else []), -1))
            self.array.flush()
            write_json(meta_path, key, indent=None)
            self.array = np.memmap(path, dtype=np_dtype, mode="r", shape=shape)

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy())

    def get(self, idx: list[int], device) -> list[torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(self.array[idx]))
        if self.torch_dtype == torch.bfloat16:
            x = x.view(torch.int16).view(torch.bfloat16)
        return list(x.to(device).chunk(self.parts, -1))


def _read_cache_key(path: Path):
    """What a hidden-state cache's .json says it holds; None where it is missing or unreadable (then the cache
    is rebuilt)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON, an overlong integer
        return None


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Clip the global gradient norm; with FSDP-sharded gradients the norm sums shards over processes."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_sharded(g) for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    sharded = sum((g.to_local().float().pow(2).sum() for g in grads if _is_sharded(g)), torch.zeros(()))
    dist.all_reduce(sharded)
    replicated = sum((g.float().pow(2).sum() for g in grads if not _is_sharded(g)), torch.zeros(()))
    coef = max_norm / (float(sharded + replicated) ** 0.5 + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)


def autocast_enabled(setting: str, device: torch.device) -> bool:
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_fast_bf16()


def _cpu_has_fast_bf16() -> bool:
    return cpu_has("amx_bf16", "avx512_bf16")


def build_model(cfg: TrainConfig, device: str, command: str = "", auto_layers: list[int] | None = None,
                backbone_and_tokenizer=None):
    """Backbone (+ LoRA adapters) + fresh heads, with requires_grad set for the mode. ``auto_layers``: what
    ``--eagle-layers auto`` resolved to."""

    backbone, tokenizer = backbone_and_tokenizer or load_backbone(cfg.model, dtype=cfg.dtype, device=device)
    lora = {}
    if cfg.mode == "lora":
        names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
        targets = [t for t in cfg.lora_targets if t in names]
        if not targets:
            raise UserError(f"none of the LoRA targets {cfg.lora_targets} exist in {cfg.model}")
        lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "target_modules": targets}
        backbone = add_lora(backbone, lora)  # freezes everything but the adapters
    else:
        backbone.requires_grad_(cfg.mode == "joint")
    eagle_layers = []
    if cfg.kind == "eagle3":
        eagle_layers = parse_layers(cfg.eagle_layers, backbone.config.num_hidden_layers)
        if eagle_layers == "auto":
            eagle_layers = auto_layers or parse_layers("default", backbone.config.num_hidden_layers)
    heads_cfg = HeadsConfig(backbone=cfg.model, n_heads=cfg.heads, kind=cfg.kind, tap=cfg.tap,
                            eagle_layers=list(eagle_layers),
                            mlp_layers=cfg.mlp_layers, init_from_last=cfg.init_from_last, dtype=cfg.dtype,
                            trained_backbone={"frozen": "none", "joint": "full", "lora": "lora"}[cfg.mode],
                            lora=lora, recipe={"command": command, **cfg.to_dict()})
    low = backbone.get_output_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
    # trainable heads keep float32 master weights on a bf16 / fp16 backbone: bf16 weights lose updates below 2^-8
    model = MTPModel(backbone, heads_cfg, head_dtype=torch.float32 if low else None)
    if cfg.kind == "eagle3" and cfg.draft_init != "random":
        model.eagle.init_from_target(backbone, int(cfg.draft_init[7:]) if ":" in cfg.draft_init else None)
    return model, tokenizer


def train(cfg: TrainConfig, progress: bool = True, command: str = "") -> dict:
    """Train heads per ``cfg``; returns a summary. Writes cfg.out/{checkpoint/, heads/, metrics.jsonl}.

    Setup (each a function below: the run folder and what a resume reads, the data, the model, the optimizer),
    then the loop: per step the learning rate, ``grad_accum`` micro-batches, gradients averaged and clipped, the
    optimizer step, the log, the held-out evaluation, the checkpoint."""

    ddp, device = init_distributed(cfg.device)
    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    meta = open_run(cfg, out, ckpt, ddp, progress)
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_backbone(cfg.model, dtype=cfg.dtype, device=device)
    blocks, masks, counts = training_data(cfg, tokenizer, backbone.get_output_embeddings().weight.shape[0])
    layers = eagle_layers(cfg, backbone, blocks, ckpt if meta is not None else None, progress and ddp.main)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg, device, command, auto_layers=layers, backbone_and_tokenizer=(backbone, tokenizer))
    model.token_counts = counts
    if model.autoregressive:
        set_draft_vocab(cfg, model, counts)
    order = BatchOrder(len(blocks), cfg, ddp)
    if meta is not None:
        load_weights(ckpt, model)
    sharded = ddp.world > 1 and cfg.mode == "joint"
    if sharded:
        shard_backbone(model)
    optimizer, trainable = make_optimizer(cfg, model)
    step = 0
    if meta is not None:
        load_optimizer(ckpt, meta, model, optimizer)
        step = int(meta["step"])
    soft = cfg.kind == "eagle3" and cfg.draft_loss == "soft"
    cache = None
    if cfg.cache_hidden:
        out.mkdir(parents=True, exist_ok=True)
        cache = HiddenCache(out / f"hidden-rank{ddp.rank}.bin", model, blocks, cfg.batch_size, progress and ddp.main,
                            with_final=soft)
    weights = head_weights(cfg.heads, cfg.ntp_weight, cfg.head_weights)
    dev = torch.device(device)
    heldout = HeldOut(cfg, model, tokenizer) if cfg.eval_data and ddp.main else None
    use_autocast = autocast_enabled(cfg.autocast, dev)
    log_path = out / "metrics.jsonl"
    if ddp.main:
        start_log(out, ckpt, log_path, step, new_run=meta is None)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not (progress and ddp.main),
               file=sys.stderr)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    t_last, losses = time.perf_counter(), []
    while step < cfg.max_steps:
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        step_losses = torch.zeros(cfg.heads + 1, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            idx = order.indices(step, micro)
            hidden = cache.get(idx, dev) if cache is not None else None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                ls = mtp_step(model, blocks[idx].to(dev), weights, train_backbone=cfg.mode != "frozen",
                              chunk_tokens=cfg.loss_chunk_tokens, grad_scale=1.0 / cfg.grad_accum, hidden=hidden,
                              soft=soft, loss_mask=masks[idx].to(dev) if masks is not None else None)
            step_losses += torch.tensor(ls, dtype=torch.float64) / cfg.grad_accum
        average_gradients(trainable, ddp.world)
        if cfg.clip > 0:
            clip_gradients(trainable, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ddp.world > 1:
            dist.all_reduce(step_losses)
            step_losses /= ddp.world
        losses.append(step_losses)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            record = log_record(cfg, step, losses, weights, factor, tokens_per_step, now - t_last)
            bar.set_postfix({f"l{k}": f"{x:.3f}" for k, x in enumerate(record["losses"]) if x is not None}
                            | {"tok/s": f"{record['tokens_per_s']:.0f}"})
            if ddp.main:  # a log: appended line by line (not atomic); a resume drops lines past its checkpoint
                append_line(log_path, json.dumps(record, allow_nan=False))
            t_last, losses = now, []
        if heldout is not None and heldout.due(step):
            scores = heldout.scores(model)
            append_line(log_path, json.dumps({"step": step, "tokens": step * tokens_per_step, "eval": scores},
                                             allow_nan=False))
            if progress:
                bar.write(f"step {step}: held-out top-1 {scores['top1']}, chain tau {scores['tau']:.3f}",
                          file=sys.stderr)
            t_last = time.perf_counter()  # the evaluation is not training time
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            backbone_state, optim_state = gather_states(model, optimizer, sharded)  # collective under FSDP
            if ddp.main:
                write_checkpoint(ckpt, model, backbone_state, optim_state, step, cfg.to_dict())
    bar.close()
    if meta is not None and int(meta["step"]) == cfg.max_steps:  # killed after the last checkpoint: finish the run
        backbone_state, _ = gather_states(model, optimizer, sharded)
    if ddp.main:
        model.save_pretrained(out / "heads", backbone_state=backbone_state,
                              dtype=DTYPES[cfg.save_dtype] if cfg.save_dtype else None)
    if ddp.world > 1:
        dist.barrier()
    if not ddp.main:  # one result per run, rank 0's: the other ranks print nothing
        return {"out": str(out), "steps": step}
    return {"out": str(out), "steps": step, "heads": str(out / "heads")}


# ----------------------------------------------------------------------------- train's setup, step by step


def open_run(cfg: TrainConfig, out: Path, ckpt: Path, ddp, progress: bool) -> dict | None:
    """The run folder checked (and what a killed save left recovered, behind a barrier); with ``--resume`` the
    checkpoint's metadata, its settings checked against ``cfg`` (None: a new run, or nothing saved yet)."""
    check_run_folder(out, cfg.resume, cfg.overwrite, main=ddp.main)
    if ddp.world > 1:
        dist.barrier()  # rank 0 has recovered what a killed save left
    fresh = not (ckpt / "trainer.json").exists()  # --resume of a run killed before its first checkpoint: from step 0
    if cfg.resume and fresh and ddp.main and progress:
        print(f"mtp: --resume: {out} holds no complete checkpoint yet: training from step 0", file=sys.stderr)
    if not cfg.resume or fresh:
        return None
    # whs_lr only matters with a WHS tap (and checkpoints from before it existed do not record it)
    # eagle_layers / draft_vocab only for eagle3 heads (older checkpoints do not record them either)
    must_match = tuple(k for k in RESUME_MUST_MATCH if (k != "whs_lr" or cfg.tap == "whs") and
                       (k not in ("eagle_layers", "draft_vocab", "draft_init", "draft_loss") or
                        cfg.kind == "eagle3"))
    meta = read_checkpoint(ckpt, cfg.to_dict(), must_match, before=SETTINGS_BEFORE)
    if meta["step"] > cfg.max_steps:
        raise UserError(f"the checkpoint is at step {meta['step']}, already beyond --max-steps {cfg.max_steps}")
    return meta


def training_data(cfg: TrainConfig, tokenizer, vocab: int):
    """(blocks (N, seq_len), loss masks or None, how often each token is a target (V,)): as many tokens as
    ``--max-tokens`` or the run needs."""
    need = cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
    blocks, masks = packed_blocks(cfg.data, tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens or need, seed=cfg.seed)
    masks = None if masks.all() else masks  # only distilled data restricts the targets
    return blocks, masks, target_counts(blocks, masks, vocab)


def eagle_layers(cfg: TrainConfig, backbone, blocks, resumed: Path | None, announce: bool) -> list[int] | None:
    """``--eagle-layers auto``: measured on the training text, or what the resumed checkpoint started with."""
    if cfg.kind != "eagle3" or cfg.eagle_layers != "auto":
        return None
    if resumed is not None:  # a resumed run keeps the layers it started with
        return read_heads_config(resumed / "heads")["eagle_layers"]
    layers, lens_kl = auto_layers(backbone, blocks)
    if announce:
        print(f"mtp: --eagle-layers auto -> {layers} (logit-lens KL per layer {[round(x, 2) for x in lens_kl]})",
              file=sys.stderr)
    return layers


def set_draft_vocab(cfg: TrainConfig, model: MTPModel, counts: torch.Tensor) -> None:
    """eagle3: the draft vocabulary, the most frequent targets (FR-Spec), lm_head rows from the target."""
    vocab = counts.numel()
    size = cfg.draft_vocab or -(-max(int((counts > 0).sum()), EAGLE_MIN_DRAFT_VOCAB) // 64) * 64
    model.set_draft_vocab(top_tokens(counts, min(size, vocab)))


def make_optimizer(cfg: TrainConfig, model: MTPModel):
    """AdamW over the heads (their WHS weightings a group of their own, without decay) and the trainable backbone
    (sharded and plain tensors apart); returns it and every trainable tensor."""
    head_params = model.head_parameters()
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    trainable = head_params + backbone_params  # WHS weightings included (a group of their own below)
    whs_params = [h.whs for h in model.heads if getattr(h, "whs", None) is not None]
    head_params = [p for p in head_params if all(p is not w for w in whs_params)]
    groups = [{"params": head_params, "lr": cfg.lr, "base_lr": cfg.lr}] if head_params else []
    if whs_params:  # no weight decay: it would pull the weighting towards uniform
        groups.append({"params": whs_params, "lr": cfg.whs_lr, "base_lr": cfg.whs_lr, "weight_decay": 0.0})
    for part in (True, False):  # sharded and plain tensors in separate groups: foreach kernels need one kind
        params = [p for p in backbone_params if _is_sharded(p) == part]
        if params:
            groups.append({"params": params, "lr": cfg.backbone_lr, "base_lr": cfg.backbone_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay), trainable


def start_log(out: Path, ckpt: Path, log_path: Path, step: int, new_run: bool) -> None:
    """The run folder made; a new run (--overwrite, or --resume before any checkpoint) drops the old run's state;
    the log keeps the lines up to ``step``."""
    out.mkdir(parents=True, exist_ok=True)
    if new_run:
        shutil.rmtree(ckpt, ignore_errors=True)
    _truncate_log(log_path, step)


def log_record(cfg: TrainConfig, step: int, losses: list, weights: list[float], factor: float,
               tokens_per_step: int, seconds: float) -> dict:
    """The metrics line of the steps since the last one (mean losses per head); a non-finite loss is a
    divergence: stopped in one line that says which checkpoint is intact."""
    mean = torch.stack(losses).mean(0)
    known = [(w, float(x)) for w, x in zip(weights, mean) if math.isfinite(x)]  # head 0: not computed
    if not all(math.isfinite(x) for x in mean.tolist()[1 if cfg.mode == "frozen" else 0:]):
        last = f"the checkpoint of step {step - step % cfg.save_every} is intact" \
            if step >= cfg.save_every else "no checkpoint was written"
        raise UserError(f"training diverged at step {step} (losses {[round(x, 4) for x in mean.tolist()]}); "
                        f"{last}: lower --lr or --backbone-lr, or check the data")
    return {"step": step, "loss": sum(w * x for w, x in known),  # from cached states
            "losses": [round(float(x), 5) if math.isfinite(x) else None for x in mean], "lr": cfg.lr * factor,
            "tokens": step * tokens_per_step, "tokens_per_s": len(losses) * tokens_per_step / seconds}


class HeldOut:
    """``--eval-data``: held-out blocks scored every ``--eval-every`` steps, at powers of two from 16 (a learning
    curve on a log scale) and at the last step. The backbone's states of the blocks are computed once."""

    def __init__(self, cfg: TrainConfig, model: MTPModel, tokenizer):
        self.cfg = cfg
        blocks, masks = packed_blocks(cfg.eval_data, tokenizer, cfg.seq_len, max_tokens=cfg.eval_blocks * cfg.seq_len,
                                      seed=cfg.seed)
        self.blocks, self.masks = blocks[:cfg.eval_blocks], None if masks.all() else masks[:cfg.eval_blocks]
        dev = model.backbone.device
        parts = []
        with torch.inference_mode():
            for a in range(0, len(self.blocks), 8):
                parts.append(model.trunk(self.blocks[a:a + 8].to(dev), final=False)[1])
        self.states = [torch.cat(p) for p in zip(*parts)]

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.max_steps or \
            (step >= 16 and step & (step - 1) == 0)

    def scores(self, model: MTPModel) -> dict:
        return heldout_scores(model, self.blocks, self.masks, self.states, chunk_tokens=self.cfg.loss_chunk_tokens)


RUN_ENTRIES = ("checkpoint", "heads", "metrics.jsonl")
"""What a training run writes into --out."""


def check_run_folder(out: Path, resume: bool, overwrite: bool, main: bool = True,
                     entries: tuple[str, ...] = RUN_ENTRIES) -> None:
    """Before any work: ``out`` may take this run. On the main process, first finish or undo what a killed
    checkpoint or heads save left (``mtp.io.recover_dir``). Refused: a file, a folder inside the installed
    package, a folder that holds another run's ``entries`` (unless ``resume`` continues it or ``overwrite``
    replaces it), and ``resume`` where there is no run. (An --out that is one of the run's inputs was refused
    when its config was made: ``mtp.config.check_outputs_apart``.)"""
    check_new_output(out, "--out", overwrite=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if main:
        for name in ("checkpoint", "heads"):
            recover_dir(out / name)
    held = [name for name in entries if (out / name).exists()]
    if resume and not out.is_dir():
        raise UserError(f"--resume: there is no run in {out} (no such folder)")
    if not resume and held and not overwrite:
        how = "pass --resume to continue it, " if (out / "checkpoint").exists() else ""
        raise UserError(f"--out {out} already holds a run ({', '.join(held)}): {how}choose another --out, or pass "
                        "--overwrite to replace it")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (the checkpoint's; 0 for a new run): later ones will be logged
    again, and a line a kill cut off is dropped."""
    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    complete_lines(path, keep)


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def train_command(cfg: TrainConfig, command: str = "") -> dict:
    model_config = backbone_config(cfg.model)  # before the data and the weights
    check_context(cfg.seq_len, "--seq-len", model_config)
    parse_tap(cfg.tap, model_config.num_hidden_layers)  # --tap layer:I within the model's layers
    summary = train(cfg, progress=not cfg.quiet, command=command)
    return {**summary, "log": f"{cfg.out}/metrics.jsonl"} if summary.get("heads") else None  # None: not rank 0


def show_train(summary: dict) -> str:
    return f"heads: {summary['heads']}  (log: {summary['log']}, {summary['steps']} steps)"
