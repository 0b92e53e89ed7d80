"""Real pretrained model (smollm2-135m, converted once from its GGUF package into the cache)."""

import pytest
import torch

from mtp import load_backbone, load_corpus, make_windows
from mtp.analysis.marginal import CachedEvaluator, NaiveEvaluator, marginalize
from mtp.io import cache_dir

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2-135m", dtype="float32")


def test_converted_copy_is_cached(smollm2):
    folder = cache_dir() / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "mtp_source.json").is_file()


def test_real_model_has_mtp_ability_on_code(smollm2):
    model, tok = smollm2
    windows = make_windows(load_corpus("code"), tok, context=128, max_positions=32, per_window=16, horizon=2,
                           seed=0)
    hits = torch.zeros(2)
    for w in windows:
        res = marginalize(CachedEvaluator(model), w.input_ids, w.positions, 2, [0.99], 32)
        for k in (1, 2):
            pred = res.marginals[k - 1][0].argmax(-1)
            hits[k - 1] += (pred == w.input_ids[w.positions + k]).sum()
    acc = hits / 32
    assert acc[0] > 0.35 and acc[1] > 0.2  # a random model scores about 1 / 49152


def test_batched_equals_naive_on_real_model(smollm2):
    model, tok = smollm2
    (w,) = make_windows(load_corpus("code"), tok, context=96, max_positions=2, per_window=2, horizon=2, seed=1)
    a = marginalize(CachedEvaluator(model, chunk_tokens=5), w.input_ids, w.positions, 2, [0.99], 8)
    b = marginalize(NaiveEvaluator(model), w.input_ids, w.positions, 2, [0.99], 8)
    assert (a.marginals[1] - b.marginals[1]).abs().max() < 1e-5


@pytest.mark.parametrize("which", ["default", "eagle3"])
def test_shipped_heads_decode_like_plain_greedy(smollm2, which):
    """The shipped heads (hydra default, eagle3) load onto the real model and every head method says what
    plain greedy says (a batch of two prompts)."""
    from mtp.config import DraftOptions
    from mtp.decode.run import build_decoder, encode_prompt, eos_ids
    from mtp.heads_format import resolve_heads
    from mtp.model.mtp import MTPModel

    model, tok = smollm2
    folder = resolve_heads(which, "smollm2-135m")
    heads = MTPModel.from_pretrained(folder, backbone=model).eval()
    prompts = [encode_prompt(tok, "Write a Python function that adds two numbers."),
               encode_prompt(tok, "What is a list comprehension?")]
    eos = eos_ids(model, tok)
    outs = {}
    for method in ("plain", "blockwise", "tree", "dynamic"):
        dec, _ = build_decoder(model, tok, heads, folder, "smollm2-135m", method,
                               DraftOptions(nodes=8, draft_len=3))
        outs[method] = dec.generate(prompts, 40, eos)
    for method in ("blockwise", "tree", "dynamic"):
        assert [r.tokens for r in outs[method].rows] == [r.tokens for r in outs["plain"].rows]
        assert sum(r.acceptance_length for r in outs[method].rows) / 2 > 1.2  # the heads do accept tokens


def test_streamer_with_the_real_tokenizer(smollm2):
    """Byte-level BPE: streamed pieces, decoded a line at a time, join to the decoded answer (code, accents,
    emoji split across tokens, indentation after newlines)."""
    import io

    from mtp.decode.run import Streamer

    _, tok = smollm2
    text = "def café(x):\n    return x  # naïve 🙂\n\n        deep\n\tdone — ok\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for chunk in (1, 2, 3, 7):
        out = io.StringIO()
        streamer = Streamer(tok, out)
        for i in range(0, len(ids), chunk):
            streamer(0, ids[i:i + chunk])
        assert out.getvalue() == tok.decode(ids) == text
