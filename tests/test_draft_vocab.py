"""Heads that draft from a shortlist of the vocabulary (FR-Spec): cheaper drafts, the same output."""

import pytest
import torch

from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.proposers import DynamicTreeProposer, TreeProposer, blockwise
from mtp.decode.run import draft_shortlist
from mtp.decode.tree import compile_tree
from mtp.errors import UserError
from tests.conftest import tiny_model
from tests.test_decode import PROMPTS, Tok, reference_greedy, run_cli, tiny_heads, with_heads  # noqa: F401


@pytest.mark.parametrize("kind", ["mlp", "hydra"])
def test_shortlisted_drafts_reproduce_plain_greedy(kind):
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, kind)
    refs = [reference_greedy(model, p, 24) for p in PROMPTS]
    # a shortlist that misses some of the tokens greedy decoding emits: those are never drafted
    shortlist = torch.tensor(sorted(set(range(0, 64, 2)) | set(refs[0][:4])))
    tree = TreeProposer(compile_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]))
    for proposer in (blockwise(3), tree, DynamicTreeProposer(nodes=10, top_k=3)):
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer, draft_vocab=shortlist)
        out = dec.generate(PROMPTS, max_new_tokens=24, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == refs, proposer.name


def test_shortlisted_logits_equal_the_full_ones_on_the_shortlist():
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model)
    shortlist = torch.tensor([0, 3, 5, 17, 40, 63])
    dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=blockwise(3), draft_vocab=shortlist)
    hidden = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    full, short = heads.logits(hidden), dec._head_logits(hidden)
    assert torch.allclose(short[..., shortlist], full[..., shortlist])
    rest = torch.ones(64, dtype=torch.bool)
    rest[shortlist] = False
    assert torch.isneginf(short[..., rest]).all()


def test_draft_shortlist_takes_the_most_frequent_targets():
    model = tiny_model("llama", vocab=200)
    heads = with_heads(model)
    assert draft_shortlist(heads, None) is None  # no counts saved: the whole vocabulary
    assert draft_shortlist(heads, 0) is None
    with pytest.raises(UserError, match="token counts"):
        draft_shortlist(heads, 100)
    counts = torch.zeros(200, dtype=torch.long)
    counts[150:] = torch.arange(50, 0, -1)  # 150 most frequent, then 151, ...; the rest never seen
    heads.token_counts = counts
    got = draft_shortlist(heads, 64)
    # the 50 seen tokens, then unseen ones by id (BPE ids roughly follow merge order, i.e. frequency)
    assert got.tolist() == list(range(14)) + list(range(150, 200))
    assert draft_shortlist(heads, 200) is None  # the whole vocabulary anyway
    assert draft_shortlist(heads, None) is None  # default: the seen tokens, at least 4096 (> this vocabulary)
    with pytest.raises(UserError, match="too small"):
        draft_shortlist(heads, 10)


def test_token_counts_survive_save_and_load(tmp_path):
    from mtp.model.mtp import MTPModel
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model)
    heads.token_counts = torch.arange(64)
    heads.save_pretrained(tmp_path / "h", dtype=torch.bfloat16)
    again = MTPModel.from_pretrained(tmp_path / "h", backbone=model)
    assert torch.equal(again.token_counts, torch.arange(64))


def test_draft_vocab_cli_errors(tiny_folder, tiny_heads, capsys, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    base = ["generate", "--model", str(tiny_folder), "--heads", str(tiny_heads), "--method", "tree", "abc"]
    code, _, err = run_cli(base + ["--draft-vocab", "-1"], capsys)
    assert code == 2 and "--draft-vocab" in err and err.count("\n") == 1
    code, _, err = run_cli(base + ["--draft-vocab", "100"], capsys)  # these heads were saved without counts
    assert code == 2 and "token counts" in err and err.count("\n") == 1


def test_default_shortlist_is_the_seen_targets_rounded_up(monkeypatch):
    import mtp.decode.run as run
    model = tiny_model("llama", vocab=512)
    heads = with_heads(model)
    counts = torch.zeros(512, dtype=torch.long)
    counts[torch.arange(0, 400, 2)] = 5  # 200 tokens seen as targets
    heads.token_counts = counts
    monkeypatch.setattr(run, "MIN_DRAFT_VOCAB", 128)
    got = draft_shortlist(heads, None)
    assert len(got) == 256  # 200 seen, rounded up to a multiple of 64
    assert set(range(0, 400, 2)) <= set(got.tolist())
    monkeypatch.setattr(run, "MIN_DRAFT_VOCAB", 320)
    assert len(draft_shortlist(heads, None)) == 320


def test_target_counts_skip_tokens_that_are_never_targets():
    from mtp.data import target_counts
    blocks = torch.tensor([[1, 2, 2, 3], [3, 3, 0, 1]])
    masks = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)  # False: a distilled prompt's tokens
    assert target_counts(blocks, masks, 5).tolist() == [0, 1, 2, 3, 0]
    assert target_counts(blocks, None, 5).tolist() == [1, 2, 2, 3, 0]
