"""Typed configurations; each validates itself in ``__post_init__`` and raises ``UserError`` on bad values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mtp.backbones import DEFAULT_MODEL, DTYPES
from mtp.errors import UserError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class AnalyzeConfig:
    """How much multi-token prediction next-token models already have (``mtp analyze``)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    """Built-in model names, Hugging Face model folders or .gguf files."""
    data: list[str] = field(default_factory=lambda: ["code"])
    """Built-in corpora (code, prose, translation) or .txt / .jsonl files."""
    k: int = 3
    """Largest prediction distance: x_{t+1} (NTP) up to x_{t+k}, k <= 3."""
    top_p: list[float] = field(default_factory=lambda: [0.99, 0.9])
    """Each sum over intermediate tokens covers this much of the mass (nested); all values in one pass."""
    max_candidates: int = 128
    """At most this many candidate paths per position and distance (the most probable kept)."""
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
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _require(len(self.models) > 0, "give at least one --model")
        _require(len(self.data) > 0, "give at least one --data or --text")
        _require(1 <= self.k <= 3, f"--k must be 1, 2 or 3, got {self.k}")
        _require(len(self.top_p) > 0, "give at least one --top-p")
        for p in self.top_p:
            _require(0.0 < p <= 1.0, f"--top-p must be in (0, 1], got {p}")
        self.top_p = sorted(set(self.top_p), reverse=True)
        _require(self.max_candidates >= 1, f"--max-candidates must be at least 1, got {self.max_candidates}")
        _require(self.context >= 1, f"--context must be at least 1, got {self.context}")
        _require(self.max_positions >= 1, f"--max-positions must be at least 1, got {self.max_positions}")
        _require(self.positions_per_window >= 1,
                 f"--positions-per-window must be at least 1, got {self.positions_per_window}")
        _require(self.chunk_tokens >= 1, f"--chunk-tokens must be at least 1, got {self.chunk_tokens}")
        _require(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)


TRAIN_MODES = ("frozen", "joint", "lora")


@dataclass
class TrainConfig:
    """Training MTP heads on a pretrained backbone (``mtp train``)."""

    model: str = DEFAULT_MODEL
    """Backbone: built-in name, Hugging Face folder or .gguf file."""
    out: str = "runs/heads"
    """Run folder: checkpoint/, heads/ (the result), metrics.jsonl."""
    heads: int = 4
    """MTP heads; head k predicts x_{t+1+k}."""
    kind: str = "mlp"
    """Head kind: mlp | transformer | hydra (sequential: also reads the tokens before its target) | eagle3 (one
    drafter over three tapped layers, trained with training-time test over --heads draft steps; exportable to
    vLLM, SGLang and llama.cpp with `mtp export`)."""
    eagle_layers: str = "default"
    """eagle3: the three target layers whose inputs the head fuses: default (2, L//2, L-3, vLLM's and
    llama.cpp's), auto (from the logit lens on the training text: see docs/results/engines.md) or I,J,K."""
    draft_vocab: int = 0
    """eagle3: draft vocabulary size (its lm_head rows): 0 = every token seen as a target, at least 16384."""
    tap: str = "last"
    """Hidden state the heads read: last | layer:I | whs."""
    mlp_layers: int = 1
    init_from_last: bool = True
    mode: str = "frozen"
    """frozen (heads only) | joint (full fine-tuning) | lora (peft adapters on the backbone)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    data: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Training text: built-in corpora (their train split), .txt/.jsonl files, or distilled .jsonl files."""
    seq_len: int = 512
    batch_size: int = 8
    """Sequences per optimizer step (across all processes, before accumulation)."""
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    """Learning rate of the heads."""
    backbone_lr: float = 2e-5
    """Learning rate of the backbone (joint) or its adapters (lora)."""
    whs_lr: float = 0.05
    """Learning rate of the WHS layer weightings (--tap whs). They are a handful of softmax logits: at the
    heads' lr, Adam moves them by at most lr per step, too little to leave their 90 %-last-layer start."""
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of the peak learning rate."""
    weight_decay: float = 0.0
    clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    ntp_weight: float = 1.0
    """w_0, the next-token loss weight (it only trains anything when the backbone trains)."""
    head_weights: str = "constant"
    """w_k for k >= 1: constant | decay:G (w_k = G**k)."""
    loss_chunk_tokens: int = 4096
    """Tokens (B x chunk) per unembedding + cross-entropy chunk."""
    autocast: str = "auto"
    """bf16 autocast: auto (on where bf16 matmuls are fast) | on | off."""
    cache_hidden: bool = False
    """Frozen mode: compute the backbone's hidden states once (memmap) and reuse them every epoch."""
    max_tokens: int | None = None
    """Read at most this many training tokens (default: what max_steps needs)."""
    save_every: int = 200
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    """Backbone weights' dtype."""
    save_dtype: str | None = None
    """dtype of the saved heads (default: as trained; bfloat16 halves the file)."""

    def __post_init__(self) -> None:
        _require(self.save_dtype is None or self.save_dtype in DTYPES,
                 f"unknown --save-dtype {self.save_dtype!r}: use one of {', '.join(DTYPES)}")
        _require(self.heads >= 1 or (self.heads == 0 and self.mode == "joint"),
                 f"--heads must be at least 1, got {self.heads}")  # 0 heads: plain fine-tuning / NTP pretraining
        _require(self.mode in TRAIN_MODES, f"unknown --mode {self.mode!r}: use one of {', '.join(TRAIN_MODES)}")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "save_every", "log_every", "mlp_layers",
                     "loss_chunk_tokens", "lora_r"):
            value = getattr(self, name)
            _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
        _require(self.seq_len >= 2 + self.heads, f"--seq-len must exceed the number of heads + 1, got {self.seq_len}")
        for name in ("lr", "backbone_lr", "whs_lr"):
            value = getattr(self, name)
            _require(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        _require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.clip >= 0 and self.weight_decay >= 0 and self.ntp_weight >= 0,
                 "--clip, --weight-decay and --ntp-weight must be >= 0")
        _require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        _require(self.autocast in ("auto", "on", "off"), f"--autocast must be auto, on or off, got {self.autocast!r}")
        _require(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        _require(not self.cache_hidden or (self.mode == "frozen" and (self.tap != "whs" or self.kind == "eagle3")),
                 "--cache-hidden needs --mode frozen and a single tapped layer (not --tap whs)")
        _require(self.kind != "eagle3" or self.mode == "frozen",
                 "eagle3 heads draft for an unchanged target: train them with --mode frozen")
        _require(self.draft_vocab == 0 or self.draft_vocab >= 64,
                 f"--draft-vocab must be 0 (automatic) or at least 64, got {self.draft_vocab}")
        _require(len(self.data) > 0, "give at least one --data")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportConfig:
    """Heads into a serving engine's format (``mtp export``)."""

    heads: str = "eagle3"
    """A heads folder (e.g. RUN/heads) or `eagle3`: the EAGLE-3 heads shipped for --model."""
    format: str = "eagle3"
    """eagle3 (HF folder for vLLM / SGLang) | gguf (llama.cpp's draft-eagle3) | medusa (vLLM)."""
    out: str = ""
    """Output folder (must not exist or be empty, unless --overwrite)."""
    model: str | None = None
    """The target the heads are for (default: the one their config.json names); foreign heads are refused."""
    dtype: str | None = None
    """dtype of the exported weights (default: as stored)."""
    gguf_type: str = "f16"
    """gguf: f32 | f16 | bf16 | q8_0."""
    overwrite: bool = False
    """Replace an existing --out (the old one is removed only once the new one is complete)."""

    def __post_init__(self) -> None:
        from mtp.export import FORMATS

        _require(self.format in FORMATS, f"unknown --format {self.format!r}: use one of {', '.join(FORMATS)}")
        _require(bool(self.out), "give --out DIR")


@dataclass
class BenchEngineConfig:
    """A real serving engine three ways (plain, its own n-gram speculation, our exported EAGLE-3 heads) and
    mtp's own engine beside it, on the same prompts (``mtp bench engine``)."""

    engine: str = "llama.cpp"
    """llama.cpp | vllm."""
    heads: str = "eagle3"
    """eagle3 heads: a folder or `eagle3` (the EAGLE-3 heads shipped for --model)."""
    model: str = DEFAULT_MODEL
    prompts: str = "chat"
    """A built-in prompt set (its eval split: chat, code, general, translation) or a .jsonl with a prompt field."""
    limit: int = 10
    """Prompts."""
    max_new_tokens: int = 128
    draft_len: int = 4
    """Tokens drafted per step (llama.cpp --spec-draft-n-max, vLLM num_speculative_tokens)."""
    p_min: float = 0.0
    """llama.cpp: stop drafting below this draft probability (its --spec-draft-p-min)."""
    target: str = "packaged"
    """llama.cpp's target GGUF: packaged (the quantized file users have) | f16 | bf16 | f32 (converted once)."""
    ngram_modes: list[str] = field(default_factory=lambda: ["ngram-simple", "ngram-map-k", "ngram-mod"])
    """llama.cpp's training-free speculation modes to run (vLLM runs its ngram)."""
    threads: int = 2
    """llama.cpp threads (its threads spin: nothing else should run beside it)."""
    vllm_dtype: str = "bfloat16"
    enforce_eager: bool = True
    """vLLM without graph compilation (starts in ~40 s instead of ~200 s on a CPU; ~25 % slower per token)."""
    mtp_methods: list[str] = field(default_factory=lambda: ["blockwise", "tree"])
    """mtp's own engine with the same heads, beside the engine (comma-separated; "" skips it)."""
    mtp_dtype: str = "float32"
    """dtype of mtp's own engine (bfloat16 pays on CPUs with AMX, float32 elsewhere)."""
    rounds: int = 1
    """Runs of every configuration, alternating; per prompt the median is kept."""
    timeout: float = 900.0
    """Seconds any one wait on the engine may take (start-up, one request)."""
    chat: bool = True
    """Apply the model's chat template to the prompts."""
    seed: int = 0
    json: str | None = None
    plot: str | None = None

    def __post_init__(self) -> None:
        # list flags also take comma-separated values; "" for none
        self.ngram_modes = [m for item in self.ngram_modes for m in item.split(",") if m]
        self.mtp_methods = [m for item in self.mtp_methods for m in item.split(",") if m]
        _require(self.engine in ("llama.cpp", "vllm"), f"unknown --engine {self.engine!r}: use llama.cpp or vllm")
        for name in ("limit", "max_new_tokens", "draft_len", "threads", "rounds"):
            value = getattr(self, name)
            _require(isinstance(value, int) and 1 <= value <= 100_000, f"--{name.replace('_', '-')} must be "
                                                                      f"between 1 and 100000, got {value}")
        _require(0.0 <= self.p_min < 1.0, f"--p-min must be in [0, 1), got {self.p_min}")
        _require(self.timeout > 0 and self.timeout == self.timeout, f"--timeout must be positive, got {self.timeout}")
        _require(self.vllm_dtype in ("bfloat16", "float32", "float16"),
                 f"--vllm-dtype must be bfloat16, float32 or float16, got {self.vllm_dtype!r}")
        _require(self.mtp_dtype in DTYPES, f"unknown --mtp-dtype {self.mtp_dtype!r}")
        from mtp.engines.targets import GGUF_KINDS

        _require(self.target in GGUF_KINDS, f"unknown --target {self.target!r}: use one of {', '.join(GGUF_KINDS)}")
        from mtp.bench.engine import LLAMA_NGRAM_MODES

        for mode in self.ngram_modes:
            _require(mode in LLAMA_NGRAM_MODES + ("ngram-map-k4v", "ngram-cache"),
                     f"unknown llama.cpp n-gram mode {mode!r}: use {', '.join(LLAMA_NGRAM_MODES)}")
        from mtp.decode.methods import HEAD_METHODS

        for m in self.mtp_methods:
            _require(m in HEAD_METHODS, f"--mtp-methods: {m!r} is not one of {', '.join(HEAD_METHODS)}")
