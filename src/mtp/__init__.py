"""mtp: multi-token prediction for language models — measure it, train it, decode faster with it."""

__version__ = "0.1.0"

from mtp.analysis.marginal import CachedEvaluator, NaiveEvaluator, marginalize  # noqa: E402
from mtp.analysis.run import analyze  # noqa: E402
from mtp.backbones import BUILTIN_MODELS, DEFAULT_MODEL, load_backbone  # noqa: E402
from mtp.config import AnalyzeConfig  # noqa: E402
from mtp.data import load_corpus, make_windows  # noqa: E402
from mtp.errors import UserError  # noqa: E402

__all__ = ["AnalyzeConfig", "BUILTIN_MODELS", "CachedEvaluator", "DEFAULT_MODEL", "NaiveEvaluator", "UserError",
           "analyze", "load_backbone", "load_corpus", "make_windows", "marginalize"]
