"""Training MTP heads: one loop for frozen, joint (full) and LoRA training.

The step follows the memory-efficient order of Gloeckle et al. (arXiv 2404.19737, §2): the backbone runs
once; its outputs are detached into leaves; then for each head in turn its forward, its loss and its
backward into those leaves (the gradients accumulate there) -- the head's logits are freed before the next
head starts, and ``chunked_head_loss`` never holds a (B, T, V) tensor; finally one backward carries the
accumulated gradients through the backbone (none when it is frozen).
"""

from __future__ import annotations

import torch

from mtp.losses import chunked_head_loss, cross_entropy_sum, head_targets
from mtp.model.mtp import MTPModel


def mtp_step(model: MTPModel, input_ids: torch.Tensor, weights: list[float], *, train_backbone: bool,
             chunk_tokens: int = 4096, loss_mask: torch.Tensor | None = None, grad_scale: float = 1.0,
             hidden: list[torch.Tensor] | None = None) -> list[float]:
    """Forward and backward of one micro-batch in the memory-efficient order; returns the loss of each head.

    input_ids: (B, T). weights: [w_0, ..., w_n]; the gradient is that of grad_scale * sum_k w_k L_k, with
    L_k the mean cross-entropy of head k. ``hidden``: the backbone's tapped states, precomputed (frozen
    mode with a hidden-state cache), which skips the backbone.
    """
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    final = None
    if hidden is None:
        with torch.set_grad_enabled(train_backbone):
            final, states = model.trunk(input_ids)
    else:
        states = hidden
    leaves = [s.detach().requires_grad_(train_backbone) for s in states]  # the trunk boundary
    losses = []
    # Head 0: the backbone's own next-token head, on the final normed state (trained only with the backbone).
    targets = head_targets(input_ids, 0, loss_mask)
    if final is not None:
        final_leaf = final.detach().requires_grad_(train_backbone and weights[0] > 0)
        losses.append(chunked_head_loss(lambda h: model.logits(h, normed=True), final_leaf, targets,
                                        weights[0] * grad_scale, chunk_tokens, backward=final_leaf.requires_grad))
    else:  # cached hidden states of the last layer: the next-token loss for the log only
        with torch.no_grad():
            losses.append(chunked_head_loss(model.logits, leaves[-1], targets, 0.0, chunk_tokens, backward=False))
    for k in range(1, model.n_heads + 1):
        z = model.head_hidden(k, leaves, position_ids)  # (B, T, H)
        losses.append(chunked_head_loss(model.logits, z, head_targets(input_ids, k, loss_mask),
                                        weights[k] * grad_scale, chunk_tokens, backward=weights[k] > 0))
        del z
    if train_backbone:
        outs, grads = [], []
        if final is not None and final_leaf.grad is not None:
            outs.append(final)
            grads.append(final_leaf.grad)
        for s, leaf in zip(states, leaves):
            if leaf.grad is not None:
                outs.append(s)
                grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)
    return [float(x) for x in losses]


def naive_step(model: MTPModel, input_ids: torch.Tensor, weights: list[float],
               loss_mask: torch.Tensor | None = None) -> list[float]:
    """Reference order: all heads' logits (K, B, T, V) alive at once, one backward. For tests and benchmarks."""
    logits = model(input_ids)  # (K, B, T, V)
    total, losses = 0.0, []
    for k in range(logits.shape[0]):
        targets = head_targets(input_ids, k, loss_mask)
        loss = cross_entropy_sum(logits[k], targets) / (targets != -100).sum().clamp_min(1)
        total = total + weights[k] * loss
        losses.append(float(loss.detach()))
    total.backward()
    return losses
