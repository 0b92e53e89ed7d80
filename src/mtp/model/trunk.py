"""The backbone's own pieces that heads, analysis and decoding read: its decoder stack, the final norm, the
shared unembedding (final norm, output embedding, soft-capping) and the residual stream recorded by hooks.
Nothing here knows about heads."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mtp.errors import UserError


def decoder_stack(backbone):
    return backbone.get_decoder()


_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def final_norm(backbone) -> nn.Module:
    """The norm applied before the unembedding, found on the decoder stack."""
    decoder = decoder_stack(backbone)
    for name in _NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"{type(backbone).__name__}: cannot find the final norm before the unembedding")


def unembed(backbone, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """The backbone's shared output path: final norm (unless applied), unembedding, soft-capping. (..., H) -> (..., V)"""
    if not normed:
        hidden = final_norm(backbone)(hidden)
    logits = backbone.get_output_embeddings()(hidden)
    cap = getattr(backbone.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextlib.contextmanager
def capture_hidden(backbone, layers: list[int]):
    """Record the residual stream before the final norm: index 0 = embeddings, i = output of layer i.

    Forward hooks on the backbone's own decoder layers, so every architecture works unchanged, and
    gradients flow through the recorded tensors in joint training.
    """
    decoder = decoder_stack(backbone)
    store: dict[int, torch.Tensor] = {}
    handles = []
    if 0 in layers:
        handles.append(decoder.layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: store.__setitem__(0, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    for i in layers:
        if i > 0:
            handles.append(decoder.layers[i - 1].register_forward_hook(
                lambda mod, args, out, i=i: store.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
