"""The EAGLE-3 draft as a GGUF file for llama.cpp's ``--spec-type draft-eagle3``, written by llama.cpp's own
converter (``convert_hf_to_gguf.py`` with ``--target-model-dir``, from the tree ``mtp engines setup
llama.cpp`` fetched): it detects the draft by ``draft_vocab_size`` and one layer, renames ``midlayer.*``,
permutes q/k for its RoPE layout, stores ``d2t`` as absolute target ids and copies the target's tokenizer.
Writing the format ourselves would be a second, untested copy of that code.
"""

from __future__ import annotations

from pathlib import Path

from mtp.engines import llamacpp
from mtp.errors import UserError

OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # q4_0: f16 through llama.cpp's llama-quantize


def write_gguf(eagle3_dir: Path, target_dir: Path, out_file: Path, outtype: str = "f16",
               timeout: float = 900.0) -> Path:
    """The EAGLE-3 folder ``eagle3_dir`` (see :mod:`mtp.export.eagle3`) of the target in ``target_dir``."""
    if outtype not in OUT_TYPES:
        raise UserError(f"unknown GGUF type {outtype!r}: use one of {', '.join(OUT_TYPES)}")
    if outtype == "q4_0":
        f16 = out_file.with_name(out_file.stem + ".f16.gguf")
        llamacpp.convert([eagle3_dir, "--target-model-dir", target_dir, "--outfile", f16, "--outtype", "f16"],
                         "the EAGLE-3 draft", timeout)
        llamacpp.quantize(f16, out_file, "q4_0", timeout)
        f16.unlink()
        return out_file
    llamacpp.convert([eagle3_dir, "--target-model-dir", target_dir, "--outfile", out_file, "--outtype", outtype],
                     "the EAGLE-3 draft", timeout)
    return out_file
