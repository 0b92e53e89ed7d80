"""Drive Hugging Face decoders with custom (tree) attention through their public arguments.

Forwarding many candidate tokens against one cached prefix needs a 4-D attention mask: each new token
sees part of the cache (its prefix and its ancestors) and itself, at an explicit position id. The models
take an additive mask of shape (B, 1, Q, KV) as-is; hybrid models (Gemma 3, Qwen2) take a dict with one
mask per layer type, so sliding-window layers get the window applied here, from the position ids. How
transformers takes them (and the KV cache they attend to) lives in :mod:`mtp.hf_compat`.
"""

from __future__ import annotations

import torch

from mtp.errors import UserError
from mtp.hf_compat import mask_argument


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., Q, KV) bool -> (B, 1, Q, KV) float: 0 where attention is allowed, the dtype's min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask if mask.dim() == 4 else mask.reshape(-1, 1, *allowed.shape[-2:])


def layer_mask(config, layer_type: str, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive mask for one attention layer type; sliding windows are applied from position ids."""
    window = getattr(config, "sliding_window", None)
    if layer_type == "sliding_attention" and window is not None:
        allowed = allowed & (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2) < window)
    elif layer_type not in ("full_attention", "sliding_attention"):
        raise UserError(f"attention layer type {layer_type!r} of {config.model_type} is not supported by mtp yet")
    return additive_mask(allowed, dtype)


def attention_masks(config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    dtype: torch.dtype):
    """The ``attention_mask`` argument for a forward over Q new tokens against KV keys (cache + new).

    allowed: (Q, KV) or (B, Q, KV) bool, which key each query may see (causality and tree structure);
    q_pos: (..., Q) and k_pos: (..., KV) position ids of queries and keys, used for sliding windows.
    Hybrid models (a ``layer_types`` list) get a dict with one mask per layer type.
    """
    return mask_argument(config, lambda kind: layer_mask(config, kind, allowed, q_pos, k_pos, dtype))
