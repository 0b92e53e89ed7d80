"""Training checkpoints: heads (MTPModel.save_pretrained) + optimizer state and progress, all safetensors/JSON.

    run/checkpoint/heads/{config.json, model.safetensors}
    run/checkpoint/trainer.safetensors   optimizer tensors, RNG state
    run/checkpoint/trainer.json          step, training config, optimizer layout

Written into a temporary folder and renamed into place, so a crash never leaves a half-written
checkpoint and an existing one is only replaced by a complete new one. Nothing is unpickled. The
optimizer state is keyed by parameter name (torch.distributed.checkpoint's full state dict), so the same
checkpoint resumes with one process or several, with or without FSDP sharding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from mtp.errors import UserError
from mtp.io import atomic_dir, write_json, write_safetensors
from mtp.model.mtp import MTPModel

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_states(model: MTPModel, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """Full (unsharded) backbone and optimizer states. Collective under FSDP: every process must call it."""
    backbone = get_model_state_dict(model.backbone, options=_FULL) if sharded else None
    return backbone, get_optimizer_state_dict(model, optimizer, options=_FULL)


def _flatten(optim: dict) -> tuple[dict[str, torch.Tensor], dict]:
    keys, tensors, scalars = list(optim["state"]), {}, {}
    for i, key in enumerate(keys):
        for name, value in optim["state"][key].items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(i), {})[name] = value
    return tensors, {"keys": keys, "param_groups": optim["param_groups"], "scalars": scalars}


def _unflatten(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state = {key: {} for key in layout["keys"]}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, field = name.split(".", 2)
            state[layout["keys"][int(i)]][field] = value
    for i, fields in layout["scalars"].items():
        state[layout["keys"][int(i)]].update(fields)
    return {"state": state, "param_groups": layout["param_groups"]}


def write_checkpoint(directory: Path, model: MTPModel, backbone_state: dict | None, optim_state: dict, step: int,
                     config: dict) -> None:
    """Write the checkpoint atomically (call on the main process only, after ``gather_states``)."""
    with atomic_dir(directory, replace=True) as tmp:
        model.save_pretrained(tmp / "heads", backbone_state=backbone_state)
        tensors, layout = _flatten(optim_state)
        tensors["rng.torch"] = torch.get_rng_state()
        write_safetensors(tmp / "trainer.safetensors", tensors)
        write_json(tmp / "trainer.json", {"step": step, "config": config, "optimizer": layout})


def read_checkpoint(directory: Path, config: dict, must_match: tuple[str, ...]) -> dict:
    """Check a checkpoint is complete and made with the same settings; return its metadata."""
    for name in ("trainer.json", "trainer.safetensors", "heads"):
        if not (directory / name).exists():
            raise UserError(f"{directory} is not a complete mtp training checkpoint (no {name})")
    try:
        meta = json.loads((directory / "trainer.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {directory} is corrupt ({e})") from None
    saved = meta.get("config", {})
    for key in must_match:
        if saved.get(key) != config.get(key):
            raise UserError(f"checkpoint {directory} was made with {key}={saved.get(key)!r}, this run has "
                            f"{config.get(key)!r}: resume with the same settings or use another --out")
    return meta


def load_weights(directory: Path, model: MTPModel) -> None:
    """Heads, and trained backbone weights or adapters, into an unsharded model (before FSDP wraps it)."""
    loaded = MTPModel.from_pretrained(directory / "heads", backbone=model.backbone)  # backbone loaded in place
    model.heads.load_state_dict(loaded.heads.state_dict())


def load_optimizer(directory: Path, meta: dict, model: MTPModel, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state and RNG; works on the sharded model too (every process calls it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(directory / "trainer.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {directory} is corrupt ({str(e).splitlines()[0]})") from None
    options = StateDictOptions(full_state_dict=dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state_dict=_unflatten(tensors, meta["optimizer"]),
                             options=options)
    torch.set_rng_state(tensors["rng.torch"])
