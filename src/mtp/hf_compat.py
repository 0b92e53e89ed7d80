"""The one place where mtp calls transformers in a way that depends on its version.

Everything here changed, or is announced to change, between transformers releases that pyproject allows:

- the keyword of a forward's KV cache: ``past_key_values`` in 5.0, ``cache`` in newer 5.x releases, where
  the old name warns ("`past_key_values` is deprecated and will be removed in version 5.40.0 for
  `LlamaModel.forward`. Use `cache` instead.") and is removed in 5.40. :func:`forward_with_cache` passes
  the cache under whichever name the called module takes (:func:`cache_keyword`);
- the cache object's internals: mtp keeps its own slot layout in a :class:`~transformers.DynamicCache`
  (rows of a batch own their slots, holes are masked) and edits entries along the sequence axis, which no
  public method of the cache does (``crop`` only drops a suffix of equal length in every layer):
  :func:`new_cache`, :func:`cache_length`, :func:`truncate_cache`, :func:`select_cache`; the decoding engine's preallocated cache, :class:`SlotLayer` (one of transformers'
  cache layers, written in place like its ``StaticLayer``, but at the engine's slots and read over a
  length bucket), :func:`slot_cache`;
- the ``attention_mask`` argument: hybrid models take a dict with one custom 4-D mask per layer type
  (:func:`mask_argument`), rotary embeddings per layer type (:func:`rotary_embeddings`), and a forward
  through the first layers only (:func:`first_layers`).

``TESTED`` is the newest transformers release this module is tested against (tests/test_hf_compat.py and
the strict-warnings run, ``make test-strict``); pyproject's upper bound is that version, and moves when
this module has been checked against a newer release.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable

import torch
from torch import nn

TESTED = "5.24.0"

_CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


# ----------------------------------------------------------------------------- the cache argument


@functools.lru_cache(maxsize=1)
def _installed_cache_keyword() -> str:
    """The cache keyword of the installed transformers, read once from its reference decoder (Llama)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.lru_cache(maxsize=None)
def _keyword_of(forward) -> str:
    try:
        params = inspect.signature(forward).parameters  # follows the decorators' __wrapped__ chain
    except (TypeError, ValueError):
        params = {}
    for name in _CACHE_KEYWORDS:
        if name in params:
            return name
    # a wrapper that passes **kwargs on (peft's PeftModel, a compiled module): the installed library's name
    return _installed_cache_keyword()


def cache_keyword(module) -> str:
    """The keyword under which ``module``'s forward takes its KV cache: ``cache`` or ``past_key_values``.

    Read from the signature of its class's forward (a model, a decoder stack, one decoder layer or one
    attention module), so a model that lags behind the library's renaming still gets its own name.
    """
    return _keyword_of(type(module).forward if isinstance(module, nn.Module) else module)


def forward_with_cache(module, cache, *args, **kwargs):
    """``module(*args, **kwargs)`` with the KV ``cache`` under the keyword this transformers takes (nothing
    is passed for ``cache=None``). Pass ``use_cache`` yourself where the module takes it."""
    if cache is not None:
        kwargs[cache_keyword(module)] = cache
    return module(*args, **kwargs)


# ----------------------------------------------------------------------------- cache objects


def new_cache():
    """An empty dynamic KV cache of full layers. No config is passed on purpose: with one, sliding-window
    layers would drop old keys themselves, while mtp applies windows through its own masks and relies on
    every slot staying where it was written."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_length(cache) -> int:
    """Slots in the cache (its first layer; 0 for None or an empty cache)."""
    return 0 if cache is None else int(cache.get_seq_length())


def _kv_layers(cache):
    """The cache's layers that hold (B, heads, slots, head_dim) keys and values."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            yield layer


def truncate_cache(cache, length: int) -> None:
    """Drop entries beyond ``length`` in every layer (layers already shorter stay as they are: a forward
    through the first layers only grows those)."""
    for layer in _kv_layers(cache):
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def select_cache(cache, index: torch.Tensor) -> None:
    """Keep only the slots at ``index`` (1-D, in that order), in every layer, for every row."""
    for layer in _kv_layers(cache):
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


# ----------------------------------------------------------------------------- preallocated cache


class SlotView:
    """What every :class:`SlotLayer` of one slot layout reads before a forward: the first slot it writes
    (``start``), how many slots the attention reads (``length``, the new ones and a bucket's padding
    included), and how many the layers hold (``capacity``). Set by :class:`mtp.decode.slots.Slots`."""

    def __init__(self, capacity: int):
        self.start, self.length, self.capacity = 0, 0, capacity


def _slot_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer's keys and values, preallocated (B, heads, capacity, D) and written in place at
        ``view.start``; attention reads the first ``view.length`` slots (masked slots included). The layout
        (which slot holds what, which are holes) is the engine's: nothing here moves on its own."""

        def __init__(self, view: SlotView):
            super().__init__()
            self.view = view

        def lazy_initialization(self, key_states, value_states):
            b, h, _, d = key_states.shape
            self.device = key_states.device
            shape = (b, h, self.view.capacity)
            self.keys = torch.zeros(*shape, d, dtype=key_states.dtype, device=self.device)
            self.values = torch.zeros(*shape, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            s, q = self.view.start, key_states.shape[-2]
            self.keys[:, :, s:s + q] = key_states
            self.values[:, :, s:s + q] = value_states
            n = self.view.length
            return self.keys[:, :, :n], self.values[:, :, :n]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.view.length, 0

        def get_seq_length(self) -> int:
            return self.view.start

        def get_max_length(self) -> int:
            return self.view.capacity

        def grow(self, capacity: int) -> None:
            """Reallocate to ``capacity`` slots, keeping what is written."""
            if not self.is_initialized or self.keys.shape[2] >= capacity:
                return
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :old.shape[2]] = old
                setattr(self, name, new)

        def compact(self, start: int, width: int, index: torch.Tensor) -> None:
            """Per row, move slots ``start + index[row]`` (index (B, m), within ``width`` slots from ``start``)
            to ``start .. start + m - 1``, in place."""
            if not self.is_initialized:
                return
            m = index.shape[1]
            for t in (self.keys, self.values):
                idx = index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                t[:, :, start:start + m] = t[:, :, start:start + width].gather(2, idx)

        # rows joining and leaving a running batch (continuous batching)

        def extend(self, other: "SlotLayer") -> None:
            """Append ``other``'s rows (same capacity) after this layer's."""
            self.keys = torch.cat([self.keys, other.keys])
            self.values = torch.cat([self.values, other.values])

        def select(self, rows: torch.Tensor) -> None:
            """Keep only the rows ``rows`` (1-D), in that order."""
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)

        def gather_slots(self, order: torch.Tensor) -> None:
            """Per row, slot ``order[row, j]`` moves to slot j (order (B, m): a row's kept slots, in order)."""
            m = order.shape[1]
            for t in (self.keys, self.values):
                idx = order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                t[:, :, :m] = t.gather(2, idx)

    return SlotLayer


_SLOT_LAYER = None


def slot_cache(view: SlotView):
    """A transformers :class:`~transformers.Cache` of :class:`SlotLayer` s sharing ``view`` (layers are
    created as the model's layers first write, as in a dynamic cache)."""
    global _SLOT_LAYER
    from transformers.cache_utils import Cache

    if _SLOT_LAYER is None:
        _SLOT_LAYER = _slot_layer_class()
    return Cache(layer_class_to_replicate=functools.partial(_SLOT_LAYER, view))


# ----------------------------------------------------------------------------- masks and layers


def layer_types(config) -> list[str] | None:
    """The per-layer attention types of a hybrid model (Gemma 3, Qwen2), or None."""
    return getattr(config, "layer_types", None) or None


def uniform_layer_type(config) -> str:
    """The attention type of every layer of a model without per-layer types."""
    uses_window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return "sliding_attention" if uses_window else "full_attention"


def mask_argument(config, mask_for: Callable[[str], torch.Tensor]):
    """The ``attention_mask`` argument carrying custom 4-D masks, ``mask_for(layer_type)`` building each:
    hybrid models take a dict {layer type: mask}, which their forward uses as-is instead of building its
    own; other models take the one mask, used as-is."""
    types = layer_types(config)
    if not types:
        return mask_for(uniform_layer_type(config))
    return {kind: mask_for(kind) for kind in set(types)}


def rotary_embeddings(rotary: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    """(cos, sin) of a decoder's rotary embedding; per layer type where it has one rope per type (Gemma 3)."""
    if _takes_layer_type(type(rotary).forward):
        return rotary(h, position_ids, layer_type)
    return rotary(h, position_ids)


@functools.lru_cache(maxsize=None)
def _takes_layer_type(forward) -> bool:
    return "layer_type" in inspect.signature(forward).parameters  # read once per class, not per decoding step


@contextlib.contextmanager
def first_layers(backbone, n: int):
    """Within the block, the backbone's forwards run its first ``n`` decoder layers only (then the final
    norm and the unembedding: the logit lens). The decoder stack reads its layers and the config's
    ``num_hidden_layers`` / ``layer_types``; all are restored afterwards."""
    decoder = backbone.get_decoder()
    config = backbone.config
    full, count, types = decoder.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
    decoder.layers = nn.ModuleList(list(full)[:n])
    config.num_hidden_layers = n
    if types:
        config.layer_types = types[:n]
    try:
        yield
    finally:
        decoder.layers = full
        config.num_hidden_layers = count
        if types:
            config.layer_types = types


def add_lora(backbone, lora: dict):
    """peft's LoRA wrapper around ``backbone`` (``lora``: LoraConfig's fields). peft 0.21 reads transformers'
    deprecated ``is_gradient_checkpointing`` inside ``get_peft_model``: that notice is about peft's code, which
    no call of ours can change, so it is silenced here rather than shown to every ``--mode lora`` user."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(backbone, LoraConfig(**lora))


FLOAT32_ATTENTION = "mtp_sdpa_float32"  # transformers' sdpa attention, computed in float32 (float32_attention)


PER_QUERY_MAX = 128  # queries of one forward attended one by one (decoding steps, tree verifies); more: a prefill


def _sdpa_float32(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query (B, Hq, Q, D), key / value (B, Hkv, L, D), the mask (B, 1, Q, L)
    additive or boolean; returns (B, Q, Hq, D). Up to PER_QUERY_MAX queries with a mask, each query attends to
    exactly the keys its mask shows, gathered in cache order, in one float32 call of one query (the same call a
    one-token decode makes): its result does not depend on what else the forward holds."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    b, heads, q_len, d = query.shape
    if attention_mask is None or q_len > PER_QUERY_MAX or attention_mask.dim() != 4:
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              scaling=scaling, dropout=dropout, **kwargs)
        return out.to(dtype), weights
    picks = _visible_keys(attention_mask, key.shape[2])
    gqa = key.shape[1] != heads
    keys, values, queries = key.float(), value.float(), query.float()  # once per layer, not per query
    out = torch.empty(b, q_len, heads, d, dtype=dtype, device=query.device)
    for r in range(b):
        for i in range(q_len):
            idx = picks[r][i]
            k = keys[r:r + 1, :, idx] if isinstance(idx, slice) else keys[r:r + 1].index_select(2, idx)
            v = values[r:r + 1, :, idx] if isinstance(idx, slice) else values[r:r + 1].index_select(2, idx)
            a = F.scaled_dot_product_attention(queries[r:r + 1, :, i:i + 1], k, v, scale=scaling, enable_gqa=gqa)
            out[r, i] = a[0, :, 0].to(dtype)
    return out, None


_PICKS: list = [None, None]  # the last mask seen and its per-query key picks (every layer of a forward shares it)


def _visible_keys(mask, length: int) -> list[list]:
    """Per row and query, the keys it sees: a slice when they are a prefix of the cache, else their indices."""
    import torch

    if _PICKS[0] is mask:
        return _PICKS[1]
    visible = (mask if mask.dtype == torch.bool else mask == 0)[:, 0, :, :length]
    counts = visible.sum(-1).tolist()
    prefix = (visible.cumsum(-1) == torch.arange(1, length + 1, device=mask.device)).sum(-1).tolist()
    picks = [[slice(0, c) if p == c else visible[r, i].nonzero().squeeze(-1)
              for i, (c, p) in enumerate(zip(cs, ps))] for r, (cs, ps) in enumerate(zip(counts, prefix))]
    _PICKS[:] = [mask, picks]
    return picks


@contextlib.contextmanager
def float32_attention(model):
    """Within the block a bfloat16 / float16 model's attention (transformers' sdpa) runs in float32 on its bf16
    queries, keys and values, each query of a decoding step or tree verify alone over exactly the keys it sees
    (:func:`_sdpa_float32`), and its output is rounded back once. In bfloat16, transformers computes one query
    token's attention in another layout than several tokens' (grouped queries packed, ``pack_gqa``, against keys
    repeated), and the two round differently: a tree verify and a one-token decode of the same position then
    differ in a few dozen of 576 numbers after the first layer, enough to flip the greedy pick at a near-tie. In
    float32 the two layouts still differ in a last bit now and then, which bfloat16 rounding can carry on; one
    query over its own keys is the same call either way. Weights and matrix products stay in the model's dtype
    (batch-invariant on the CPU measured, docs/results/bf16_identity.md). Other attention implementations, and
    float32 models, are left alone. One decoding thread at a time (the key picks of the last mask are kept)."""
    import torch

    configs = {id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()]
               if c is not None and getattr(c, "_attn_implementation", None) == "sdpa"}
    if not configs or model.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT32_ATTENTION, sdpa_mask)
    for c in configs.values():
        c._attn_implementation = FLOAT32_ATTENTION
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = "sdpa"
