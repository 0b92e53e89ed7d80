"""The Hugging Face-format EAGLE-3 checkpoint, as vLLM's ``llama_eagle3.py`` and SGLang load it and
llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/llama.py``) reads it.

    config.json         a one-layer Llama config (architectures LlamaForCausalLMEagle3) with
                        draft_vocab_size, target_hidden_size, eagle_aux_hidden_state_layer_ids,
                        norm_before_residual = false
    model.safetensors   fc.weight [H, 3 Ht]; midlayer.self_attn.{q,k,v}_proj.weight [*, 2 H], o_proj;
                        midlayer.mlp.{gate,up,down}_proj.weight; midlayer.{input_layernorm, hidden_norm,
                        post_attention_layernorm}.weight; norm.weight; lm_head.weight [Vd, H];
                        d2t int64 [Vd] (target id = draft id + d2t); t2d bool [V] (which target ids are drafted);
                        both only when Vd < V (vLLM refuses a d2t it has no parameter for)

Embeddings are the target's (not stored): vLLM and llama.cpp share the target's when the draft has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtp.errors import UserError
from mtp.io import write_json, write_safetensors
from mtp.model.eagle3 import export_config

TENSORS = ("fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
           "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight",
           "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "midlayer.input_layernorm.weight",
           "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight", "norm.weight",
           "lm_head.weight", "d2t", "t2d")


def eagle3_tensors(mtp_model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors from an MTPModel with eagle3 heads (floating ones cast to ``dtype``)."""
    head = mtp_model.eagle
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    out = {}
    for name in TENSORS[:-2]:
        t = state[name]
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    if head.d2t.numel() < head.vocab_size:  # vLLM has no d2t parameter for a full draft vocabulary
        out["d2t"] = state["d2t"].to(torch.int64).contiguous().clone()
        t2d = torch.zeros(head.vocab_size, dtype=torch.bool)
        t2d[head.draft_ids.cpu()] = True
        out["t2d"] = t2d
    return out


def write_eagle3(mtp_model, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the folder (config.json + model.safetensors) into ``out``, which the caller has checked."""
    head = mtp_model.eagle
    tensors = eagle3_tensors(mtp_model, dtype)
    config = export_config(head, mtp_model.backbone.config, mtp_model.tapped)
    config["torch_dtype"] = str(tensors["fc.weight"].dtype).removeprefix("torch.")
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(out / "config.json", config, indent=2)
    return out


def read_eagle3(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an EAGLE-3 folder; a one-line error when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(folder / "model.safetensors")
    except (OSError, ValueError, RecursionError, SafetensorError) as e:
        raise UserError(f"{folder} is not a readable EAGLE-3 checkpoint ({type(e).__name__}: {e})") from None
    missing = [n for n in TENSORS[:-2] if n not in tensors]
    if not isinstance(config, dict) or missing or "draft_vocab_size" not in config:
        raise UserError(f"{folder} is not an EAGLE-3 checkpoint (missing {missing[:3] or 'draft_vocab_size'})")
    return config, tensors
