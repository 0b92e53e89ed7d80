"""The heads folder: what ``mtp train`` writes as RUN/heads (and each checkpoint as checkpoint/heads),
``mtp convert`` as OUT/heads, and what ``default_heads/*`` ship. This module is its one writer and one reader.

    config.json        {"mtp_format": 1, the HeadsConfig fields (backbone, kind, n_heads, tap, ..., recipe),
                        "backbone_fingerprint", "backbone_config"}
    model.safetensors  heads.*        the heads (with their WHS weights)
                       token_counts   (V,) int64, how often each token was a training target: decoding and
                                      export pick the draft vocabulary from it (absent in older folders)
                       backbone.*     the full backbone, only when it was trained (``trained_backbone`` full)
                       lora.*         LoRA adapters, only when they were trained (``trained_backbone`` lora)
    accuracy.json      optional: {"rank_accuracy": per head, per rank, how often it is right, "data",
                       "positions", "command"}; written by ``mtp eval --write-accuracy`` and ``mtp pretrain``,
                       read by decoding to size its drafts and trees

Weights are only ever loaded with safetensors (nothing is unpickled). Writes go through :mod:`mtp.io`:
a new folder replaces an old one only once it is complete; accuracy.json is replaced atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.errors import UserError
from mtp.io import atomic_dir, write_json, write_safetensors

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ACCURACY = "accuracy.json"
TOKEN_COUNTS = "token_counts"
"""The key of the token counts in WEIGHTS."""
_HEADS, _BACKBONE, _LORA = "heads.", "backbone.", "lora."

DEFAULT_HEADS_DIR = Path(__file__).resolve().parent / "default_heads"
SHIPPED = {"default": "", "eagle3": "-eagle3"}
"""Head sets shipped for a built-in model: spec -> suffix of its folder in DEFAULT_HEADS_DIR."""


@dataclass
class HeadsWeights:
    """What model.safetensors holds, by part (state dicts without their prefixes)."""

    heads: dict[str, torch.Tensor]
    token_counts: torch.Tensor | None = None
    backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- writing


def write_heads_folder(folder: str | Path, config: dict, weights: HeadsWeights, dtype: torch.dtype | None = None,
                       accuracy: dict | None = None) -> Path:
    """Write config.json (``config``: the HeadsConfig fields, fingerprint, backbone config) + model.safetensors
    (floating tensors cast to ``dtype`` if given) [+ accuracy.json] atomically: a complete new folder replaces
    the old one."""
    state = {f"{_HEADS}{k}": v for k, v in weights.heads.items()}
    if weights.token_counts is not None:
        state[TOKEN_COUNTS] = weights.token_counts.cpu()
    state.update({f"{_BACKBONE}{k}": v for k, v in weights.backbone.items()})
    state.update({f"{_LORA}{k}": v for k, v in weights.lora.items()})
    # safetensors refuses shared storage (tied embeddings): store contiguous copies
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(folder)
    with atomic_dir(out, replace=True) as tmp:
        write_safetensors(tmp / WEIGHTS, state, metadata={"format": "pt"})  # heads are for sharing
        write_json(tmp / CONFIG, {"mtp_format": FORMAT_VERSION, **config})
        if accuracy is not None:
            write_json(tmp / ACCURACY, accuracy)
    return out


def accuracy_record(rank_accuracy: list[list[float]], data: str, positions: int, command: str) -> dict:
    """The contents of accuracy.json (read by :func:`read_accuracy`): per head, per rank, how often it is
    right, and where that was measured."""
    return {"rank_accuracy": rank_accuracy, "data": data, "positions": positions, "command": command}


def write_accuracy(folder: str | Path, rank_accuracy: list[list[float]], data: str, positions: int,
                   command: str) -> Path:
    """Store measured per-rank accuracies as accuracy.json beside the heads (replaced atomically)."""
    path = Path(folder) / ACCURACY
    write_json(path, accuracy_record(rank_accuracy, data, positions, command))
    return path


# ----------------------------------------------------------------------------- reading


def resolve_heads(spec: str, model_name: str) -> Path:
    """A heads folder, or a head set shipped in the package for a built-in model: ``default`` (the best for
    mtp's own engine) or ``eagle3`` (the EAGLE-3 heads that export to vLLM, SGLang and llama.cpp)."""
    if spec in SHIPPED:
        from mtp.backbones import BUILTIN_MODELS

        folder = DEFAULT_HEADS_DIR / f"{model_name}{SHIPPED[spec]}" if model_name in BUILTIN_MODELS else None
        if folder is None or not (folder / CONFIG).is_file():
            raise UserError(f"no {spec} heads ship for {model_name!r}: train some with `mtp train --model "
                            f"{model_name}` and pass --heads RUN/heads")
        return folder
    folder = Path(spec).expanduser()
    read_heads_config(folder)
    return folder


def read_heads_config(folder: str | Path) -> dict:
    """config.json of a complete heads folder (both files there, format checked); a UserError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a heads folder (give the folder that holds config.json)")
    if not folder.is_dir():
        raise UserError(f"heads folder {folder} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is not an mtp heads checkpoint (no {name})")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/{CONFIG} is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("mtp_format") != FORMAT_VERSION:
        raise UserError(f"{folder}/{CONFIG} is not an mtp heads config (format {FORMAT_VERSION})")
    return meta


def load_heads_weights(folder: str | Path, device: str | torch.device = "cpu") -> HeadsWeights:
    """model.safetensors, split by part; a truncated or corrupt file is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        state = load_file(folder / WEIGHTS, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder}/{WEIGHTS} is truncated or corrupt ({e}): retrain or restore it") from None

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return HeadsWeights(heads=part(_HEADS), token_counts=state.get(TOKEN_COUNTS), backbone=part(_BACKBONE),
                        lora=part(_LORA))


def read_accuracy(folder: str | Path | None) -> list[list[float]] | None:
    """Per head, per rank, how often it is right, from accuracy.json; None where there is none or it is
    unreadable (decoding then falls back to a prior)."""
    if folder is None or not (Path(folder) / ACCURACY).is_file():
        return None
    try:
        acc = json.loads((Path(folder) / ACCURACY).read_text())["rank_accuracy"]
        if len(acc) >= 1 and all(isinstance(r, list) and r for r in acc):
            return [[float(x) for x in r] for r in acc]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None
