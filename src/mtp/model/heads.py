"""MTP heads on a backbone's hidden states, the taps that feed them, and the shared unembedding.

Head k (k = 1 .. n) predicts token t+1+k from the hidden states at position t (head 0 is the backbone's
own next-token head). Every head maps a hidden state (B, T, H) to a hidden state that the backbone's
final norm and unembedding turn into logits: nothing vocabulary-sized is copied per head.

Head kinds live in a registry: adding one is a class plus one ``@register_head`` line.
- ``mlp`` (Medusa, arXiv 2401.10774): residual blocks h + SiLU(W h + b), zero-initialized, so a new head
  starts as the identity and reproduces the next-token distribution;
- ``transformer`` (Gloeckle et al., arXiv 2404.19737): one decoder layer of the backbone's own class,
  built from its config (never a forked modeling file), optionally a copy of the backbone's last layer;
- ``hydra`` (sequentially dependent heads, Ankner et al., arXiv 2402.05109): an ``mlp`` head that also
  reads the embeddings of the k tokens between its position and its target (x_{t+1} .. x_{t+k}). While
  decoding these are the step's certain root token and the draft's own tokens on the path, so head k
  predicts knowing what precedes its token instead of guessing across every path (``sequential``).

Taps say which hidden state a head reads: ``last`` (the last layer's output, before the final norm),
``layer:i`` (the output of layer i; 0 is the embeddings) or ``whs`` (a softmax-normalized weighting of
the embeddings and every layer's output, one weight vector per head; Mehra et al., arXiv 2502.09419).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mtp.config import tap_layer
from mtp.errors import UserError
from mtp.hf_compat import cache_length, forward_with_cache, rotary_embeddings
from mtp.model.attention import layer_mask
from mtp.model.registry import register_head
from mtp.model.trunk import decoder_stack

class Head(nn.Module):
    kind = ""
    sequential = False
    """True: forward also takes ``prev``, the embeddings of the tokens between the position and the target."""

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor, cache=None, attn=None) -> torch.Tensor:
        """(B, T, H) -> (B, T, H); ``cache``: the head's own KV cache (transformer heads, decoding);
        ``attn``: (allowed (B, T, past+T) bool, q_pos (B, T), k_pos (B, past+T)) for per-row masks."""
        raise NotImplementedError


@register_head("mlp")
class MLPHead(Head):
    def __init__(self, backbone, layers: int = 1, **_):
        super().__init__()
        size = backbone.config.hidden_size
        self.blocks = nn.ModuleList(nn.Linear(size, size) for _ in range(layers))
        for block in self.blocks:  # zero init: the head starts as the identity
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, h, position_ids, cache=None, attn=None):
        for block in self.blocks:
            h = h + nn.functional.silu(block(h))  # (B, T, H)
        return h


@register_head("hydra")
class SequentialMLPHead(Head):
    """Head k: h + W [e(x_{t+1}); ...; e(x_{t+k})], then the ``mlp`` head's residual blocks. ``W`` and the
    blocks start at zero, so a new head is the identity, like ``mlp``; the token embeddings are the
    backbone's own (RMS-normalized, not trained here)."""

    sequential = True

    def __init__(self, backbone, layers: int = 1, index: int = 1, **_):
        super().__init__()
        size = backbone.config.hidden_size
        self.index = index
        self.mix = nn.Linear(index * size, size)
        self.blocks = nn.ModuleList(nn.Linear(size, size) for _ in range(layers))
        for lin in [self.mix, *self.blocks]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h, position_ids, cache=None, attn=None, prev=None):
        if prev is None:
            raise ValueError("a hydra head needs prev: the embeddings of the tokens before its target")
        h = h + self.mix(prev)  # prev: (B, T, k * H)
        for block in self.blocks:
            h = h + nn.functional.silu(block(h))
        return h


@register_head("transformer")
class TransformerHead(Head):
    """One decoder layer of the backbone's architecture with its own (single-layer) config."""

    def __init__(self, backbone, init_from_last: bool = True, **_):
        super().__init__()
        decoder = decoder_stack(backbone)
        last = decoder.layers[-1]
        config = copy.deepcopy(backbone.config)
        self.layer_type = (getattr(config, "layer_types", None) or ["full_attention"])[-1]
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = [self.layer_type]
        self.config = config
        self.layer = type(last)(config, 0)
        if init_from_last:
            self.layer.load_state_dict(last.state_dict())
        elif hasattr(backbone, "_init_weights"):  # from scratch: the backbone's own initialization scheme
            self.layer.apply(backbone._init_weights)
        self.layer.to(dtype=next(last.parameters()).dtype)
        # The rotary embedding has no trainable weights: borrow the backbone's, never copy it.
        self._rotary = [decoder.rotary_emb]

    def _position_embeddings(self, h, position_ids):
        return rotary_embeddings(self._rotary[0], h, position_ids, self.layer_type)

    def forward(self, h, position_ids, cache=None, attn=None):
        past = cache_length(cache)
        t = h.shape[1]
        mask = None
        window = getattr(self.config, "sliding_window", None)
        if attn is not None:  # per-row masks from the decoding engine (holes, left padding)
            allowed, q_pos, k_pos = attn
            mask = layer_mask(self.config, self.layer_type, allowed, q_pos, k_pos, h.dtype)
        elif past or (self.layer_type == "sliding_attention" and window is not None and t > window):
            # Explicit causal mask against the cache; otherwise the attention kernel's own causal path.
            q_pos = position_ids[0]
            k_pos = torch.cat([torch.arange(past, device=h.device), q_pos]) if past else q_pos
            allowed = torch.ones(t, past + t, dtype=torch.bool, device=h.device).tril(past)
            mask = layer_mask(self.config, self.layer_type, allowed, q_pos, k_pos, h.dtype)
        out = forward_with_cache(self.layer, cache, h, attention_mask=mask, position_ids=position_ids,
                                 use_cache=cache is not None,
                                 position_embeddings=self._position_embeddings(h, position_ids))
        return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- taps


def parse_tap(tap: str, n_layers: int) -> tuple[str, int | None]:
    """``last`` | ``final`` (the last layer's output after the final norm: Medusa's own graph, whose heads
    then go to the unembedding without another norm; what vLLM's ``medusa`` runs) | ``layer:i`` (0 =
    embeddings, n_layers = last) | ``whs``."""
    i = tap_layer(tap)
    if i is None:
        return tap, None
    if 0 <= i <= n_layers:
        return "layer", i
    raise UserError(f"tap {tap!r}: the layer must be 0..{n_layers} (0 = embeddings)")


def whs_init(n_states: int) -> torch.Tensor:
    """WHS logits putting 90% of the weight on the last layer: a fresh head reads almost what ``last`` reads."""
    logits = torch.zeros(n_states)
    if n_states > 1:
        logits[-1] = torch.log(torch.tensor(0.9 * (n_states - 1) / 0.1))
    return logits


class TappedHead(nn.Module):
    """A head body plus its tap: with WHS, its own softmax-normalized weight per hidden state."""

    def __init__(self, body: Head, whs_states: int | None = None, norm: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.whs = nn.Parameter(whs_init(whs_states)) if whs_states else None
        # tap ``final``: the backbone's final norm first (borrowed, never a parameter of the head)
        self._norm = [norm] if norm is not None else []

    def forward(self, states: list[torch.Tensor], position_ids: torch.Tensor, cache=None, attn=None,
                prev: torch.Tensor | None = None) -> torch.Tensor:
        if self._norm:
            h = self._norm[0](states[0])
        elif self.whs is None:
            h = states[0]
        else:
            w = torch.softmax(self.whs.float(), -1).to(states[0].dtype)  # (L+1,)
            h = sum(w[i] * s for i, s in enumerate(states))  # (B, T, H), no stacked copy
        own = self.body_dtype
        extra = {} if prev is None else {"prev": prev.to(own)}
        if own == h.dtype:
            return self.body(h, position_ids, cache, attn, **extra)
        # full-precision heads on a low-precision backbone (training): cast in, and back for the unembedding
        return self.body(h.to(own), position_ids, cache, attn, **extra).to(h.dtype)

    @property
    def body_dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype
