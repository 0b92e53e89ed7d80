"""Layer analysis through the logit lens (Mehra et al., arXiv 2502.09419, Figs. 2-3).

Every layer's hidden state is read through the model's own final norm and shared unembedding; per layer
we report KL(p_layer || p_final) and how often its top-1 token agrees with the final prediction. The last
entry is the model's own output, so its KL is exactly 0.
"""

from __future__ import annotations

import torch

from mtp.model.trunk import unembed


def lens_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Read a residual-stream state (..., H) through the final norm, unembedding and logit soft-capping."""
    return unembed(model, hidden)


@torch.inference_mode()
def logit_lens(model, hidden_states: tuple, final_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer (embeddings, layer 1, ..., layer N): KL(p_layer || p_final) and top-1 agreement, per position.

    hidden_states: transformers' ``output_hidden_states`` at the scored positions, each (P, H); its last
    entry is already normalized, so the last row uses ``final_logits`` (P, V) itself.
    Returns two (N + 1, P) tensors.
    """
    final = torch.log_softmax(final_logits.to(torch.promote_types(final_logits.dtype, torch.float32)), -1)
    top_final = final.argmax(-1)
    kls, agree = [], []
    for h in hidden_states[:-1]:
        logp = torch.log_softmax(lens_logits(model, h).to(final.dtype), -1)
        kls.append((logp.exp() * (logp - final)).sum(-1).clamp_min(0))
        agree.append(logp.argmax(-1) == top_final)
    kls.append(torch.zeros_like(final[:, 0]))
    agree.append(torch.ones_like(top_final, dtype=torch.bool))
    return torch.stack(kls), torch.stack(agree)


@torch.inference_mode()
def entropy_along(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position of one sequence (L,)."""
    logits = model(input_ids=input_ids.to(model.device)[None]).logits[0]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(logp.exp() * logp).sum(-1)
