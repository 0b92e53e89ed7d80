"""mtp.hf_compat: the transformers-version-sensitive calls, run on tiny random models with every warning an error."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from mtp import hf_compat
from mtp.hf_compat import (cache_keyword, cache_length, first_layers, forward_with_cache,
                           mask_argument, new_cache, select_cache, truncate_cache)
from mtp.model.attention import attention_masks
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 9, 3, 17, 42, 8, 11, 60, 7, 23]])


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_pyproject_bound_is_the_tested_version():
    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    spec = next(d for d in meta["project"]["dependencies"] if d.startswith("transformers"))
    assert f"<={hf_compat.TESTED}" in spec.replace(" ", "")
    assert Version(transformers.__version__) <= Version(hf_compat.TESTED)


def test_cache_keyword_follows_each_forward():
    model = tiny_model("llama")
    installed = hf_compat._installed_cache_keyword()
    decoder = model.get_decoder()
    for module in (model, decoder, decoder.layers[0], decoder.layers[0].self_attn):
        assert cache_keyword(module) == installed

    def old(input_ids=None, past_key_values=None, **kwargs): ...

    def new(input_ids=None, cache=None, **kwargs): ...

    def wrapper(*args, **kwargs): ...

    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(new) == "cache"
    assert cache_keyword(wrapper) == installed


@pytest.mark.skipif(hf_compat._installed_cache_keyword() != "cache", reason="transformers without the cache keyword")
def test_the_old_keyword_is_what_transformers_deprecates():
    """What mtp avoided: the deprecated keyword warns (FutureWarning, removed in 5.40)."""
    model = tiny_model("llama")
    with pytest.warns(FutureWarning, match="past_key_values` is deprecated"), torch.no_grad():
        model(input_ids=IDS, past_key_values=new_cache(), use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cached_forward_equals_full_forward_without_warnings(arch):
    model = tiny_model(arch)
    ref = full_logits(model, IDS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        cache = new_cache()
        assert cache_length(cache) == 0 and cache_length(None) == 0
        out = forward_with_cache(model, cache, input_ids=IDS[:, :6], use_cache=True)
        assert cache_length(cache) == 6
        logits = [out.logits]
        for t in range(6, IDS.shape[1]):
            out = forward_with_cache(model, cache, input_ids=IDS[:, t:t + 1], use_cache=True)
            logits.append(out.logits)
        assert cache_length(cache) == IDS.shape[1]
        # the decoder stack and one decoder layer take the cache the same way
        decoder_cache = new_cache()
        hidden = forward_with_cache(model.get_decoder(), decoder_cache, input_ids=IDS, use_cache=True)
        assert cache_length(decoder_cache) == IDS.shape[1]
        forward_with_cache(model, None, input_ids=IDS, use_cache=False)  # no cache: nothing passed
    assert torch.allclose(torch.cat(logits, 1), ref, atol=1e-10)
    assert torch.allclose(model.lm_head(hidden.last_hidden_state), ref, atol=1e-10)


def test_truncate_then_refill_round_trip():
    model = tiny_model("llama")
    ref = full_logits(model, IDS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        cache = new_cache()
        forward_with_cache(model, cache, input_ids=IDS, use_cache=True)
        keys = [layer.keys.clone() for layer in cache.layers]
        truncate_cache(cache, 4)
        assert cache_length(cache) == 4
        truncate_cache(cache, 7)  # longer than the cache: nothing changes
        assert cache_length(cache) == 4
        out = forward_with_cache(model, cache, input_ids=IDS[:, 4:], use_cache=True)
    assert cache_length(cache) == IDS.shape[1]
    assert torch.allclose(out.logits, ref[:, 4:], atol=1e-10)
    for layer, k in zip(cache.layers, keys):
        assert torch.allclose(layer.keys, k, atol=1e-10)


def test_select_keeps_slots_with_their_positions():
    model = tiny_model("llama")
    keep = torch.tensor([0, 1, 2, 5, 8])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        cache = new_cache()
        forward_with_cache(model, cache, input_ids=IDS, use_cache=True)
        select_cache(cache, keep)
        assert cache_length(cache) == len(keep)
        # the same keys as a forward over just those tokens at their original positions
        fresh = new_cache()
        allowed = torch.ones(len(keep), len(keep), dtype=torch.bool).tril()
        mask = attention_masks(model.config, allowed, keep, keep, model.dtype)
        forward_with_cache(model, fresh, input_ids=IDS[:, keep], position_ids=keep[None], attention_mask=mask,
                           use_cache=True)
    # the first layer's keys and values depend only on each token and its position (deeper layers' on the
    # context, which differs here)
    assert torch.allclose(cache.layers[0].keys, fresh.layers[0].keys, atol=1e-10)
    assert torch.allclose(cache.layers[0].values, fresh.layers[0].values, atol=1e-10)


def test_slot_layer_compacts_each_rows_slots_in_place():
    """The engine's commit: per row, slots start + index[row] move to start .. start + m - 1, in place."""
    from mtp.decode.slots import Slots

    model = tiny_model("llama")
    ids = IDS.expand(2, -1)
    slots = Slots(2, torch.device("cpu"), capacity=16, bucket=4)
    cache = slots.cache()
    start = 4
    for a, b in ((0, start), (start, ids.shape[1])):
        pos = torch.arange(a, b).expand(2, -1)
        allowed, k_pos = slots.begin(pos, torch.ones(1, b - a, b - a, dtype=torch.bool).tril())
        with torch.no_grad():
            forward_with_cache(model, cache, input_ids=ids[:, a:b], position_ids=pos, use_cache=True,
                               attention_mask=attention_masks(model.config, allowed, pos, k_pos, model.dtype))
        if a == 0:
            slots.keep_all(torch.ones(2, b, dtype=torch.bool))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    storage = [layer.keys.data_ptr() for layer in cache.layers]
    index = torch.tensor([[0, 2, 5], [1, 1, 3]])
    slots.keep(index, torch.ones(2, 3, dtype=torch.bool))
    assert slots.end == start + 3
    assert [layer.keys.data_ptr() for layer in cache.layers] == storage  # moved in place, not reallocated
    for layer, (k, v) in zip(cache.layers, before):
        assert torch.equal(layer.keys[:, :, :start], k[:, :, :start])
        for row in range(2):
            assert torch.equal(layer.keys[row, :, start:start + 3], k[row, :, start + index[row]])
            assert torch.equal(layer.values[row, :, start:start + 3], v[row, :, start + index[row]])


def test_mask_argument_per_layer_type():
    built = []

    def mask_for(kind):
        built.append(kind)
        return torch.zeros(1, 1, 1, 1)

    assert isinstance(mask_argument(tiny_model("llama").config, mask_for), torch.Tensor)
    assert built == ["full_attention"]
    masks = mask_argument(tiny_model("gemma3").config, mask_for)
    assert set(masks) == {"sliding_attention", "full_attention"}


def test_first_layers_runs_a_prefix_of_the_stack_and_restores_it():
    model = tiny_model("gemma3")
    types, n = list(model.config.layer_types), model.config.num_hidden_layers
    with first_layers(model, 1):
        assert len(model.get_decoder().layers) == 1 and model.config.num_hidden_layers == 1
        assert model.config.layer_types == types[:1]
        with torch.no_grad():
            shallow = model(input_ids=IDS, use_cache=False).logits
    assert len(model.get_decoder().layers) == n and model.config.num_hidden_layers == n
    assert model.config.layer_types == types
    assert not torch.allclose(shallow, full_logits(model, IDS))
