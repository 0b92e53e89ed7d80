"""vLLM's Medusa layout (``vllm/model_executor/models/medusa.py`` + ``transformers_utils/configs/medusa.py``).

vLLM's Medusa head i reads the target's final hidden state (after its final norm) and computes
``lm_heads[i](blocks[i](h))``, each block ``x + SiLU(W x + b)``. That is exactly an ``mlp`` head with
``--tap final`` (our heads then go to the unembedding without another norm); heads with other taps put the
final norm after their blocks, which Medusa cannot express. Each lm_head is the target's unembedding
(``original_lm_head``: one shared copy); with saved token counts the draft shortlist goes along as
``token_map`` with ``truncated_vocab_size`` (vLLM's own vocabulary truncation).

    config.json        {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size", "vocab_size",
                        "num_heads", "num_hidden_layers", "medusa_fc_bias": true, "original_lm_head": true,
                        "truncated_vocab_size"}
    model.safetensors  blocks.{i}.layers.{j}.weight / .bias, lm_heads.0.weight [, token_map]
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp.decode.run import draft_shortlist
from mtp.errors import UserError
from mtp.io import write_json, write_safetensors


def medusa_tensors(mtp_model, dtype: torch.dtype | None = None, token_map: torch.Tensor | None = None) -> dict:
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    out = {}
    for i, head in enumerate(mtp_model.heads):
        for j, block in enumerate(head.body.blocks):
            out[f"blocks.{i}.layers.{j}.weight"] = cast(block.weight.detach().cpu())
            out[f"blocks.{i}.layers.{j}.bias"] = cast(block.bias.detach().cpu())
    lm = mtp_model.backbone.get_output_embeddings().weight.detach().cpu()
    out["lm_heads.0.weight"] = cast(lm[token_map] if token_map is not None else lm)
    if token_map is not None:
        out["token_map"] = token_map.to(torch.int64)
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_medusa(mtp_model, out: Path, dtype: torch.dtype | None = None) -> Path:
    cfg = mtp_model.config
    if cfg.kind != "mlp" or mtp_model.tap_kind != "final":
        raise UserError("vLLM's medusa runs residual blocks on the final normed state: only mlp heads trained with "
                        "--tap final have that graph")
    if getattr(mtp_model.backbone.config, "final_logit_softcapping", None):
        raise UserError("this backbone soft-caps its logits, which vLLM's medusa heads do not: use eagle3 heads")
    token_map = draft_shortlist(mtp_model, None) if mtp_model.token_counts is not None else None
    tensors = medusa_tensors(mtp_model, dtype, token_map)
    vocab = mtp_model.backbone.get_output_embeddings().weight.shape[0]
    config = {"architectures": ["MedusaModel"], "model_type": "medusa",
              "hidden_size": mtp_model.backbone.config.hidden_size, "vocab_size": vocab,
              "num_heads": cfg.n_heads, "num_hidden_layers": cfg.mlp_layers, "medusa_fc_bias": True,
              "original_lm_head": True,
              "truncated_vocab_size": int(token_map.numel()) if token_map is not None else vocab,
              "torch_dtype": str(tensors["lm_heads.0.weight"].dtype).removeprefix("torch.")}
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(out / "config.json", config, indent=2)
    return out
