"""mtp.decode.slots over hf_compat.SlotLayer: the decoding engine's preallocated cache, checked against
full forwards of the same tokens (tiny random models, float64)."""

from __future__ import annotations

import pytest
import torch

from mtp.decode.slots import Slots
from mtp.hf_compat import forward_with_cache
from mtp.model.attention import attention_masks
from tests.conftest import tiny_model

IDS = [5, 9, 3, 17, 42, 8, 11, 60, 7, 23, 31, 2]


def forward(model, slots, cache, ids, q_pos, allowed_new):
    allowed, k_pos = slots.begin(q_pos, allowed_new)
    mask = attention_masks(model.config, allowed, q_pos, k_pos, model.dtype)
    with torch.no_grad():
        return forward_with_cache(model, cache, input_ids=ids, position_ids=q_pos, attention_mask=mask,
                                  use_cache=True).logits


def causal(q: int) -> torch.Tensor:
    return torch.ones(1, q, q, dtype=torch.bool).tril()


def reference(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_token_by_token_equals_a_full_forward_across_buckets_and_growth(arch):
    model = tiny_model(arch)
    slots = Slots(1, torch.device("cpu"), capacity=3, bucket=4)  # grows twice, reads 4, 8, 12 slots
    cache = slots.cache()
    ref = reference(model, IDS)
    lengths = []
    for i, t in enumerate(IDS):
        logits = forward(model, slots, cache, torch.tensor([[t]]), torch.tensor([[i]]), causal(1))
        lengths.append((slots.view.length, slots.capacity))
        slots.keep_all(torch.ones(1, 1, dtype=torch.bool))
        assert torch.allclose(logits[0, -1], ref[i], atol=1e-9)
    assert slots.capacity >= len(IDS) and slots.end == len(IDS)
    assert lengths == [(min(cap, -(-(i + 1) // 4) * 4), cap) for i, (_, cap) in enumerate(lengths)]
    assert [cap for _, cap in lengths][::4] == [3, 6, 9]  # grown only when a step did not fit


def test_keep_compacts_a_per_row_path_in_place():
    """Two rows verify a 4-node chain each and keep different paths: the kept slots must hold exactly
    the keys a fresh forward over the committed tokens computes, and the next step must continue from them."""
    model = tiny_model("qwen2")
    dev = torch.device("cpu")
    slots = Slots(2, dev, capacity=64, bucket=8)
    cache = slots.cache()
    prompt = torch.tensor([IDS[:5], IDS[5:10]])
    pos = torch.arange(5).expand(2, -1)
    forward(model, slots, cache, prompt, pos, causal(5))
    slots.keep_all(torch.ones(2, 5, dtype=torch.bool))
    step = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    forward(model, slots, cache, step, torch.arange(5, 9).expand(2, -1), causal(4))
    keep = torch.tensor([[0, 1, 2], [0, 2, 3]])  # row 1 keeps a path with a hole (node 1 rejected)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    slots.keep(keep, valid)
    assert slots.end == 8
    committed = [IDS[:5] + [20, 21, 22], IDS[5:10] + [30, 32]]
    row_pos = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 7]]
    for r in range(2):
        used = slots.valid[r, :slots.end].nonzero()[:, 0]
        assert slots.pos[r, used].tolist() == row_pos[r]
    # the next token of row 0 attends to its 8 committed slots, exactly as a full forward
    nxt = torch.tensor([[24], [34]])
    q_pos = torch.tensor([[8], [7]])
    logits = forward(model, slots, cache, nxt, q_pos, causal(1))
    slots.keep_all(torch.ones(2, 1, dtype=torch.bool))
    ref0 = reference(model, committed[0] + [24])[-1]
    assert torch.allclose(logits[0, -1], ref0, atol=1e-9)
    # row 1's kept slots up to its hole hold a fresh forward's keys of the same tokens
    check = Slots(1, dev, capacity=16, bucket=8)
    c2 = check.cache()
    forward(model, check, c2, torch.tensor([IDS[5:10] + [30]]), torch.arange(6)[None], causal(6))
    for mine, fresh in zip(cache.layers, c2.layers):
        used = slots.valid[1, :6].nonzero()[:, 0]
        assert torch.allclose(mine.keys[1][:, used], fresh.keys[0][:, :6], atol=1e-10)
        assert torch.allclose(mine.values[1][:, used], fresh.values[0][:, :6], atol=1e-10)


def test_truncate_drops_draft_slots_and_the_next_step_overwrites_them():
    model = tiny_model("llama")
    slots = Slots(1, torch.device("cpu"), capacity=32)
    cache = slots.cache()
    forward(model, slots, cache, torch.tensor([IDS[:6]]), torch.arange(6)[None], causal(6))
    slots.keep_all(torch.ones(1, 6, dtype=torch.bool))
    forward(model, slots, cache, torch.tensor([[50, 51, 52]]), torch.arange(6, 9)[None], causal(3))
    slots.keep_all(torch.ones(1, 3, dtype=torch.bool))
    slots.truncate(6)
    logits = forward(model, slots, cache, torch.tensor([[IDS[6]]]), torch.tensor([[6]]), causal(1))
    assert torch.allclose(logits[0, -1], reference(model, IDS[:7])[-1], atol=1e-9)


def test_attention_reads_a_bucket_not_the_capacity():
    model = tiny_model("llama")
    slots = Slots(1, torch.device("cpu"), capacity=1000, bucket=16)
    cache = slots.cache()
    allowed, k_pos = slots.begin(torch.arange(5)[None], causal(5))
    assert allowed.shape == (1, 5, 16) and k_pos.shape == (1, 16)
    assert not allowed[..., 5:].any()
    mask = attention_masks(model.config, allowed, torch.arange(5)[None], k_pos, model.dtype)
    with torch.no_grad():
        forward_with_cache(model, cache, input_ids=torch.tensor([IDS[:5]]), position_ids=torch.arange(5)[None],
                           attention_mask=mask, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 1000  # allocated once, read 16 at a time
    assert layer.get_seq_length() == 0 and layer.get_mask_sizes(5) == (16, 0)


def test_a_batch_whose_cache_cannot_fit_is_refused_before_anything_is_allocated(monkeypatch):
    import mtp.decode.executors.pytorch as executor
    from mtp.decode.engine import SpeculativeDecoder
    from mtp.decode.slots import kv_bytes
    from mtp.errors import UserError

    model = tiny_model("llama")
    per_slot = kv_bytes(model.config, model.dtype, 1, 1)
    assert per_slot == 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 8  # float64
    monkeypatch.setattr(executor, "free_memory", lambda device: 100 * per_slot)
    tok = type("Tok", (), {"eos_token_id": 2, "decode": lambda self, ids, **kw: ""})()
    with pytest.raises(UserError, match=r"GiB of KV cache.*fewer prompts"):
        SpeculativeDecoder(model, tok).generate([[1, 2, 3]] * 2, 8)
    out = SpeculativeDecoder(model, tok).generate([[1, 5, 3]], 8, eos_token_ids=[])  # 1 x (3 + 8 + 64) slots fit
    assert len(out.rows[0].tokens) == 8
