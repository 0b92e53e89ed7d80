"""Training checkpoints: heads (MTPModel.save_pretrained) + optimizer state and progress, all safetensors/JSON.

    run/checkpoint/heads/{config.json, model.safetensors}
    run/checkpoint/trainer.safetensors   optimizer tensors, RNG state
    run/checkpoint/trainer.json          step, training config, optimizer layout

Written into a temporary folder and renamed into place, so a crash never leaves a half-written
checkpoint and an existing one is only replaced by a complete new one. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mtp.errors import UserError
from mtp.model.mtp import MTPModel, _replace_dir


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, st in layout["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": layout["param_groups"]}


def save_checkpoint(directory: Path, model: MTPModel, optimizer: torch.optim.Optimizer, step: int,
                    config: dict) -> None:
    from safetensors.torch import save_file

    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp / "heads")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / "trainer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": config, "optimizer": layout}, indent=1))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(directory: Path, model: MTPModel, optimizer: torch.optim.Optimizer, config: dict,
                    must_match: tuple[str, ...]) -> int:
    """Restore heads (and trained backbone weights), optimizer and RNG; return the step to continue from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in ("trainer.json", "trainer.safetensors", "heads"):
        if not (directory / name).exists():
            raise UserError(f"{directory} is not a complete mtp training checkpoint (no {name})")
    try:
        meta = json.loads((directory / "trainer.json").read_text())
        tensors = load_file(directory / "trainer.safetensors")
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {directory} is corrupt ({str(e).splitlines()[0]})") from None
    saved = meta.get("config", {})
    for key in must_match:
        if saved.get(key) != config.get(key):
            raise UserError(f"checkpoint {directory} was made with {key}={saved.get(key)!r}, this run has "
                            f"{config.get(key)!r}: resume with the same settings or use another --out")
    # Loads trained backbone weights / adapters into model.backbone in place, and fresh heads we copy from.
    loaded = MTPModel.from_pretrained(directory / "heads", backbone=model.backbone)
    model.heads.load_state_dict(loaded.heads.state_dict())
    device = next(model.parameters()).device
    optimizer.load_state_dict(_unflatten_optimizer({k: v.to(device) for k, v in tensors.items()}, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])
