"""``--eagle-layers auto``: which target layers an EAGLE-3 drafter taps, measured with the logit lens on the
training text before training starts."""

from __future__ import annotations

import torch

from mtp.analysis.lens import logit_lens
from mtp.model.eagle3 import default_layers

SPECIALIZED = 0.75  # the lens KL below this share of its mid-depth level: the layer reads as next-token output


@torch.inference_mode()
def auto_layers(backbone, blocks: torch.Tensor, max_blocks: int = 8, positions: int = 256) -> tuple[list[int], list]:
    """``--eagle-layers auto``: three taps chosen from the logit lens on the training text (``mtp analyze``'s
    per-layer figure). Mehra et al. (arXiv 2502.09419) find that late layers specialize for the next token:
    read through the unembedding their KL to the output falls from a mid-depth plateau. The high tap is the
    first layer past that onset (KL below ``SPECIALIZED`` x the plateau's median), the last state not yet
    committed to x_{t+1}; the low tap is layer 2 (lexical), the mid tap halfway. Returns the layers and the
    per-layer KL they came from."""
    n = backbone.config.num_hidden_layers
    kl_sum = None
    for ids in blocks[:max_blocks]:
        ids = ids[:positions].to(backbone.device)[None]
        out = backbone(input_ids=ids, output_hidden_states=True)
        kl, _ = logit_lens(backbone, tuple(h[0] for h in out.hidden_states), out.logits[0])
        kl_sum = kl.mean(-1) if kl_sum is None else kl_sum + kl.mean(-1)
    kl = (kl_sum / min(len(blocks), max_blocks)).float().tolist()  # (L + 1,): embeddings .. output
    if n < 6:
        return default_layers(n), kl
    plateau = sorted(kl[1:n])[(n - 1) // 2]
    onset = next((i for i in range(3, n) if kl[i] < SPECIALIZED * plateau), n - 3)
    high = max(onset, 4)
    return sorted({2, (2 + high) // 2, high}), kl
