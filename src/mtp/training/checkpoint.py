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

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from mtp.errors import UserError
from mtp.config import short_repr
from mtp.io import atomic_dir, check_readable, parse_json, write_json, write_safetensors
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


def _fix(directory: Path) -> str:
    return f"delete {directory} to train from step 0, or start again with --overwrite"


def _damaged(path: Path, why: str) -> UserError:
    """One line naming the checkpoint file and what is wrong with it."""
    return UserError(f"{path} is damaged ({why}): {_fix(path.parent)}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _index(text: str, n: int) -> int | None:
    """``text`` as an index below ``n`` (ASCII digits), else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 and int(text) < n else None


def _check_layout(path: Path, layout) -> None:
    """trainer.json's optimizer layout (``_flatten``): keys (parameter names), param_groups (each an object with
    its parameters' names) and scalars (per index, an object of numbers)."""
    if not isinstance(layout, dict):
        raise _damaged(path, f"optimizer must be an object, got {type(layout).__name__}")
    keys, groups, scalars = layout.get("keys"), layout.get("param_groups"), layout.get("scalars")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise _damaged(path, "optimizer.keys must be a list of distinct parameter names")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) and
                                               all(isinstance(n, str) for n in g["params"]) for g in groups):
        raise _damaged(path, "optimizer.param_groups must be a list of objects, each with a list of parameter "
                             "names (params)")
    if not isinstance(scalars, dict) or not all(
            _index(k, len(keys)) is not None and isinstance(v, dict) and all(_is_number(x) for x in v.values())
            for k, v in scalars.items()):
        raise _damaged(path, "optimizer.scalars must map indices of optimizer.keys to objects of numbers")


def read_checkpoint(directory: Path, config: dict, must_match: tuple[str, ...], before: dict | None = None) -> dict:
    """Check a checkpoint is complete, well-formed and made with the same settings; return its metadata (from
    trainer.json: step, an int >= 0; config, an object; optimizer, the layout ``_flatten`` writes). ``before``:
    the value a setting had in effect in checkpoints written before it existed."""
    for name in ("trainer.json", "trainer.safetensors", "heads"):
        if not (directory / name).exists():
            raise UserError(f"{directory} is not a complete mtp training checkpoint (no {name})")
    path = directory / "trainer.json"
    check_readable(path, "checkpoint file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # mtp writes it as ASCII
        raise _damaged(path, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    meta = parse_json(text, str(path), fix=f"the checkpoint is damaged: {_fix(directory)}")  # as read_json would
    if not isinstance(meta, dict):
        raise _damaged(path, f"a JSON object was expected, got {type(meta).__name__}")
    for key in ("step", "config", "optimizer"):
        if key not in meta:
            raise _damaged(path, f"no {key}")
    if not _is_int(meta["step"]) or meta["step"] < 0:
        raise _damaged(path, f"step must be an integer >= 0, got {short_repr(meta['step'])}")
    if not isinstance(meta["config"], dict):
        raise _damaged(path, f"config must be an object, got {type(meta['config']).__name__}")
    _check_layout(path, meta["optimizer"])
    saved = meta["config"]
    for key in must_match:
        if saved.get(key, (before or {}).get(key)) != config.get(key):
            raise UserError(f"checkpoint {directory} was made with {key}={short_repr(saved.get(key))}, this run has "
                            f"{config.get(key)!r}: resume with the same settings or use another --out")
    return meta


def load_weights(directory: Path, model: MTPModel) -> None:
    """Heads, and trained backbone weights or adapters, into an unsharded model (before FSDP wraps it)."""
    loaded = MTPModel.from_pretrained(directory / "heads", backbone=model.backbone)  # backbone loaded in place
    model.heads.load_state_dict(loaded.heads.state_dict())


_ADAMW_STATE = {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param", "max_exp_avg_sq": "param"}
"""The per-parameter state of AdamW (what every run's optimizer is): each field's shape (a scalar or the
parameter's)."""


def _same_kind(saved, fresh) -> bool:
    """A saved param_group setting can replace this optimizer's: a number for a number, a flag for a flag, a
    pair of numbers for a pair (betas)."""
    if isinstance(fresh, bool) or fresh is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(fresh, (int, float)):
        return _is_number(saved)
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(fresh) and all(_is_number(x) for x in saved)
    return type(saved) is type(fresh)


def _check_optimizer_state(path: Path, tensors: dict, layout: dict, model: MTPModel,
                           optimizer: torch.optim.Optimizer) -> None:
    """trainer.safetensors and trainer.json's layout fit this run's model and optimizer: the RNG state, every
    parameter's AdamW state (step, exp_avg, exp_avg_sq) with the parameter's shape, and parameter groups that hold
    this run's optimized parameters, with settings of the right kind; one line naming what does not fit."""
    meta_path = path.with_name("trainer.json")
    rng = tensors.get("rng.torch")
    want = torch.get_rng_state()
    if rng is None:
        raise _damaged(path, "no rng.torch tensor")
    if rng.dtype != want.dtype or rng.shape != want.shape:
        raise _damaged(path, f"rng.torch has shape {tuple(rng.shape)} and dtype {rng.dtype}, expected "
                             f"{tuple(want.shape)} and {want.dtype}")
    names = {id(p): n for n, p in model.named_parameters()}
    fresh_group = {names.get(id(p), "?"): g for g in optimizer.param_groups for p in g["params"]}
    params = {names.get(id(p), "?"): p for g in optimizer.param_groups for p in g["params"]}
    keys = layout["keys"]
    unknown = [k for k in keys if k not in params]
    if unknown:
        raise _damaged(meta_path, f"optimizer.keys names {short_repr(unknown[0])}, not a parameter this run "
                                  "optimizes")
    fields: dict[int, set[str]] = {int(i): set(v) for i, v in layout["scalars"].items()}
    for name, t in tensors.items():
        if name == "rng.torch":
            continue
        part = name.split(".")
        if len(part) != 3 or part[0] != "optim" or _index(part[1], len(keys)) is None or part[2] not in _ADAMW_STATE:
            raise _damaged(path, f"unexpected tensor {short_repr(name)}")
        i, field = int(part[1]), part[2]
        shape = () if _ADAMW_STATE[field] == "scalar" else tuple(params[keys[i]].shape)
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise _damaged(path, f"{name} (the optimizer state of {keys[i]}) has shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype}, expected {shape} and floating point")
        fields.setdefault(i, set()).add(field)
    for i, key in enumerate(keys):
        lacking = [f for f in ("step", "exp_avg", "exp_avg_sq") if f not in fields.get(i, set())]
        if lacking:
            raise _damaged(path, f"no optim.{i}.{lacking[0]} (the optimizer state of {key})")
    # The groups may be cut differently (FSDP puts sharded and plain backbone weights in groups of their own; a
    # resume in one process has one backbone group): the state loads by parameter name, so every parameter of
    # this run's optimizer must be in exactly one saved group, whose settings then replace its group's.
    saved_names = [n for g in layout["param_groups"] for n in g["params"]]
    other = sorted(set(saved_names) ^ set(fresh_group)) or [n for n in saved_names if saved_names.count(n) > 1]
    if other:
        raise _damaged(meta_path, f"optimizer.param_groups do not hold this run's optimized parameters once each "
                                  f"({short_repr(other[0])})")
    for j, saved in enumerate(layout["param_groups"]):
        if not saved["params"]:
            continue
        for setting, value in fresh_group[saved["params"][0]].items():
            if setting != "params" and not _same_kind(saved.get(setting), value):
                raise _damaged(meta_path, f"optimizer.param_groups[{j}].{setting} is "
                                          f"{short_repr(saved.get(setting))}, expected a value like {value!r}")


def load_optimizer(directory: Path, meta: dict, model: MTPModel, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state and RNG, checked against this run's model and optimizer first (``read_checkpoint`` has
    checked trainer.json's form); works on the sharded model too (every process calls it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "trainer.safetensors"
    check_readable(path, "checkpoint file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, str(e).splitlines()[0] if str(e).strip() else type(e).__name__) from None
    _check_optimizer_state(path, tensors, meta["optimizer"], model, optimizer)
    options = StateDictOptions(full_state_dict=dist.is_initialized())
    try:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=_unflatten(tensors, meta["optimizer"]),
                                 options=options)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:  # what the checks above missed
        raise _damaged(path, f"the optimizer state does not load: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}") from None
    torch.set_rng_state(tensors["rng.torch"])
