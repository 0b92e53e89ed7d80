"""Heads out of ``mtp``, into the engines people serve with (``mtp export``).

Each format has one writer here and one reader (for round trips and for the tests' independent
re-implementations of the engines' forwards):

- ``eagle3``: the Hugging Face-format EAGLE-3 folder vLLM (``method: "eagle3"``) and SGLang (``EAGLE3``)
  load (:mod:`mtp.export.eagle3`);
- ``gguf``: the draft GGUF llama.cpp's ``--spec-type draft-eagle3`` loads, written by llama.cpp's own
  converter from the eagle3 folder (:mod:`mtp.export.gguf`);
- ``medusa``: vLLM's Medusa layout, for heads whose graph is Medusa's (:mod:`mtp.export.medusa`).
"""

from __future__ import annotations

from pathlib import Path

from mtp.config import EXPORT_FORMATS as FORMATS
from mtp.errors import UserError


def formats_for(config: dict) -> list[str]:
    """The formats a heads folder can be exported to, from its config.json."""
    if config.get("kind") == "eagle3":
        return ["eagle3", "gguf"]
    if config.get("kind") == "mlp" and config.get("tap") == "final" and config.get("trained_backbone") == "none":
        return ["medusa"]
    return []


def check_exportable(config: dict, fmt: str, folder: Path) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    can = formats_for(config)
    if fmt in can:
        return
    kind = config.get("kind")
    if can:
        raise UserError(f"{folder} holds {kind} heads, which {fmt} cannot express: export them as "
                        f"{' or '.join(can)}")
    raise UserError(f"{folder} holds {kind} heads (tap {config.get('tap')}), which no serving engine loads: "
                    f"eagle3 heads (`mtp train --kind eagle3`) go to eagle3 and gguf, mlp heads with --tap final "
                    f"to medusa")
