import math
import pytest
import torch

from mtp.errors import UserError
from mtp.training.losses import IGNORE, head_targets, head_weights
from mtp.model.mtp import HeadsConfig, MTPModel
from mtp.training.train import mtp_step, naive_step
from tests.conftest import tiny_model


def make(arch="llama", seed=0, **kw):
    backbone = tiny_model(arch, vocab=64, seed=seed)
    return MTPModel(backbone, HeadsConfig(backbone="tiny", **kw))


def randomize_heads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_offset_head_k_predicts_t_plus_1_plus_k(k):
    ids = torch.arange(10)[None]
    t = head_targets(ids, k)
    assert t[0, : 10 - 1 - k].tolist() == list(range(1 + k, 10))
    assert (t[0, 10 - 1 - k:] == IGNORE).all()


def test_offset_respects_loss_mask():
    ids = torch.arange(8)[None]
    mask = torch.tensor([[False, False, False, True, True, True, True, True]])
    t = head_targets(ids, 1, mask)  # targets x_{t+2}; only tokens 3.. may be targets
    assert t[0].tolist() == [IGNORE, 3, 4, 5, 6, 7, IGNORE, IGNORE]


def test_zero_init_mlp_heads_reproduce_next_token(arch):
    model = make(arch, kind="mlp", n_heads=3)
    ids = torch.randint(3, 64, (2, 11))
    logits = model(ids)  # (K, B, T, V)
    assert logits.shape == (4, 2, 11, 64)
    for k in range(1, 4):
        assert torch.allclose(logits[k], logits[0], atol=1e-10)


def test_transformer_head_copy_of_last_layer_replays_it(arch):
    """Fed the input of the last layer, a head initialized as its copy reproduces the backbone's logits:
    checks the head's causal mask, sliding window and rotary embeddings."""
    model = make(arch, kind="transformer", n_heads=2, tap="layer:1")
    ids = torch.randint(3, 64, (2, 13))  # longer than gemma3's sliding window of 6
    logits = model(ids)
    for k in (1, 2):
        assert torch.allclose(logits[k], logits[0], atol=1e-8)


def test_whs_weights_are_normalized_and_favor_last_layer():
    model = make(tap="whs", n_heads=2)
    w = torch.softmax(model.heads[0].whs, -1)
    assert w.shape == (3,) and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert abs(w[-1].item() - 0.9) < 1e-6


@pytest.mark.parametrize("kind,tap", [("mlp", "last"), ("mlp", "whs"), ("transformer", "last"),
                                      ("transformer", "layer:1"), ("hydra", "last"), ("hydra", "whs")])
@pytest.mark.parametrize("train_backbone", [False, True])
def test_sequential_equals_naive_gradients(kind, tap, train_backbone):
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 12))
    weights = head_weights(3, ntp_weight=0.5, schedule="decay:0.8")
    grads = []
    for step in ("sequential", "naive"):
        model = make(kind=kind, tap=tap, n_heads=3)
        randomize_heads(model)
        model.backbone.requires_grad_(train_backbone)
        if step == "sequential":
            losses = mtp_step(model, ids, weights, train_backbone=train_backbone, chunk_tokens=7)
        else:
            losses = naive_step(model, ids, weights)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses))
    (ga, la), (gb, lb) = grads
    if not train_backbone and tap != "last":  # a frozen trunk stops at its highest tap: no NTP loss to report
        assert math.isnan(la[0])
        la, lb = la[1:], lb[1:]
    assert la == pytest.approx(lb, abs=1e-10)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-10, rtol=1e-7), name


def test_frozen_backbone_gets_no_gradient():
    model = make(n_heads=2)
    randomize_heads(model)
    model.backbone.requires_grad_(False)
    mtp_step(model, torch.randint(3, 64, (2, 10)), head_weights(2), train_backbone=False)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head_parameters())


@pytest.mark.parametrize("kind,tap", [("mlp", "whs"), ("transformer", "last"), ("hydra", "last")])
def test_save_load_bit_exact(tmp_path, kind, tap):
    model = make(kind=kind, tap=tap, n_heads=2)
    randomize_heads(model)
    model.save_pretrained(tmp_path / "heads")
    loaded = MTPModel.from_pretrained(tmp_path / "heads", backbone=model.backbone)
    ids = torch.randint(3, 64, (1, 9))
    assert torch.equal(model(ids), loaded(ids))
    for (na, a), (nb, b) in zip(model.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert na == nb and torch.equal(a, b)


def test_heads_for_another_backbone_are_refused(tmp_path):
    model = make(seed=0)
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(UserError, match="unembedding differs"):
        MTPModel.from_pretrained(tmp_path / "heads", backbone=tiny_model("llama", vocab=64, seed=5))
    with pytest.raises(UserError, match="vocab_size"):
        MTPModel.from_pretrained(tmp_path / "heads", backbone=tiny_model("llama", vocab=80, seed=0))


def test_bad_checkpoints(tmp_path):
    model = make()
    with pytest.raises(UserError, match="does not exist"):
        MTPModel.from_pretrained(tmp_path / "nope", backbone=model.backbone)
    model.save_pretrained(tmp_path / "heads")
    weights = tmp_path / "heads" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    with pytest.raises(UserError, match="truncated or corrupt"):
        MTPModel.from_pretrained(tmp_path / "heads", backbone=model.backbone)
    (tmp_path / "heads" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        MTPModel.from_pretrained(tmp_path / "heads", backbone=model.backbone)


def test_bad_head_configs():
    with pytest.raises(UserError, match="unknown head kind"):
        HeadsConfig(backbone="x", kind="lstm")
    with pytest.raises(UserError, match=">= 0"):
        HeadsConfig(backbone="x", n_heads=-1)
    with pytest.raises(UserError, match="unknown tap"):
        make(tap="middle")
    with pytest.raises(UserError, match="0..2"):
        make(tap="layer:7")


def test_hydra_head_reads_the_tokens_before_its_target():
    """Head k at position t sees x_{t+1} .. x_{t+k}: changing x_{t+j} (j <= k) moves it, later tokens do not."""
    from mtp.model.mtp import shifted_tokens
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert shifted_tokens(ids, 2)[0].tolist() == [[6, 7], [7, 8], [8, 9], [9, 10], [10, 10], [10, 10]]
    model = make(kind="hydra", n_heads=2)
    randomize_heads(model)
    assert model.heads[1].body.mix.in_features == 2 * model.backbone.config.hidden_size
    _, states = model.trunk(ids)
    base = model.head_hidden(2, states, tokens=ids)
    # prev_ids given per position equal the teacher-forced ones
    assert torch.equal(base, model.head_hidden(2, states, prev_ids=shifted_tokens(ids, 2)))
    other = shifted_tokens(ids, 2).clone()
    other[0, 1, 1] = 20  # position 1, token x_{t+2}
    moved = model.head_hidden(2, states, prev_ids=other)
    assert not torch.allclose(moved[0, 1], base[0, 1]) and torch.equal(moved[0, 0], base[0, 0])
    fresh = make(kind="hydra", n_heads=1)  # zero-initialized: starts as the identity, like mlp
    _, states = fresh.trunk(ids)
    assert torch.equal(fresh.head_hidden(1, states, tokens=ids), states[0])


def test_the_registry_holds_the_kinds_the_flags_accept():
    """--kind is checked at the door against mtp.config's names: they are exactly the registered kinds."""
    from mtp.config import HEAD_KIND_NAMES
    from mtp.model import HEAD_KINDS

    assert sorted(HEAD_KIND_NAMES) == sorted(HEAD_KINDS)


@pytest.mark.parametrize("argv, fragment", [
    (["--kind", "medusa2"], "unknown --kind 'medusa2'"),
    (["--head-weights", "decay:2"], "decay:G needs 0 < G <= 1"),
    (["--head-weights", "linear"], "unknown head weight schedule 'linear'"),
    (["--tap", "layer:x"], "tap 'layer:x': the layer must be a whole number"),
    (["--tap", "middle"], "unknown tap 'middle'"),
])
def test_train_flags_are_refused_at_the_door(capsys, monkeypatch, argv, fragment):
    """Before any model, data or cache is touched: a backbone lookup fails the test."""
    import mtp.backbones

    def refuse(*a, **k):
        raise AssertionError("the model was looked up before the flags were checked")

    monkeypatch.setattr(mtp.backbones, "backbone_config", refuse)
    from tests.conftest import one_line_error

    one_line_error(capsys, ["train", "--data", "nothing.txt", *argv], fragment)
