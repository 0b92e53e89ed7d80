"""``mtp export``: a heads folder into a serving engine's format, and the command that serves it."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

from mtp.errors import UserError
from mtp.export import check_exportable

GGUF_NAME = "eagle3-draft.gguf"
EXPORT_ENTRIES = ("config.json", "model.safetensors", GGUF_NAME)
"""What an export folder holds (medusa / eagle3: config and weights; gguf: the draft): all that --overwrite replaces."""


def serve_commands(fmt: str, out: Path, model: str, draft_len: int = 4) -> dict[str, str]:
    """The commands a user runs to serve the exported heads beside their target model."""
    from mtp.backbones import local_model_folder

    out = out.resolve()
    if fmt == "gguf":
        from mtp.engines import llamacpp

        from mtp.engines import policy

        target = _target_gguf_hint(model)
        draft = out / GGUF_NAME
        threads = os.cpu_count() or 2
        costs = policy.load_cached(Path(target), draft, threads) if Path(target).is_file() and draft.is_file() else None
        if costs is None:  # not measured on this machine yet: the engine's defaults, and how to measure
            cmd = shlex.join(llamacpp.serve_command(target, draft, draft_max=draft_len))
            return {"llama.cpp": cmd, "llama.cpp draft settings": (
                f"not measured on this machine; `mtp bench engine --model {model} --heads HEADS` measures "
                "llama.cpp's costs here once and chooses them")}
        choice = policy.choose(costs)
        if not choice["pays"]:
            return {"llama.cpp": shlex.join(llamacpp.serve_command(target, None, threads=threads)),
                    "llama.cpp draft settings": (
                        f"measured on this machine: drafts do not pay here (best predicted "
                        f"{choice['predicted_speedup']:.2f}x at {choice['n_max']} drafts): serve plain")}
        cmd = llamacpp.serve_command(target, draft, draft_max=choice["n_max"], threads=threads,
                                     extra=policy.flags(choice)[2:])
        return {"llama.cpp": shlex.join(cmd), "llama.cpp draft settings": (
            f"measured on this machine: predicted {choice['predicted_speedup']:.2f}x")}
    target = str(local_model_folder(model))
    if fmt == "medusa":
        spec = {"method": "medusa", "model": str(out), "num_speculative_tokens": draft_len}
        return {"vLLM": shlex.join(["python", "-m", "vllm.entrypoints.openai.api_server", "--model", target,
                                    "--speculative-config", json.dumps(spec)])}
    spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": draft_len}
    return {"vLLM": shlex.join(["python", "-m", "vllm.entrypoints.openai.api_server", "--model", target,
                                "--speculative-config", json.dumps(spec)]),
            "SGLang": shlex.join(["python", "-m", "sglang.launch_server", "--model-path", target,
                                  "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(out),
                                  "--speculative-num-steps", str(draft_len), "--speculative-eagle-topk", "4",
                                  "--speculative-num-draft-tokens", "16"])}


def _target_gguf_hint(model: str) -> str:
    """The target GGUF llama-server loads: a built-in model's packaged file, or the user's .gguf."""
    from mtp.backbones import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        from mtp.engines.targets import packaged_gguf

        try:
            return str(packaged_gguf(model))
        except UserError:
            return f"<{model}.gguf>"
    return model if model.endswith(".gguf") else "<target.gguf>"


def export(cfg, command: str = "") -> dict:
    """Write ``cfg.heads`` (a folder or ``default``) as ``cfg.format`` into the folder ``cfg.out``
    (:class:`~mtp.config.ExportConfig`); returns a summary with the commands that serve the result."""
    from mtp.backbones import DTYPES, local_model_folder, torch_dtype
    from mtp.heads_format import read_heads_config, resolve_heads
    from mtp.io import atomic_dir, check_new_output
    from mtp.model.mtp import MTPModel

    heads, fmt, out, model, dtype = cfg.heads, cfg.format, cfg.out, cfg.model, cfg.dtype
    gguf_type, overwrite = cfg.gguf_type, cfg.overwrite

    from mtp.backbones import DEFAULT_MODEL

    folder = resolve_heads(heads, model or DEFAULT_MODEL)
    meta = read_heads_config(folder)
    check_exportable(meta, fmt, folder)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    target = model or meta.get("backbone")
    out_path = check_new_output(out, "--out", overwrite, inputs=(folder, model), entries=EXPORT_ENTRIES)
    if fmt == "gguf":
        from mtp.engines import llamacpp

        llamacpp.converter()  # before loading anything: the converter must be there
    if cfg.draft_vocab and meta.get("kind") != "eagle3":
        raise UserError(f"--draft-vocab sizes an EAGLE-3 draft; {folder} holds {meta.get('kind')} heads")
    mtp_model = MTPModel.from_pretrained(folder, backbone=_load_target(target) if model else None)
    if cfg.draft_vocab:
        mtp_model.shrink_draft_vocab(cfg.draft_vocab)
    with atomic_dir(out_path, replace=overwrite) as tmp:
        if fmt == "medusa":
            from mtp.export.medusa import write_medusa

            write_medusa(mtp_model, tmp, torch_dtype(dtype) if dtype else None)
        elif fmt == "eagle3":
            from mtp.export.eagle3 import write_eagle3

            write_eagle3(mtp_model, tmp, torch_dtype(dtype) if dtype else None)
        else:
            from mtp.export.eagle3 import write_eagle3
            from mtp.export.gguf import write_gguf

            with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
                # the converter names the model after this folder: a stable, telling name (not the temporary
                # one), so that the same heads export to the same bytes (measured costs are cached by content)
                hf = Path(scratch) / f"{folder.name}-eagle3-draft"
                hf.mkdir()
                write_eagle3(mtp_model, hf, torch_dtype("float32"))
                write_gguf(hf, local_model_folder(target), tmp / GGUF_NAME, gguf_type)
    return {"out": str(out_path), "format": fmt, "heads": str(folder), "target": target,
            "draft_vocab": int(mtp_model.config.draft_vocab) if mtp_model.autoregressive else None,
            "serve": serve_commands(fmt, out_path, target, max(1, int(meta.get("n_heads", 4))))}


def format_export(result: dict) -> str:
    lines = [f"exported {result['heads']} as {result['format']} into {result['out']}"]
    lines += [f"{engine}: {line}" if engine.endswith(" draft settings") else f"serve with {engine}:\n  {line}"
              for engine, line in result["serve"].items()]
    return "\n".join(lines)


def _load_target(model: str):
    from mtp.backbones import load_backbone

    backbone, _ = load_backbone(model, require_tokenizer=False)
    return backbone
