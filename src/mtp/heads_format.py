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

Every file is untrusted: config.json is parsed into typed, range-checked HeadsConfig fields, the number of heads
is checked against the weights' key names (read without loading a tensor) before anything is built, weights
holding NaN or infinities and malformed token counts are refused, and a present accuracy.json must hold
probabilities; each problem is one UserError line naming the file and the field.
Weights are only ever loaded with safetensors (nothing is unpickled). Writes go through :mod:`mtp.io`:
a new folder replaces an old one only once it is complete; accuracy.json is replaced atomically.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.backbones import BUILTIN_MODELS
from mtp.config import check_type, DTYPE_NAMES, HEAD_KIND_NAMES, short_repr
from mtp.errors import UserError
from mtp.io import atomic_dir, check_readable, read_json, write_json, write_safetensors

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


MAX_HEADS = 64
"""More heads than anyone trains (Meta: 4 to 8, Medusa: 5, EAGLE-3: a handful of draft steps): a bound that
keeps a corrupt config from building a model that does not fit in memory."""


@dataclass
class HeadsConfig:
    """What a head set is; stored as config.json beside the weights."""

    backbone: str
    """The backbone it was trained on: built-in name, HF folder or .gguf file."""
    n_heads: int = 4
    """Heads beyond the backbone's own: head k predicts x_{t+1+k}, k = 1 .. n_heads."""
    kind: str = "mlp"
    tap: str = "last"
    """last | layer:I | whs."""
    mlp_layers: int = 1
    """Residual blocks per mlp head."""
    init_from_last: bool = True
    """transformer heads start as copies of the backbone's last layer."""
    dtype: str = "float32"
    trained_backbone: str = "none"
    """none (frozen) | full | lora: which backbone weights are stored with the heads."""
    lora: dict = field(default_factory=dict)
    eagle_layers: list[int] = field(default_factory=list)
    """eagle3: the three target layers whose inputs the head fuses (0 = embeddings); empty = (2, L//2, L-3)."""
    draft_vocab: int = 0
    """eagle3: size of the head's draft vocabulary (its lm_head rows; d2t maps them to target ids)."""
    recipe: dict = field(default_factory=dict)
    """How the heads were trained (the command, data, steps, ...)."""

    def __post_init__(self):
        if self.kind not in HEAD_KIND_NAMES:
            raise UserError(f"unknown head kind {self.kind!r}: use one of {', '.join(HEAD_KIND_NAMES)}")
        if not 0 <= self.n_heads <= MAX_HEADS:  # 0: a next-token-only model (NTP pretraining, a converted n = 1)
            raise UserError(f"the number of heads must be >= 0 and at most {MAX_HEADS}, got {self.n_heads}")
        if self.mlp_layers < 1:
            raise UserError(f"--mlp-layers must be at least 1, got {self.mlp_layers}")
        if self.trained_backbone not in ("none", "full", "lora"):
            raise UserError(f"trained_backbone must be none, full or lora, got {self.trained_backbone!r}")
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if not self.backbone:
            raise UserError("backbone must name the backbone the heads were trained on, got ''")
        if self.draft_vocab < 0 or any(x < 0 for x in self.eagle_layers):
            raise UserError(f"draft_vocab and eagle_layers must be >= 0, got {self.draft_vocab} and "
                            f"{self.eagle_layers}")
        if self.kind == "eagle3" and self.trained_backbone != "none":
            raise UserError("eagle3 heads draft for an unchanged target: train them with --mode frozen")



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
        folder = DEFAULT_HEADS_DIR / f"{model_name}{SHIPPED[spec]}" if model_name in BUILTIN_MODELS else None
        if folder is None or not (folder / CONFIG).is_file():
            raise UserError(f"no {spec} heads ship for {model_name!r}: train some with `mtp train --model "
                            f"{model_name}` and pass --heads RUN/heads")
        return folder
    folder = Path(spec).expanduser()
    read_heads_config(folder)
    return folder


def read_heads_config(folder: str | Path) -> dict:
    """config.json of a complete heads folder (both files there, format and every HeadsConfig field checked);
    a UserError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a heads folder (give the folder that holds config.json)")
    if not folder.is_dir():
        if any(folder.parent.glob(f".{folder.name}.old-*")):  # a heads save killed between its two renames
            raise UserError(f"heads folder {folder} does not exist: a save into it was interrupted; "
                            f"`mtp train --resume --out {folder.parent}` (or pretrain) finishes it")
        raise UserError(f"heads folder {folder} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is not an mtp heads checkpoint (no {name})")
    meta = read_json(folder / CONFIG, "heads config", fix="retrain the heads or restore the folder")
    if not isinstance(meta, dict) or meta.get("mtp_format") != FORMAT_VERSION:
        raise UserError(f"{folder}/{CONFIG} is not an mtp heads config (format {FORMAT_VERSION})")
    parse_heads_config(meta, folder)
    return meta


_FIX = "fix it or retrain the heads"


def parse_heads_config(meta: dict, folder: str | Path):
    """The HeadsConfig that config.json describes: each field checked against its annotation, then the
    HeadsConfig's own range checks, and the backbone's sizes and fingerprint; one line naming the field."""
    where = f"{folder}/{CONFIG}"
    if "backbone" not in meta:
        raise UserError(f"{where}: backbone is missing: {_FIX}")
    hints = typing.get_type_hints(HeadsConfig)
    fields = {k: check_type(f"{where}: {k}", hints[k], meta[k], _FIX) for k in hints if k in meta}
    fingerprint, sizes = meta.get("backbone_fingerprint", {}), meta.get("backbone_config", {})
    check_type(f"{where}: backbone_config", dict, sizes, _FIX)
    check_type(f"{where}: backbone_fingerprint", dict, fingerprint, _FIX)
    for key, hint in (("shape", list[int]), ("sample", list[float])):
        if key in fingerprint:
            check_type(f"{where}: backbone_fingerprint.{key}", hint, fingerprint[key], _FIX)
    try:
        return HeadsConfig(**fields)
    except UserError as e:  # its own range checks, phrased for the command line: add the file and the fix
        raise UserError(f"{where}: {e}{'' if ': ' in str(e) else ': ' + _FIX}") from None


def check_head_count(folder: str | Path, expected: int, n_heads: int) -> None:
    """The weights hold ``expected`` heads (config.json's ``n_heads``, or 1 for one autoregressive drafter):
    checked from the key names alone, before a model is built for them."""
    from safetensors import SafetensorError, safe_open

    path = check_readable(Path(folder) / WEIGHTS, "heads weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}): retrain or restore it") from None
    found = len({k[len(_HEADS):].split(".", 1)[0] for k in keys if k.startswith(_HEADS)})
    if found != expected:
        raise UserError(f"{folder}/{CONFIG}: n_heads is {n_heads} but {WEIGHTS} holds {found} head"
                        f"{'s' if found != 1 else ''}: the two files do not belong together; retrain the heads or "
                        "restore the folder")


def load_heads_weights(folder: str | Path, device: str | torch.device = "cpu") -> HeadsWeights:
    """model.safetensors, split by part; an unreadable, truncated or corrupt file, a tensor holding NaN or
    infinities, or malformed token counts is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = check_readable(folder / WEIGHTS, "heads weights file")
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}): retrain or restore it") from None
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: tensor {key} holds NaN or infinite values: the heads are unusable as "
                            "delivered; retrain them or restore a good copy")
    counts = state.get(TOKEN_COUNTS)
    if counts is not None:
        if counts.dtype not in (torch.int64, torch.int32) or counts.dim() != 1:
            raise UserError(f"{path}: {TOKEN_COUNTS} must be a 1-D integer tensor, got {counts.dtype} of shape "
                            f"{tuple(counts.shape)}: the heads are unusable as delivered; retrain them")
        if counts.numel() and int(counts.min()) < 0:
            raise UserError(f"{path}: {TOKEN_COUNTS} must be counts >= 0, got {int(counts.min())}: the heads are "
                            "unusable as delivered; retrain them")

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return HeadsWeights(heads=part(_HEADS), token_counts=counts, backbone=part(_BACKBONE), lora=part(_LORA))


MAX_RANKS = 1024
"""accuracy.json: at most this many ranks per head (``mtp eval`` measures 8)."""


def read_accuracy(folder: str | Path | None, n_heads: int | None = None) -> list[list[float]] | None:
    """Per head, per rank, how often it is right, from accuracy.json; None where there is none (decoding then
    falls back to a prior). A present file must hold, per head (at most ``n_heads``), a non-empty list of
    probabilities: anything else is a UserError, never silently used or ignored."""
    if folder is None or not (Path(folder) / ACCURACY).exists():
        return None
    path = Path(folder) / ACCURACY
    fix = f"delete it or rerun `mtp eval --heads {folder} --write-accuracy`"
    record = read_json(path, "accuracy file", fix=fix)
    acc = record.get("rank_accuracy") if isinstance(record, dict) else None
    if not isinstance(acc, list) or not acc or not all(isinstance(r, list) and 0 < len(r) <= MAX_RANKS
                                                       for r in acc):
        raise UserError(f"{path}: rank_accuracy must be a list, per head, of 1 to {MAX_RANKS} accuracies, got "
                        f"{short_repr(acc)}: {fix}")
    if n_heads is not None and len(acc) > n_heads:
        raise UserError(f"{path}: rank_accuracy has {len(acc)} heads but the heads folder has {n_heads}: {fix}")
    for d, row in enumerate(acc):
        for r, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and 0 <= x <= 1):
                raise UserError(f"{path}: rank_accuracy[{d}][{r}] must be a probability in [0, 1], got "
                                f"{short_repr(x)}: {fix}")
    return [[float(x) for x in r] for r in acc]

