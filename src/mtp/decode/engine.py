"""The self-speculative decoding loop: prefill, then propose -> verify -> accept -> commit.

- propose: a :class:`~mtp.decode.proposers.Proposer` drafts a tree below the step's root (the token that
  is already certain);
- verify: one backbone forward over ``[root] + nodes`` against the KV cache, with a tree attention mask
  and position ids ``pos(root) + depth`` (:mod:`mtp.model.attention`);
- accept: the longest path the backbone itself would have produced (:mod:`mtp.decode.accept`), plus the
  token after it, which becomes the next root;
- commit: the accepted nodes' cache entries are moved into place and the rest dropped; the heads read the
  hidden state of the last accepted node (transformer heads first append every accepted position to their
  own KV cache).

Memory is preallocated (:mod:`mtp.decode.slots`): each forward writes its keys and values in place at the
next free slots, the commit moves the accepted ones to the front with one gather over the step's slots, and
attention reads the used slots rounded up to a bucket, so a step's cost follows the context instead of
growing by concatenation. The hidden-state taps are registered once per ``generate`` call, and a verify
step reads back to the host once (the accepted tokens, the lengths and the next roots, in one transfer).

Rows of a batch accept different numbers of tokens: each row owns its cache slots, and slots that a row
does not use (left padding, a shorter accepted path than another row's) are holes that its attention
mask hides, so every row computes exactly what it would compute alone.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mtp.decode.accept import Sampling, accept_greedy, accept_sample, accept_typical, greedy_tokens
from mtp.decode.methods import context_bucket
from mtp.decode.proposers import PlainProposer, Proposer
from mtp.decode.slots import Slots, free_memory, kv_bytes
from mtp.decode.tree import Draft
from mtp.errors import UserError
from mtp.hf_compat import first_layers, forward_with_cache
from mtp.model.attention import attention_masks
from mtp.model.heads import capture_hidden, final_norm


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"  # length | eos | stop
    steps: int = 0  # backbone forwards for this row, the prefill included
    accepted: list[int] = field(default_factory=list)  # tokens emitted per verify step

    @property
    def tau(self) -> float:
        """Tokens per backbone forward (plain decoding: 1)."""
        return len(self.tokens) / max(1, self.steps)


@dataclass
class GenerateOutput:
    rows: list[RowResult]
    seconds: float
    forwards: int
    verify_tokens: int = 0  # query tokens over all verify forwards (root + draft nodes, padding included)
    verify_forwards: int = 0  # verify steps (drafting forwards, e.g. early exit's, and the prefill not counted)

    @property
    def new_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)


class Decoder:
    """Decoding with a backbone, optional MTP heads, a proposer and an acceptance rule.

    ``acceptance``: ``exact`` (greedy at temperature 0, else speculative sampling; lossless) or
    ``typical`` (Medusa's, lossy).
    """

    def __init__(self, backbone, tokenizer, heads=None, proposer: Proposer | None = None,
                 sampling: Sampling | None = None, acceptance: str = "exact", seed: int = 0,
                 typical_epsilon: float = 0.09, draft_vocab: torch.Tensor | None = None, bucket: int = 64,
                 resize: Callable[[int, int], Proposer] | None = None):
        self.backbone, self.tokenizer, self.heads = backbone, tokenizer, heads
        self.proposer = proposer or PlainProposer()
        self.sampling = sampling or Sampling()
        if acceptance not in ("exact", "typical"):
            raise UserError(f"unknown acceptance {acceptance!r}: use exact or typical")
        if self.proposer.needs_heads and heads is None:
            raise UserError(f"method {self.proposer.name!r} drafts with MTP heads: pass --heads DIR or default")
        self.acceptance, self.seed, self.typical_epsilon = acceptance, seed, typical_epsilon
        self.bucket = bucket  # attention reads the used cache slots rounded up to this many
        # drafts sized for one row and a short prompt are re-sized for a call's batch and prompt length
        # (``resize(batch, context bucket)``, kept per key; see methods.batch_cost and context_cost)
        self._resize, self._sized = resize, {(1, 0): self.proposer}
        self.device = backbone.device
        self.generator = torch.Generator(device=self.device)
        self.n_layers = backbone.config.num_hidden_layers
        self.max_context = getattr(backbone.config, "max_position_embeddings", None)
        self.transformer_heads = heads is not None and heads.config.kind == "transformer"
        # only the heads the drafts read run (a transformer head costs a layer per committed token)
        needed = self.proposer.heads_needed() if heads is not None else 0
        self.n_run = 0 if heads is None else heads.n_heads if needed is None else min(needed, heads.n_heads)
        # The heads' drafts may be restricted to a shortlist of the vocabulary (FR-Spec): their unembedding
        # then reads |shortlist| rows instead of V. Tokens outside it get -inf; the verify forward still
        # decides, so the output is unchanged, only drafts of rare tokens are lost.
        self.draft_vocab = None
        self.eagle = heads is not None and heads.autoregressive  # an EAGLE-3 drafter with its own KV cache
        if self.eagle:  # its lm_head covers its own draft vocabulary (d2t): that is the shortlist
            self._vocab = backbone.get_output_embeddings().weight.shape[0]
            self.draft_vocab = heads.eagle.draft_ids.to(self.device)
        elif draft_vocab is not None and heads is not None:
            lm_head = backbone.get_output_embeddings()
            self._vocab = lm_head.weight.shape[0]
            self.draft_vocab = draft_vocab.to(self.device)
            self._draft_weight = lm_head.weight.detach()[self.draft_vocab]
            bias = getattr(lm_head, "bias", None)
            self._draft_bias = bias.detach()[self.draft_vocab] if bias is not None else None

    # ------------------------------------------------------------------ forward pieces

    def _forward(self, ids, q_pos, allowed_new, logits_to_keep=0):
        """Backbone forward of (B, Q) new tokens against the cache, written at the next free slots (the
        caller keeps or drops them). Returns logits and, with heads, the tapped states of the new tokens."""
        allowed, k_pos = self.slots.begin(q_pos, allowed_new)
        mask = None if allowed is None else attention_masks(self.backbone.config, allowed, q_pos, k_pos,
                                                            self._mask_dtype)
        self._taps.clear()
        out = forward_with_cache(self.backbone, self.cache, input_ids=ids, position_ids=q_pos, attention_mask=mask,
                                 use_cache=True, logits_to_keep=logits_to_keep)
        states = [self._taps[i] for i in self.heads.tapped] if self.n_run else None
        self.forwards += 1
        return out.logits, states

    def _heads_step(self, states, keep_idx, keep_valid, q_pos, next_tokens=None):
        """Heads on the committed new positions (B, m): head_logits (B, n_heads, V) at the last one.
        ``next_tokens`` (B, m): the committed tokens (eagle3 reads each position with the token after it;
        ``self.root_next`` follows the last)."""
        b, m = keep_idx.shape
        sel = [s.gather(1, keep_idx[..., None].expand(-1, -1, s.shape[-1])) for s in states]  # (B, m, H)
        pos = q_pos.gather(1, keep_idx)
        last = (keep_valid.long().cumsum(1) * keep_valid).argmax(1)  # index of the last valid kept slot
        rows = torch.arange(b, device=self.device)
        if self.eagle:  # the drafter reads position p's state with the token after it (the next root last)
            tokens = torch.cat([next_tokens[:, 1:], next_tokens[:, :1]], 1)
            tokens[rows, last] = self.root_next
            self.eagle_state.commit(sel, tokens, q_pos.gather(1, keep_idx), keep_valid)
            return
        if self.heads.sequential:  # drafted depth by depth by the proposer (head_top), from this state
            self.seq_states = [s[rows, last] for s in sel]  # (B, H) per tap
            return
        outs = []
        for k, head in enumerate(self.heads.heads[: self.n_run]):
            if self.transformer_heads:
                if k == 0:
                    allowed_new = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()[None] & \
                        keep_valid[:, None, :]
                    allowed_new |= torch.eye(m, dtype=torch.bool, device=self.device)[None]
                    allowed, k_pos = self.head_slots.begin(pos, allowed_new)
                h = head(sel, pos, self.head_caches[k], attn=(allowed, pos, k_pos))
            else:
                h = head([s[rows, last][:, None] for s in sel], pos[rows, last][:, None])
                outs.append(h[:, 0])
                continue
            outs.append(h[rows, last])
        if self.transformer_heads:
            self.head_slots.keep_all(keep_valid)
        hidden = torch.stack(outs, 1)  # (B, n_heads, H)
        self.head_logits = self._head_logits(hidden)

    # ------------------------------------------------------------------ state for proposers

    @property
    def sequential_heads(self) -> bool:
        return self.heads is not None and self.heads.sequential

    def _sequential_logits(self, k: int, prev_ids: torch.Tensor, full: bool = True) -> torch.Tensor:
        """Sequential heads: logits (B, M, V) of head k for M draft nodes, given per node the k tokens before
        its target (B, M, k): the step's root token, then the node's path. ``full=False``: over the draft
        shortlist only, (B, M, |shortlist|), when there is one."""
        if self.eagle:
            small = self.eagle_state.draft_logits(prev_ids)  # (B, M, Vd)
            if not full:
                return small
            out = small.new_full((*small.shape[:-1], self._vocab), float("-inf"))
            return out.index_copy_(-1, self.draft_vocab, small)
        m = prev_ids.shape[1]
        states = [s[:, None].expand(-1, m, -1) for s in self.seq_states]
        return self._head_logits(self.heads.head_hidden(k, states, prev_ids=prev_ids), full)

    def _head_logits(self, hidden: torch.Tensor, full: bool = True) -> torch.Tensor:
        """The heads' logits (..., V) through the shared final norm and unembedding, or through the draft
        shortlist's rows only: -inf elsewhere, or (``full=False``) just the shortlist's columns."""
        if self.draft_vocab is None:
            return self.heads.head_logits(hidden)
        normed = hidden if self.heads.heads_normed else final_norm(self.backbone)(hidden)
        small = nn.functional.linear(normed, self._draft_weight, self._draft_bias)
        cap = getattr(self.backbone.config, "final_logit_softcapping", None)
        if cap:
            small = torch.tanh(small / cap) * cap
        if not full:
            return small
        out = small.new_full((*small.shape[:-1], self._vocab), float("-inf"))
        return out.index_copy_(-1, self.draft_vocab, small)

    def head_top(self, k: int, prev_ids: torch.Tensor, r: int) -> torch.Tensor:
        """Top-``r`` tokens (B, M, r) of sequential head k (see ``_sequential_logits``)."""
        logits = self._sequential_logits(k, prev_ids, full=False)
        top = logits.topk(min(r, logits.shape[-1]), dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab[top]

    def head_logprobs(self, k: int, prev_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, M, V) of sequential head k (see ``_sequential_logits``)."""
        return self._sequential_logits(k, prev_ids).float().log_softmax(-1)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def sequences(self) -> list[list[int]]:
        """Each row's tokens so far, prompt + emitted (the root last)."""
        return [p + r.tokens for p, r in zip(self.prompts, self.results)]

    def shallow_chain(self, layers: int, length: int) -> torch.Tensor:
        """Greedy chain of ``length`` tokens after the root from the first ``layers`` layers; the cache is
        restored afterwards (only those layers' entries grew)."""
        s = self.slots.end
        tok, p = self.root, self.next_pos
        out = []
        n_run, self.n_run = self.n_run, 0
        eye = torch.ones(self.batch, 1, 1, dtype=torch.bool, device=self.device)
        try:
            with first_layers(self.backbone, layers):
                for i in range(length):
                    logits, _ = self._forward(tok[:, None], p[:, None], eye)
                    self.slots.keep_all(eye[:, 0])
                    tok = greedy_tokens(logits[:, -1])
                    out.append(tok)
                    p = p + 1
        finally:
            self.n_run = n_run
            self.slots.truncate(s)
        return torch.stack(out, 1)

    # ------------------------------------------------------------------ the loop

    def _accept(self, logits, draft: Draft):
        if self.acceptance == "typical":
            return accept_typical(logits, draft, self.sampling, self.typical_epsilon, generator=self.generator)
        if self.sampling.greedy:
            return accept_greedy(logits, draft)
        return accept_sample(logits, draft, self.sampling, self.generator)

    def _emit(self, row: int, tokens: list[int]) -> list[int]:
        """Append tokens to a row until a stop condition; returns what was appended."""
        res = self.results[row]
        added = []
        for t in tokens:
            res.tokens.append(t)
            added.append(t)
            if t in self.eos:
                res.finish = "eos"
                break
            if len(res.tokens) >= self.max_new_tokens:
                res.finish = "length"
                break
            if self.stop_strings and self._hits_stop(res.tokens):
                res.finish = "stop"
                break
        if res.finish in ("eos", "stop") or len(res.tokens) >= self.max_new_tokens:
            self.done[row] = True
        return added

    def _hits_stop(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-self._stop_window:], skip_special_tokens=False)
        return any(s in tail for s in self.stop_strings)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 128, eos_token_ids=None,
                 stop_strings=(), callback: Callable[[int, list[int]], None] | None = None) -> GenerateOutput:
        """Decode a batch of token-id prompts. ``callback(row, new_tokens)`` streams each step's tokens."""
        if max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {max_new_tokens}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: give at least one token of text")
        longest = max(len(p) for p in prompts)
        if self.max_context and longest + max_new_tokens > self.max_context:
            raise UserError(f"prompt of {longest} tokens + {max_new_tokens} new tokens is longer than the model's "
                            f"context ({self.max_context} tokens)")
        start = time.perf_counter()
        self.generator.manual_seed(self.seed)
        dev, b = self.device, len(prompts)
        if self._resize is not None:
            key = (b, context_bucket(max(len(p) for p in prompts) + max_new_tokens // 2))
            if key not in self._sized:
                self._sized[key] = self._resize(*key)
            self.proposer = self._sized[key]
        self.prompts = [list(p) for p in prompts]
        self.results = [RowResult() for _ in prompts]
        self.done = [False] * b
        self.max_new_tokens = max_new_tokens
        eos = eos_token_ids if eos_token_ids is not None else self.tokenizer.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.stop_strings = [s for s in stop_strings if s]
        self._stop_window = max((len(s) for s in self.stop_strings), default=0) + 8
        self._mask_dtype = self.backbone.dtype
        self.forwards = self.verify_tokens = self.verify_forwards = 0
        # room for the prompt, the answer and one step's draft (grown if a draft is larger)
        capacity = longest + max_new_tokens + 64
        need, free = kv_bytes(self.backbone.config, self.backbone.dtype, b, capacity), free_memory(dev)
        if free is not None and need > 0.8 * free:
            raise UserError(f"{b} prompt(s) of up to {longest} tokens + {max_new_tokens} new tokens need "
                            f"{need / 2**30:.1f} GiB of KV cache, {free / 2**30:.1f} GiB of {dev.type} memory is "
                            f"free: decode fewer prompts at once or fewer new tokens")
        self.slots = Slots(b, dev, capacity, bucket=self.bucket)
        self.cache = self.slots.cache()  # full layers: sliding windows come from our masks
        self._taps: dict[int, torch.Tensor] = {}
        with contextlib.ExitStack() as hooks:
            if self.n_run:  # the tapped layers' hooks, registered once for the whole call
                self._taps = hooks.enter_context(capture_hidden(self.backbone, self.heads.tapped))
            self._decode(prompts, longest, capacity, callback)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._taps = None  # the slots and caches stay until the next call: they show what was committed
        return GenerateOutput(self.results, time.perf_counter() - start, self.forwards, self.verify_tokens,
                              self.verify_forwards)

    def _decode(self, prompts, longest, capacity, callback):
        dev, b = self.device, len(prompts)
        # prefill, left-padded
        ids = torch.zeros(b, longest, dtype=torch.long, device=dev)
        valid = torch.zeros(b, longest, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=dev)
            valid[i, longest - len(p):] = True
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        if all(len(p) == longest for p in prompts):  # no padding: the model's own causal attention
            allowed = None
        else:
            causal = torch.ones(longest, longest, dtype=torch.bool, device=dev).tril()
            allowed = (causal[None] & valid[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=dev)[None]
        logits, states = self._forward(ids, pos, allowed, logits_to_keep=1)
        self.slots.keep_all(valid)
        self.next_pos = pos[:, -1] + 1
        self.root = self.sampling.choose(logits[:, -1], self.generator)
        if self.n_run:
            if self.eagle:
                from mtp.decode.eagle import EagleDraftState

                self.eagle_state = EagleDraftState(self.heads, b, dev, capacity, self.bucket)
                self.root_next = self.root
                self._heads_step(states, torch.arange(longest, device=dev).expand(b, -1), valid, pos, ids)
            elif self.transformer_heads:
                self.head_slots = Slots(b, dev, capacity, bucket=self.bucket)
                self.head_caches = [self.head_slots.cache() for _ in range(self.n_run)]
                idx = torch.arange(longest, device=dev).expand(b, -1)
                self._heads_step(states, idx, valid, pos)
            else:
                last = torch.full((b, 1), longest - 1, dtype=torch.long, device=dev)
                self._heads_step(states, last, torch.ones(b, 1, dtype=torch.bool, device=dev), pos)
        for i, root in enumerate(self.root.tolist()):
            self.results[i].steps = 1
            added = self._emit(i, [root])
            if callback:
                callback(i, added)

        while not all(self.done):
            draft = self.proposer.propose(self)
            n = draft.size
            q_tokens = torch.cat([self.root[:, None], draft.tokens], 1)  # (B, 1+N)
            q_pos = self.next_pos[:, None] + draft.depth_q()
            allowed_new = draft.ancestor_mask()
            if n and not bool(draft.valid.all()):  # padding nodes see only themselves
                node_valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), draft.valid], 1)
                allowed_new = (allowed_new & node_valid[:, :, None] & node_valid[:, None, :]) | \
                    torch.eye(n + 1, dtype=torch.bool, device=dev)[None]
            self.verify_tokens += n + 1
            self.verify_forwards += 1
            logits, states = self._forward(q_tokens, q_pos, allowed_new)
            acc = self._accept(logits, draft)

            # the one read-back of the step: per row, its accepted length, next root and path tokens
            path = acc.path
            path_tokens = q_tokens.gather(1, path.clamp(min=0))
            host = torch.cat([acc.length[:, None], acc.next_root[:, None], path_tokens], 1).tolist()
            lengths = [0 if self.done[i] else row[0] for i, row in enumerate(host)]
            m = max(lengths)

            # commit: move each row's accepted slots to the front of the step's slots, drop the rest
            keep_idx = path[:, :m]
            keep_valid = (keep_idx >= 0) & (torch.arange(m, device=dev)[None] <
                                            torch.tensor(lengths, device=dev)[:, None])
            keep_idx = keep_idx.clamp(min=0)
            self.slots.keep(keep_idx, keep_valid)
            self.next_pos = self.next_pos + torch.tensor(lengths, device=dev)
            if self.n_run:
                self.root_next = acc.next_root
                self._heads_step(states, keep_idx, keep_valid, q_pos, path_tokens[:, :m])
            emitted: list[list[int] | None] = [None] * b
            for i, row in enumerate(host):
                if self.done[i]:
                    continue
                new = row[2:2 + lengths[i]][1:] + [row[1]]
                res = self.results[i]
                res.steps += 1
                added = self._emit(i, new)
                emitted[i] = new
                res.accepted.append(len(added))
                if callback:
                    callback(i, added)
            self.proposer.observe(emitted)
            self.root = acc.next_root
