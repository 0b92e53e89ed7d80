"""EAGLE-3 draft head (Li et al., arXiv 2503.01840), in the graph that vLLM and llama.cpp run.

The one draft format that vLLM (``method: "eagle3"``), SGLang (``EAGLE3``) and llama.cpp
(``--spec-type draft-eagle3``) all load. Read from vLLM's ``model_executor/models/llama_eagle3.py`` and
llama.cpp's ``src/models/eagle3.cpp`` (default ``norm_before_residual = false``):

    target states at three layers (l, m, h), each the *input* of that layer (the residual stream; 0 = the
    embeddings): (B, T, 3 Ht) --fc--> g (B, T, H)                          (Mehra's weighted hidden states)
    drafter input at position t: token x_{t+1} and g_t; on later draft steps the drafted token and the
    drafter's own previous output a (its pre-norm state) in place of g:
        x = [input_layernorm(embed(token)); hidden_norm(g)]                (2 H)
        r = g + o_proj(attention(q_proj x, k_proj x, v_proj x))            (RoPE at position t, own KV cache)
        a = r + mlp(post_attention_layernorm(r))                           (Gloeckle's transformer-layer head)
        logits over the draft vocabulary = lm_head(norm(a)); target id = draft id + d2t[draft id]

Embeddings come from the target (never stored here). One decoder layer drafts autoregressively: ``a`` is
fed back as the next step's hidden state. Transformers' own Llama attention, MLP, norms and rotary
embedding are used (their q/k/v projections read 2 H); no modeling file is forked.

Training-time test (EAGLE-3 §3.2) is :meth:`Eagle3Head.unroll`: draft step j sees its own outputs of
steps < j in place of the target's states, with ground-truth tokens and RoPE positions t + j, attending
to the target-state keys up to t and to its own keys of earlier steps at the same slot -- exactly the
cache a chain drafted after position t holds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mtp.errors import UserError
from mtp.hf_compat import forward_with_cache, new_cache
from mtp.model.heads import Head
from mtp.model.registry import register_head
from mtp.model.trunk import final_norm


def default_layers(n_layers: int) -> list[int]:
    """vLLM's and llama.cpp's default taps: (2, L // 2, L - 3), each a layer's input (0 = embeddings).
    Models under 6 layers (tests) get (0, L // 2, L), L being the last layer's output."""
    if n_layers >= 6:
        return [2, n_layers // 2, n_layers - 3]
    return [0, n_layers // 2, n_layers]


def parse_layers(spec: str | list, n_layers: int) -> list[int] | str:
    """``--eagle-layers``: ``default``, ``auto`` (returned as is, resolved from measurements) or three
    comma-separated layer ids 0 .. n_layers (a layer's input; n_layers = the last layer's output)."""
    if isinstance(spec, (list, tuple)):
        ids = list(spec)
    elif spec == "default":
        return default_layers(n_layers)
    elif spec == "auto":
        return "auto"
    else:
        try:
            ids = [int(x) for x in str(spec).split(",")]
        except ValueError:
            ids = []
    if len(ids) != 3 or not all(isinstance(i, int) and 0 <= i <= n_layers for i in ids) or len(set(ids)) != 3:
        raise UserError(f"--eagle-layers {spec!r}: give three different layer ids in 0..{n_layers} "
                        f"(e.g. {','.join(map(str, default_layers(n_layers)))}), default or auto")
    return sorted(ids)


INIT_LOGIT_SCALE = 0.3
def drafter_config(target_config, draft_vocab_size: int):
    """A one-layer Llama config with the target's sizes, rope and vocabulary: what the exported
    ``config.json`` holds and what vLLM builds its drafter from."""
    from transformers import LlamaConfig

    t = getattr(target_config, "get_text_config", lambda: target_config)()
    heads = t.num_attention_heads
    rope = getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(t, "rope_theta",
                                                                                                 10000.0)}
    if "full_attention" in rope:  # per-layer-type rope (Gemma 3): the global layers' rope
        rope = rope["full_attention"]
    config = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=getattr(t, "num_key_value_heads", None) or heads,
                       head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
                       rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6), hidden_act="silu",
                       max_position_embeddings=t.max_position_embeddings, rope_parameters=dict(rope),
                       attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


class Eagle3Layer(nn.Module):
    """The drafter's decoder layer (``midlayer`` in EAGLE-3 checkpoints)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx=0)
        d = self.self_attn.head_dim
        # attention reads [embedding; fused state]: 2 H inputs
        self.self_attn.q_proj = nn.Linear(2 * h, config.num_attention_heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=False)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)

    def forward(self, embeds, hidden, position_embeddings, mask=None, cache=None):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1)  # (B, T, 2H)
        attn = forward_with_cache(self.self_attn, cache, x, position_embeddings=position_embeddings,
                                  attention_mask=mask)
        r = hidden + attn[0]
        return r + self.mlp(self.post_attention_layernorm(r))  # (B, T, H): the pre-norm output


@register_head("eagle3")
class Eagle3Head(Head):
    """fc + one decoder layer + norm + lm_head over a draft vocabulary (``draft_ids``: target ids, ascending)."""

    sequential = True
    autoregressive = True

    def __init__(self, backbone, layers: list[int] | None = None, draft_ids: torch.Tensor | None = None, **_):
        super().__init__()
        target = backbone.config
        n_layers = target.num_hidden_layers
        self.layers = list(layers) if layers is not None else default_layers(n_layers)
        vocab = backbone.get_output_embeddings().weight.shape[0]
        if draft_ids is None:
            draft_ids = torch.arange(vocab)
        draft_ids = torch.as_tensor(draft_ids, dtype=torch.long).sort().values
        if draft_ids.numel() < 1 or int(draft_ids[-1]) >= vocab or int(draft_ids[0]) < 0 or \
                draft_ids.unique().numel() != draft_ids.numel():
            raise UserError(f"the EAGLE-3 draft vocabulary must hold distinct token ids in 0..{vocab - 1}")
        self.config = drafter_config(target, draft_ids.numel())
        h, ht = self.config.hidden_size, target.hidden_size
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        self.fc = nn.Linear(3 * ht, h, bias=False)
        self.midlayer = Eagle3Layer(self.config)
        self.norm = LlamaRMSNorm(h, eps=self.config.rms_norm_eps)
        self.lm_head = nn.Linear(h, draft_ids.numel(), bias=False)
        self.register_buffer("d2t", draft_ids - torch.arange(draft_ids.numel()))  # target id = draft id + d2t
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.vocab_size = vocab
        self._init_weights(backbone, draft_ids)

    @torch.no_grad()
    def _init_weights(self, backbone, draft_ids):
        """The head starts as (a softened) target's reading of its highest tapped layer: ``fc`` passes that layer
        through, the residual branches (``o_proj``, ``down_proj``) start at zero, and the final norm and the
        lm_head are the target's (its final norm, its unembedding's rows for the draft vocabulary). Other
        linear layers as Llama initializes them (normal, std = initializer_range). A fully random start
        makes confident random predictions (cross-entropy ~25 on SmolLM2) that training first has to undo."""
        std = getattr(self.config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
        h = self.config.hidden_size
        if self.fc.weight.shape[1] == 3 * h:
            self.fc.weight.zero_()
            self.fc.weight[:, 2 * h:] = torch.eye(h)
        self.midlayer.self_attn.o_proj.weight.zero_()
        self.midlayer.mlp.down_proj.weight.zero_()
        norm = final_norm(backbone)
        w = getattr(norm, "weight", None)
        # Gemma-style norms scale by (1 + w): only a plain RMSNorm weight carries over
        if w is not None and w.shape == self.norm.weight.shape and "gemma" not in type(norm).__name__.lower():
            self.norm.weight.copy_(w.float())
        # ... scaled down: a fresh drafter's state read through the target's output path makes confident
        # wrong predictions; at 0.3x the logits start soft (SmolLM2: step-0 loss 8 instead of 21, and 5.8
        # instead of 8.0 after 14 steps in a side-by-side race; the weight is learned)
        self.norm.weight.mul_(INIT_LOGIT_SCALE)
        self.lm_head.weight.copy_(backbone.get_output_embeddings().weight[draft_ids.to(
            backbone.get_output_embeddings().weight.device)].float())

    @torch.no_grad()
    def init_from_target(self, backbone, layer: int | None = None) -> int:
        """Start the decoder layer as a copy of the target's decoder layer ``layer`` (0-based; default the one
        whose input is the highest tap, which ``fc`` passes through): q / k / v read the fused state with that
        layer's projections (the token-embedding half starts at zero), o_proj, the MLP and both norms are that
        layer's. The first draft step then computes exactly what the target computes at that depth, and
        training moves it from there instead of from noise. Llama-style layers only (Llama, SmolLM2, Qwen2:
        whose q / k / v biases have no place in the EAGLE-3 format and are dropped). Returns the layer copied."""
        layers = backbone.get_decoder().layers
        layer = min(self.layers[-1], len(layers) - 1) if layer is None else layer
        if not 0 <= layer < len(layers):
            raise UserError(f"--draft-init target:{layer}: the target has layers 0..{len(layers) - 1}")
        src, dst = layers[layer], self.midlayer
        h = self.config.hidden_size
        pairs = [(src.self_attn.o_proj, dst.self_attn.o_proj)] + \
            [(getattr(src.mlp, n, None), getattr(dst.mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")] + \
            [(getattr(src, n, None), getattr(dst, m)) for n, m in (("input_layernorm", "hidden_norm"),
                                                                  ("post_attention_layernorm",
                                                                   "post_attention_layernorm"))]
        qkv = [(getattr(src.self_attn, n, None), getattr(dst.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
        plain_norms = all("gemma" not in type(s).__name__.lower() for s, _ in pairs[-2:])
        if not plain_norms or any(s is None or s.weight.shape != d.weight.shape for s, d in pairs) or \
                any(s is None or s.weight.shape != (d.weight.shape[0], h) for s, d in qkv):
            raise UserError(f"--draft-init target: layer {layer} of {type(backbone).__name__} is not a Llama-style "
                            "layer of the drafter's shape: use --draft-init random")
        for s, d in pairs:
            d.weight.copy_(s.weight.to(d.weight))
        for s, d in qkv:  # [embedding half | fused-state half]
            d.weight.zero_()
            d.weight[:, h:] = s.weight.to(d.weight)
        return layer

    @torch.no_grad()
    def set_draft_vocab(self, backbone, draft_ids: torch.Tensor) -> None:
        """A new draft vocabulary (target ids): lm_head rows start as the target's unembedding rows."""
        draft_ids = torch.as_tensor(draft_ids, dtype=torch.long).sort().values
        vocab = self.vocab_size
        if draft_ids.numel() < 1 or int(draft_ids[0]) < 0 or int(draft_ids[-1]) >= vocab or \
                draft_ids.unique().numel() != draft_ids.numel():
            raise UserError(f"the EAGLE-3 draft vocabulary must hold distinct token ids in 0..{vocab - 1}")
        w = self.lm_head.weight
        unembed = backbone.get_output_embeddings().weight
        self.lm_head = nn.Linear(w.shape[1], draft_ids.numel(), bias=False, device=w.device, dtype=w.dtype)
        self.lm_head.weight.copy_(unembed[draft_ids.to(unembed.device)].to(w))
        self.d2t = (draft_ids - torch.arange(draft_ids.numel())).to(self.d2t.device)
        self.config.draft_vocab_size = draft_ids.numel()

    @torch.no_grad()
    def keep_draft_rows(self, rows: torch.Tensor) -> None:
        """Shrink the draft vocabulary to the draft ids ``rows``, keeping their trained lm_head rows (an exported
        draft's vocabulary sized for an engine; lossless, the target verifies every draft)."""
        rows = torch.as_tensor(rows, dtype=torch.long).unique().sort().values.to(self.d2t.device)
        if rows.numel() < 1 or int(rows[0]) < 0 or int(rows[-1]) >= self.d2t.numel():
            raise UserError(f"draft rows must lie in 0..{self.d2t.numel() - 1}")
        ids = self.draft_ids[rows]
        w = self.lm_head.weight[rows.to(self.lm_head.weight.device)].clone()
        self.lm_head = nn.Linear(w.shape[1], rows.numel(), bias=False, device=w.device, dtype=w.dtype)
        self.lm_head.weight.copy_(w)
        self.d2t = ids - torch.arange(rows.numel(), device=ids.device)
        self.config.draft_vocab_size = rows.numel()

    # ------------------------------------------------------------------ forward pieces

    @property
    def draft_ids(self) -> torch.Tensor:
        """(Vd,) target token id of each draft id."""
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def fuse(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Three tapped target states [(B, T, Ht)] -> g (B, T, H)."""
        return self.fc(torch.cat(states, -1))

    def step(self, embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, mask=None,
             cache=None) -> torch.Tensor:
        """One drafter pass: token embeddings and hidden states (B, T, H) at ``position_ids`` (B, T) ->
        pre-norm outputs a (B, T, H). ``mask``: additive (B, 1, T, past + T) or None (causal)."""
        rope = self.rotary(hidden, position_ids)
        return self.midlayer(embeds, hidden, rope, mask, cache)

    def draft_logits(self, a: torch.Tensor) -> torch.Tensor:
        """(..., H) pre-norm outputs -> (..., Vd) logits over the draft vocabulary."""
        return self.lm_head(self.norm(a))

    def teacher_rows(self, backbone) -> torch.Tensor:
        """(Vd, H): the rows of the target's unembedding for the draft vocabulary."""
        w = backbone.get_output_embeddings().weight
        return w[self.draft_ids.to(w.device)]

    def teacher_logits(self, backbone, normed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The target's own logits over the draft vocabulary from its final normed states, (..., H) -> (..., Vd):
        the soft targets of ``--draft-loss soft`` (EAGLE-3 distils the target's distribution, restricted to the
        draft vocabulary). ``rows``: :meth:`teacher_rows`, when the caller has them already."""
        rows = self.teacher_rows(backbone) if rows is None else rows
        z = nn.functional.linear(normed.to(rows.dtype), rows)
        cap = getattr(backbone.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def full_logits(self, a: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V): draft logits at their target ids, -inf elsewhere (as vLLM's compute_logits)."""
        small = self.draft_logits(a)
        out = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.draft_ids, small)

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids (-100 for tokens outside the draft vocabulary): the training targets."""
        table = torch.full((self.vocab_size,), -100, dtype=torch.long, device=target_ids.device)
        table[self.draft_ids.to(target_ids.device)] = torch.arange(self.d2t.numel(), device=target_ids.device)
        return torch.where(target_ids >= 0, table[target_ids.clamp(min=0)], target_ids)

    def unroll(self, embed, states: list[torch.Tensor], tokens: torch.Tensor, steps: int,
               valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time test over a sequence: outputs a_j (B, T, H) for draft steps j = 0 .. steps - 1.

        Slot t of step j stands for position t + j of a chain drafted after position t: its token is
        x_{t+1+j} (teacher-forced: a draft is accepted only while it equals the truth), its hidden state a_{j-1}
        at slot t (g_t for j = 0), and it attends to the target-state keys of positions <= t and to its own
        keys of steps 1..j at slot t. a_j at slot t predicts x_{t+2+j}. ``embed``: token ids -> (B, T, H);
        ``valid`` (B, T): False for padding slots. Gradients flow through every step.
        """
        b, t = tokens.shape
        dev = tokens.device
        dtype = self.fc.weight.dtype  # float32 master weights on a bf16 backbone: cast the target's states in
        hidden = self.fuse([s.to(dtype) for s in states])
        cache = new_cache()
        eye = torch.eye(t, dtype=torch.bool, device=dev)[None].expand(b, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None].expand(b, t, t)
        if valid is not None:  # padding keys hidden; every query sees itself
            causal = (causal & valid[:, None, :]) | eye
        outs = []
        for j in range(steps):
            idx = (torch.arange(t, device=dev) + 1 + j).clamp(max=t - 1)
            ids = tokens[:, idx]  # x_{t+1+j}; past the end: the last token (its targets are ignored)
            pos = (torch.arange(t, device=dev) + j)[None].expand(b, -1)
            allowed = torch.cat([causal] + [eye] * j, -1)  # (B, T, (j + 1) T): target keys, then own keys
            mask = torch.zeros(b, 1, t, t * (j + 1), dtype=dtype, device=dev)
            mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
            hidden = self.step(embed(ids).to(dtype), hidden, pos, mask, cache)
            outs.append(hidden)
        return outs

    def forward(self, h, position_ids, cache=None, attn=None):  # the Head interface: not a per-position head
        raise TypeError("an eagle3 head drafts autoregressively: use fuse / step / unroll")


def export_config(head: Eagle3Head, target_config, eagle_layers: list[int]) -> dict:
    """config.json of the HF-format EAGLE-3 checkpoint (as vLLM, SGLang and llama.cpp's converter read it)."""
    cfg = copy.deepcopy(head.config).to_dict()
    for key in ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "_attn_implementation"):
        cfg.pop(key, None)
    cfg.update({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
                "draft_vocab_size": int(head.d2t.numel()), "target_hidden_size": int(target_config.hidden_size),
                "eagle_aux_hidden_state_layer_ids": [int(i) for i in eagle_layers],
                "norm_before_residual": False, "tie_word_embeddings": False})
    return cfg
