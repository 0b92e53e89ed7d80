"""mtp: multi-token prediction for language models — measure it, train it, decode faster with it.

The public API, imported on first use (``import mtp`` loads no torch)::

    from mtp import AnalyzeConfig, analyze, load_backbone, MTPModel, TrainConfig, train
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "AnalyzeConfig": "mtp.config", "TrainConfig": "mtp.config", "GenerateConfig": "mtp.config",
    "DraftOptions": "mtp.config", "ExportConfig": "mtp.config", "PretrainConfig": "mtp.config",
    "UserError": "mtp.errors",
    "BUILTIN_MODELS": "mtp.backbones", "DEFAULT_MODEL": "mtp.config", "load_backbone": "mtp.backbones",
    "CachedEvaluator": "mtp.analysis.marginal", "NaiveEvaluator": "mtp.analysis.marginal",
    "marginalize": "mtp.analysis.marginal", "analyze": "mtp.analysis.run",
    "load_corpus": "mtp.data", "make_windows": "mtp.data",
    "MTPModel": "mtp.model.mtp", "train": "mtp.training.train", "pretrain": "mtp.training.pretrain",
    "build_decoder": "mtp.decode.run", "load_for_decoding": "mtp.decode.run", "export": "mtp.export.run",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mtp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
