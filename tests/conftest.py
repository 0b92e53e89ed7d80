"""Tiny random models (vocab 64-256, 2 layers, width 32-64) in float64, built from transformers configs."""

from __future__ import annotations

import pytest
import torch

TINY_ARCHS = ("llama", "qwen2", "gemma3")


def tiny_model(arch: str = "llama", vocab: int = 64, seed: int = 0, sliding_window: int = 6,
               dtype=torch.float64):
    """A 2-layer random causal LM; gemma3 gets a sliding-window layer with a short window."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=8, sliding_window=sliding_window,
                               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Sharpen the random model a little so top-p sets vary in size, as with real models.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    return model.to(dtype).eval()


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


def char_tokenizer(add_bos: bool = True):
    """A character-level fast tokenizer (ASCII + newline/tab, 101 ids), offline, with offsets."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_folder(path, vocab: int = 128):
    """A Hugging Face model folder (safetensors + the character tokenizer) holding a tiny random Llama, float32."""
    tiny_model("llama", vocab=vocab, dtype=torch.float32).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A Hugging Face model folder (safetensors + tokenizer) holding a tiny random Llama, float32."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


SAMPLE_TEXT = (
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n"
    "The quick brown fox jumps over the lazy dog. " * 3
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT * 4)
    return path


@pytest.fixture
def corpus_file(tmp_path):
    """A small training text file."""
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT * 30)
    return path


def one_line_error(capsys, argv, *fragments) -> str:
    """Run the CLI in-process: it must end with exit status 2 and exactly one ``mtp: error:`` line holding every
    fragment, no traceback, nothing on stdout. Returns that line."""
    from mtp.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("mtp: error:"), out.err
    assert "Traceback" not in out.err and out.out == ""
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def crash_optimizer_at(monkeypatch, n: int):
    """Make the n-th AdamW step raise "simulated crash"; returns a function that restores the real step."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    return lambda: monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


# ----------------------------------------------------------------------------- strict warnings (make test-strict)
# pyproject's filterwarnings hides deprecation notices in the normal run. With MTP_STRICT_WARNINGS=1 they become
# errors instead, so a call of ours that a newer library deprecates (a transformers keyword, a torch function)
# fails the run instead of warning every user (mtp.hf_compat holds the transformers-version-sensitive calls).
# A warning is attributed to whichever frame the library names (for transformers' keyword deprecations: torch's
# Module.__call__, not our line), so no filter by module can tell ours apart: everything is an error, except the
# notices below, raised by a library about its own internals, which no call of ours can avoid.
STRICT_IGNORED: tuple[str, ...] = (
    # (none: peft's own notice about transformers' is_gradient_checkpointing is silenced at its one call site,
    # mtp.hf_compat.add_lora)
)


def pytest_configure(config):
    import os

    if os.environ.get("MTP_STRICT_WARNINGS") != "1":
        return
    # ini filters are applied in order, each taking precedence over the ones before (pyproject's "ignore")
    for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}")
    for spec in STRICT_IGNORED:
        config.addinivalue_line("filterwarnings", spec)
