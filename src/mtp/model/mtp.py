"""A backbone (or trunk) plus n MTP heads sharing its final norm and unembedding.

    input_ids (B, T) -> backbone -> tapped hidden states -> head k -> final norm -> unembedding -> logits
    head 0 is the backbone's own next-token head; head k >= 1 predicts x_{t+1+k} at position t.

``save_pretrained`` writes the heads folder (:mod:`mtp.heads_format`: ``config.json`` with the backbone reference
and fingerprint, head kind, number of heads, tap, dtype, training recipe; ``model.safetensors`` with the heads, their
WHS weights and token counts, and backbone weights or LoRA adapters only when they were trained).
``from_pretrained`` refuses heads made for another backbone.
"""

from __future__ import annotations

import contextlib

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from mtp.backbones import load_backbone
from mtp.data import top_tokens
from mtp.errors import UserError
from mtp.heads_format import (HeadsConfig, HeadsWeights, check_head_count, load_heads_weights, parse_heads_config,
                              read_heads_config, write_heads_folder)
from mtp.hf_compat import add_lora, first_layers, forward_with_cache
from mtp.model import HEAD_KINDS
from mtp.model.eagle3 import default_layers, parse_layers
from mtp.model.heads import TappedHead, parse_tap
from mtp.model.trunk import capture_hidden, final_norm, unembed

_FINGERPRINT_POINTS = 64
def unembedding_fingerprint(backbone) -> dict:
    """A few unembedding values at fixed places, with its shape: enough to tell backbones apart."""
    w = backbone.get_output_embeddings().weight
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, w.shape[0], (_FINGERPRINT_POINTS,), generator=g)
    cols = torch.randint(0, w.shape[1], (_FINGERPRINT_POINTS,), generator=g)
    sample = w.detach()[rows.to(w.device), cols.to(w.device)].float().cpu()
    return {"shape": list(w.shape), "sample": [round(x, 6) for x in sample.tolist()]}


def _fingerprint_matches(a: dict, b: dict) -> bool:
    if a.get("shape") != b.get("shape") or len(a.get("sample", ())) != len(b["sample"]):
        return False
    x, y = torch.tensor(a["sample"]), torch.tensor(b["sample"])
    return bool(torch.allclose(x, y, rtol=2e-2, atol=2e-3))  # bf16 / fp16 copies of one backbone agree


def shifted_tokens(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) -> (B, T, k): at position t the tokens x_{t+1} .. x_{t+k} (past the end: the last token, whose
    targets are ignored anyway)."""
    t = tokens.shape[1]
    idx = (torch.arange(t, device=tokens.device)[:, None] + torch.arange(1, k + 1, device=tokens.device))
    return tokens[:, idx.clamp(max=t - 1)]


class MTPModel(nn.Module):
    """Backbone + heads. The backbone stays an ordinary transformers model (optionally peft-wrapped)."""

    def __init__(self, backbone, config: HeadsConfig, base_fingerprint: dict | None = None,
                 head_dtype: torch.dtype | None = None):
        """``head_dtype`` defaults to the backbone's; training passes float32 for a bf16 / fp16 backbone so the
        optimizer updates full-precision head weights (the heads cast at their boundary)."""
        super().__init__()
        self.backbone, self.config = backbone, config
        # The base backbone the heads belong to (joint training changes the unembedding; the base stays).
        self.base_fingerprint = base_fingerprint or unembedding_fingerprint(backbone)
        n_layers = backbone.config.num_hidden_layers
        head_cls = HEAD_KINDS[config.kind]
        dtype = head_dtype or backbone.get_output_embeddings().weight.dtype
        self.sequential = head_cls.sequential
        self.autoregressive = getattr(head_cls, "autoregressive", False)
        if self.autoregressive:  # eagle3: one drafter over three tapped layers, n_heads = steps it drafts
            layers = parse_layers(config.eagle_layers or default_layers(n_layers), n_layers)
            config.eagle_layers = list(layers)
            self.tap_kind, self.tapped = "eagle", list(layers)
            draft_ids = torch.arange(config.draft_vocab) if config.draft_vocab else None
            self.heads = nn.ModuleList([head_cls(backbone, layers=layers, draft_ids=draft_ids)]).to(
                device=backbone.device, dtype=dtype)
            config.draft_vocab = int(self.heads[0].d2t.numel())
        else:
            self.tap_kind, tap_layer = parse_tap(config.tap, n_layers)
            self.tapped = {"last": [n_layers], "final": [n_layers], "layer": [tap_layer],
                           "whs": list(range(n_layers + 1))}[self.tap_kind]
            whs = n_layers + 1 if self.tap_kind == "whs" else None
            norm = final_norm(backbone) if self.tap_kind == "final" else None
            self.heads = nn.ModuleList(
                TappedHead(head_cls(backbone, layers=config.mlp_layers, init_from_last=config.init_from_last,
                                    index=k), whs, norm)
                for k in range(1, config.n_heads + 1)).to(device=backbone.device, dtype=dtype)
        # How often each token was a training target (V,), saved with the heads: decoding can restrict the
        # heads' drafts to the most frequent ones (``--draft-vocab``). None for heads saved without it.
        self.token_counts: torch.Tensor | None = None
        for head in self.heads:  # WHS logits stay float32 (softmax over a handful of values)
            if getattr(head, "whs", None) is not None:
                head.whs.data = head.whs.data.float()

    # ------------------------------------------------------------------ forward pieces

    @property
    def n_heads(self) -> int:
        """``n_heads`` of heads.json: the heads' count, or for eagle3 (one drafter) the steps it drafts."""
        return self.config.n_heads

    @property
    def draft_depth(self) -> int:
        """How many tokens past the next one the model drafts: one per head, or eagle3's unrolled steps."""
        return self.config.n_heads

    def trunk(self, input_ids, position_ids=None, cache=None, final: bool = True):
        """Backbone forward: (final normed hidden state (B, T, H), tapped pre-norm states [(B, T, H)]).
        ``final=False``: the state past the taps is not wanted (frozen training, caching states): the forward
        stops after the highest tapped layer and the first item is None (eagle3 taps (2, 11, 21) of SmolLM2's 30
        layers: 30 % of the backbone's work saved)."""
        depth = self.backbone.config.num_hidden_layers
        stop = depth if final or cache is not None else max(max(self.tapped), 1)
        with capture_hidden(self.backbone, self.tapped) as store, \
                (first_layers(self.backbone, stop) if stop < depth else contextlib.nullcontext()):
            out = forward_with_cache(self.backbone.get_decoder(), cache, input_ids=input_ids,
                                     position_ids=position_ids, use_cache=cache is not None)
        return (out.last_hidden_state if stop == depth else None), [store[i] for i in self.tapped]

    def head_hidden(self, k: int, states: list[torch.Tensor], position_ids=None, cache=None,
                    tokens: torch.Tensor | None = None, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Head k >= 1 on the tapped states -> (B, T, H), before the shared final norm.

        Sequential (``hydra``) heads also read the tokens before their target: ``tokens`` (B, T), the
        sequence itself (teacher forcing: position t gets x_{t+1} .. x_{t+k}), or ``prev_ids`` (B, T, k)
        given per position (decoding: the root token and the draft's path).
        """
        if position_ids is None:
            position_ids = torch.arange(states[0].shape[1], device=states[0].device)[None]
        if not self.sequential:
            return self.heads[k - 1](states, position_ids, cache)
        if prev_ids is None:
            if tokens is None:
                raise ValueError(f"{self.config.kind} heads read the tokens before their target: pass tokens")
            prev_ids = shifted_tokens(tokens, k)
        return self.heads[k - 1](states, position_ids, cache, prev=self.embed_tokens(prev_ids))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., k) token ids -> (..., k * H): the backbone's input embeddings, RMS-normalized, concatenated."""
        with torch.no_grad():
            e = self.backbone.get_input_embeddings()(ids)
            e = nn.functional.rms_norm(e.float(), (e.shape[-1],)).to(e.dtype)
        return e.flatten(-2)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Shared final norm (unless already applied) + unembedding + soft-capping: (..., H) -> (..., V)."""
        return unembed(self.backbone, hidden, normed)

    @property
    def heads_normed(self) -> bool:
        """The heads' outputs go to the unembedding without the final norm (tap ``final``: they read the
        normed state already, as Medusa's heads do)."""
        return self.tap_kind == "final"

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """A head's output (..., H) -> logits (..., V) through the shared output path."""
        return unembed(self.backbone, hidden, self.heads_normed)

    @property
    def eagle(self):
        """The eagle3 drafter, or None for per-position heads."""
        return self.heads[0] if self.autoregressive else None

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """eagle3: the target token ids its lm_head covers (training picks the most frequent targets)."""
        self.eagle.set_draft_vocab(self.backbone, draft_ids)
        self.config.draft_vocab = int(self.eagle.d2t.numel())

    def shrink_draft_vocab(self, size: int) -> None:
        """eagle3: keep the ``size`` draft tokens most frequent as training targets (``token_counts``), with their
        trained lm_head rows: a smaller, cheaper draft for an engine (``mtp export --draft-vocab``)."""
        if self.token_counts is None:
            raise UserError("these heads were saved without their training-target counts: their draft vocabulary "
                            "cannot be sized (retrain them with this version of mtp)")
        current = self.eagle.d2t.numel()
        if size >= current:
            return
        counts = self.token_counts.to(self.eagle.draft_ids.device)[self.eagle.draft_ids]
        self.eagle.keep_draft_rows(top_tokens(counts, size))
        self.config.draft_vocab = size

    def head_outputs(self, states: list[torch.Tensor], tokens: torch.Tensor):
        """Per head k = 1 .. n: (hidden (B, T, H), its to-logits function), teacher-forced on ``tokens``.
        eagle3: the training-time-test unroll, draft step k - 1 (own earlier outputs, true tokens)."""
        if self.autoregressive:
            outs = self.eagle.unroll(self.embed, states, tokens, self.n_heads)
            return [(a, self.eagle.full_logits) for a in outs]
        return [(self.head_hidden(k, states, tokens=tokens), self.head_logits) for k in range(1, self.n_heads + 1)]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The backbone's input embeddings of ``ids`` (frozen here): what eagle3 drafters read."""
        with torch.no_grad():
            return self.backbone.get_input_embeddings()(ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every head, (K, B, T, V) with K = n_heads + 1; row k predicts x_{t+1+k}."""
        final, states = self.trunk(input_ids)
        rows = [self.logits(final, normed=True)] + [to_logits(h) for h, to_logits in
                                                    self.head_outputs(states, input_ids)]
        return torch.stack(rows)  # (K, B, T, V)

    # ------------------------------------------------------------------ parameters

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def _trained_weights(self, backbone_state: dict | None = None) -> HeadsWeights:
        weights = HeadsWeights(heads=self.heads.state_dict(), token_counts=self.token_counts)
        if self.config.trained_backbone == "full":
            weights.backbone = backbone_state if backbone_state is not None else self.backbone.state_dict()
        elif self.config.trained_backbone == "lora":
            from peft import get_peft_model_state_dict

            weights.lora = get_peft_model_state_dict(self.backbone)
        return weights

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None,
                        backbone_state: dict | None = None) -> Path:
        """Write the heads folder (config.json + model.safetensors) atomically: a complete new folder replaces
        the old one (:func:`mtp.heads_format.write_heads_folder`).

        ``backbone_state``: the full backbone state when the live one is sharded (FSDP)."""
        meta = {**asdict(self.config), "backbone_fingerprint": self.base_fingerprint,
                "backbone_config": {k: getattr(self.backbone.config, k, None)
                                    for k in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")}}
        return write_heads_folder(directory, meta, self._trained_weights(backbone_state), dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone=None, dtype: str | None = None,
                        device: str = "cpu") -> "MTPModel":
        """Load heads (and trained backbone weights); ``backbone`` defaults to the one named in config.json."""
        folder = Path(directory)
        meta = read_heads_config(folder)
        config = parse_heads_config(meta, folder)
        one_drafter = getattr(HEAD_KINDS[config.kind], "autoregressive", False)
        check_head_count(folder, 1 if one_drafter else config.n_heads, config.n_heads)  # before building them
        if backbone is None:
            backbone, _ = load_backbone(config.backbone, dtype=dtype or config.dtype, device=device,
                                        require_tokenizer=False)
        check_compatible(meta, backbone, folder)
        weights = load_heads_weights(folder, device=backbone.device)
        if config.trained_backbone == "lora":  # adapters are loaded into the given backbone, wrapped if needed
            from peft import PeftModel, set_peft_model_state_dict

            if not isinstance(backbone, PeftModel):
                backbone = add_lora(backbone, config.lora)
            set_peft_model_state_dict(backbone, weights.lora)
        elif config.trained_backbone == "full":
            _load_exact(backbone, weights.backbone, folder, strict=False)
        model = cls(backbone, config, base_fingerprint=meta["backbone_fingerprint"])
        _load_exact(model.heads, weights.heads, folder)
        counts, vocab = weights.token_counts, backbone.get_output_embeddings().weight.shape[0]
        if counts is not None and counts.shape != (vocab,):
            raise UserError(f"{folder}/model.safetensors: token_counts has {counts.numel()} entries but the "
                            f"backbone's vocabulary has {vocab}: the heads are unusable as delivered; retrain them")
        if counts is not None:
            model.token_counts = counts.long().cpu()
        return model


def check_compatible(meta: dict, backbone, folder: Path) -> None:
    """Refuse heads trained for another backbone: sizes, vocabulary and unembedding fingerprint."""
    cfg = backbone.config
    want = meta.get("backbone_config", {})
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if want.get(key) is not None and want[key] != getattr(cfg, key, None):
            raise UserError(f"heads in {folder} were trained for {meta.get('backbone')!r} ({key} {want[key]}), "
                            f"not for this backbone ({key} {getattr(cfg, key, None)})")
    if "backbone_fingerprint" not in meta:
        raise UserError(f"{folder}/config.json: backbone_fingerprint is missing: retrain the heads or restore "
                        "the folder")
    if not _fingerprint_matches(meta["backbone_fingerprint"], unembedding_fingerprint(backbone)):
        raise UserError(f"heads in {folder} were trained for {meta.get('backbone')!r}, whose unembedding differs "
                        "from this backbone's: use the backbone they were trained on")


def _load_exact(module: nn.Module, state: dict, folder: Path, strict: bool = True) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"{folder}: weights do not fit this model ({str(e).splitlines()[0]})") from None
    if strict and (missing or unexpected):
        raise UserError(f"{folder}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")

