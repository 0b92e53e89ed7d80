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
