"""The one place where "head k predicts token t+1+k" is written, and the losses built on it.

Head 0 is the backbone's next-token head. The multi-token loss is L = sum_k w_k L_k (Gloeckle et al.,
arXiv 2404.19737 sum the n cross-entropies; Medusa, arXiv 2401.10774, decays them with k).
``chunked_head_loss`` computes the unembedding and cross-entropy a sequence chunk at a time, running the
backward per chunk, so no (B, T, V) logits tensor is ever held.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mtp.config import decay_factor
from mtp.errors import UserError

IGNORE = -100


def head_targets(input_ids: torch.Tensor, k: int, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets of head k: at position t, x_{t+1+k}; IGNORE where that lies past the end or is masked.

    input_ids: (B, T); loss_mask: (B, T) bool, False for tokens that are context only (never a target).
    """
    targets = torch.full_like(input_ids, IGNORE)
    shift = 1 + k
    if shift < input_ids.shape[1]:
        targets[:, :-shift] = input_ids[:, shift:]
        if loss_mask is not None:
            targets[:, :-shift][~loss_mask[:, shift:]] = IGNORE
    return targets


def head_weights(n_heads: int, ntp_weight: float = 1.0, schedule: str = "constant") -> list[float]:
    """[w_0 (next token), w_1, ..., w_n]: ``constant`` (all 1) or ``decay:G`` (w_k = G**k, Medusa uses 0.8)."""
    g = decay_factor(schedule)
    ws = [1.0] * n_heads if g is None else [g ** k for k in range(1, n_heads + 1)]
    if ntp_weight < 0:
        raise UserError(f"the next-token loss weight must be >= 0, got {ntp_weight}")
    return [ntp_weight] + ws


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the non-ignored targets (token ids), or against probabilities (float targets of
    the logits' shape), computed in float32 at least."""
    logits = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    if targets.is_floating_point():  # probabilities (..., V): the soft cross-entropy
        return F.cross_entropy(logits, targets.reshape(-1, targets.shape[-1]).to(logits.dtype), reduction="sum")
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


def chunked_head_loss(to_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                      targets: torch.Tensor, scale: float, chunk_tokens: int,
                      backward: bool = True,
                      soft: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy of one head, with its backward, a sequence chunk at a time.

    hidden: (B, T, H) the head's output; to_logits: shared norm + unembedding, (B, c, H) -> (B, c, V).
    Only tokens with a target get logits (prompt tokens of distilled data and each head's last positions
    cost nothing), ``chunk_tokens`` of them at a time. With ``backward``, d(scale * loss)/d(hidden) is
    computed chunk by chunk into a detached copy, then sent through ``hidden``'s graph in one call: at most
    one chunk's (c, V) logits exist at a time.
    ``soft``: flat row indices (c,) -> the teacher's probabilities (c, V) over the same outputs: the loss is then
    the cross-entropy against them (distillation of the whole distribution) at the positions whose hard target
    is valid.
    Returns the detached mean loss (NaN-free: 0 when no target is valid).
    """
    valid = (targets != IGNORE).reshape(-1).nonzero().squeeze(1)  # only scored tokens get logits
    n_valid = max(1, valid.numel())  # a Python int: scale / n_valid keeps full precision
    grad_needed = backward and torch.is_grad_enabled()
    leaf = hidden.detach().requires_grad_(grad_needed)
    flat, flat_targets = leaf.reshape(-1, leaf.shape[-1]), targets.reshape(-1)
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for a in range(0, valid.numel(), max(1, chunk_tokens)):
        rows = valid[a:a + chunk_tokens]
        want = flat_targets[rows][None] if soft is None else soft(rows)[None]
        loss = cross_entropy_sum(to_logits(flat[rows][None]), want)  # (1, c, V) freed after
        if grad_needed:
            (loss * (scale / n_valid)).backward()
        total += loss.detach()
    if grad_needed and hidden.requires_grad and leaf.grad is not None:
        hidden.backward(leaf.grad)
    return total / n_valid
