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
growing by concatenation. The hidden-state taps are registered once per ``generate`` call. The verify step
reads back to the host once (the accepted tokens, the lengths and the next roots, in one transfer); some
proposers read their draft back too (dynamic trees and eagle3 build the tree on the host, prompt lookup
matches on the host), so a step costs one to three device-to-host transfers, never one per token.

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

from mtp.decode.batch import Batch
from mtp.decode.accept import Accepted, Sampling, accept_greedy, accept_sample, accept_typical
from mtp.decode.eagle import EagleDraftState
from mtp.decode.executors import Executor
from mtp.decode.executors.pytorch import TorchExecutor
from mtp.decode.guard import SpeedGuard
from mtp.decode.methods import LONG_PROMPT, context_bucket
from mtp.decode.proposers import DraftContext, PlainProposer, Proposer
from mtp.decode.slots import Slots
from mtp.decode.tree import Draft
from mtp.errors import UserError
from mtp.model.trunk import final_norm


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"  # length | eos | stop
    steps: int = 0  # backbone forwards for this row, the prefill included
    accepted: list[int] = field(default_factory=list)  # tokens emitted per verify step

    @property
    def acceptance_length(self) -> float:
        """Tokens per backbone forward of this row, tau in the papers (plain decoding: 1); ``tau`` in result
        files, ``mtp_acceptance_length`` in serve's metrics."""
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


class SpeculativeDecoder:
    """Decoding with a backbone, optional MTP heads, a proposer and an acceptance rule.

    ``acceptance``: ``exact`` (greedy at temperature 0, else speculative sampling; lossless) or
    ``typical`` (Medusa's, lossy).
    """

    def __init__(self, backbone, tokenizer, mtp_model=None, proposer: Proposer | None = None,
                 sampling: Sampling | None = None, acceptance: str = "exact", seed: int = 0,
                 typical_epsilon: float = 0.09, draft_vocab: torch.Tensor | None = None, bucket: int = 64,
                 resize: Callable[[int, int], Proposer] | None = None, invariant_attention: bool = True,
                 guard: bool | SpeedGuard = False, executor: Executor | None = None):
        self.backbone, self.tokenizer, self.mtp = backbone, tokenizer, mtp_model
        # how the backbone's forwards run (mtp.decode.executors): PyTorch unless another is given. A bf16 / fp16
        # backbone's attention runs per query in float32 there (hf_compat.float32_attention): a position verified
        # in a tree computes what a one-token decode of it computes, so greedy picks do not flip
        self.executor = executor or TorchExecutor(backbone, bucket, invariant_attention)
        heads = mtp_model  # the MTPModel: its heads, taps and unembedding
        self.proposer = proposer or PlainProposer()
        if self.proposer.name == "early-exit" and not self.executor.supports_early_exit:
            raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")
        # ``guard``: drafts must be measured to pay, step by step, or the decoder decodes plainly (mtp.decode.guard)
        self.guard = guard if isinstance(guard, SpeedGuard) else SpeedGuard() if guard else None
        self.sampling = sampling or Sampling()
        if acceptance not in ("exact", "typical"):
            raise UserError(f"unknown acceptance {acceptance!r}: use exact or typical")
        if self.proposer.needs_heads and heads is None:
            raise UserError(f"method {self.proposer.name!r} drafts with MTP heads: pass --heads DIR or default")
        self.acceptance, self.seed, self.typical_epsilon = acceptance, seed, typical_epsilon
        self.bucket = bucket  # attention reads the used cache slots rounded up to this many
        # drafts sized for one row and a short prompt are re-sized for a call's batch and prompt length
        # (``resize(batch, context bucket)``, kept per key; see methods.cached_batch_cost and context_cost)
        self._resize, self._sized = resize, {(1, 0): self.proposer}
        self.device = backbone.device
        self.generator = torch.Generator(device=self.device)
        self.n_layers = backbone.config.num_hidden_layers
        self.max_context = getattr(backbone.config, "max_position_embeddings", None)
        self.transformer_heads = heads is not None and heads.config.kind == "transformer"
        # only the heads the drafts read run (a transformer head costs a layer per committed token)
        needed = self.proposer.heads_needed() if heads is not None else 0
        self.n_run = 0 if heads is None else heads.draft_depth if needed is None else min(needed, heads.draft_depth)
        # The heads' drafts may be restricted to a shortlist of the vocabulary (FR-Spec): their unembedding
        # then reads |shortlist| rows instead of V. Tokens outside it get -inf; the verify forward still
        # decides, so the output is unchanged, only drafts of rare tokens are lost.
        self.draft_vocab = None
        self.eagle = heads is not None and heads.autoregressive  # an EAGLE-3 drafter with its own KV cache
        # the heads' unembedding and final norm are the PyTorch model's the heads were loaded on (the backbone
        # itself, unless another backend runs the verify)
        if self.eagle:  # its lm_head covers its own draft vocabulary (d2t): that is the shortlist
            self._vocab = heads.backbone.get_output_embeddings().weight.shape[0]
            self.draft_vocab = heads.eagle.draft_ids.to(self.device)
        elif draft_vocab is not None and heads is not None:
            lm_head = heads.backbone.get_output_embeddings()
            self._vocab = lm_head.weight.shape[0]
            self.draft_vocab = draft_vocab.to(self.device)
            self._draft_weight = lm_head.weight.detach()[self.draft_vocab]
            bias = getattr(lm_head, "bias", None)
            self._draft_bias = bias.detach()[self.draft_vocab] if bias is not None else None
        self.reset()  # no running batch yet
        self.forwards = self.verify_tokens = self.verify_forwards = 0
        self._in_session = False  # add / step / drop run inside session()

    # ------------------------------------------------------------------ forward pieces

    def _heads_step(self, states, keep_idx, keep_valid, q_pos, next_tokens=None):
        """Heads on the committed new positions (B, m): what the next draft reads at the last one. Heads with a
        state of their own (transformer heads' cache, an EAGLE-3 drafter's) run now; independent heads (mlp) only
        keep their inputs and run when a step drafts (:attr:`head_logits`): a step the speed guard decodes
        plainly costs no head. ``next_tokens`` (B, m): the committed tokens (eagle3 reads each position with the
        token after it; ``self.state.root_next`` follows the last)."""
        b, m = keep_idx.shape
        sel = [s.gather(1, keep_idx[..., None].expand(-1, -1, s.shape[-1])) for s in states]  # (B, m, H)
        pos = q_pos.gather(1, keep_idx)
        last = (keep_valid.long().cumsum(1) * keep_valid).argmax(1)  # index of the last valid kept slot
        rows = torch.arange(b, device=self.device)
        if self.eagle:  # the drafter reads position p's state with the token after it (the next root last)
            tokens = torch.cat([next_tokens[:, 1:], next_tokens[:, :1]], 1)
            tokens[rows, last] = self.state.root_next
            self.state.eagle_state.commit(sel, tokens, q_pos.gather(1, keep_idx), keep_valid)
            return
        if self.mtp.sequential:  # drafted depth by depth by the proposer (head_top), from this state
            self.state.seq_states = [s[rows, last] for s in sel]  # (B, H) per tap
            return
        self.state.head_logits = None  # the previous step's
        if not self.transformer_heads:
            self.state.head_inputs = ([s[rows, last][:, None] for s in sel], pos[rows, last][:, None])
            return
        outs = []
        for k, head in enumerate(self.mtp.heads[: self.n_run]):
            if self.transformer_heads:
                if k == 0:
                    allowed_new = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()[None] & \
                        keep_valid[:, None, :]
                    allowed_new |= torch.eye(m, dtype=torch.bool, device=self.device)[None]
                    allowed, k_pos = self.state.head_slots.begin(pos, allowed_new)
            h = head(sel, pos, self.state.head_caches[k], attn=(allowed, pos, k_pos))
            outs.append(h[rows, last])
        self.state.head_slots.keep_all(keep_valid)
        self.state.head_hidden = torch.stack(outs, 1)  # (B, n_heads, H)

    # ------------------------------------------------------------------ state for proposers

    @property
    def sequential_heads(self) -> bool:
        return self.mtp is not None and self.mtp.sequential

    def _sequential_logits(self, k: int, prev_ids: torch.Tensor, full: bool = True) -> torch.Tensor:
        """Sequential heads: logits (B, M, V) of head k for M draft nodes, given per node the k tokens before
        its target (B, M, k): the step's root token, then the node's path. ``full=False``: over the draft
        shortlist only, (B, M, |shortlist|), when there is one."""
        if self.eagle:
            small = self.state.eagle_state.draft_logits(prev_ids)  # (B, M, Vd)
            if not full:
                return small
            out = small.new_full((*small.shape[:-1], self._vocab), float("-inf"))
            return out.index_copy_(-1, self.draft_vocab, small)
        m = prev_ids.shape[1]
        states = [s[:, None].expand(-1, m, -1) for s in self.state.seq_states]
        return self._head_logits(self.mtp.head_hidden(k, states, prev_ids=prev_ids), full)

    def _head_logits(self, hidden: torch.Tensor, full: bool = True) -> torch.Tensor:
        """The heads' logits (..., V) through the shared final norm and unembedding, or through the draft
        shortlist's rows only: -inf elsewhere, or (``full=False``) just the shortlist's columns."""
        if self.draft_vocab is None:
            return self.mtp.head_logits(hidden)
        normed = hidden if self.mtp.heads_normed else final_norm(self.mtp.backbone)(hidden)
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

    # the running batch as proposers and servers read it (one object holds it: ``self.state``, a Batch)

    @property
    def batch(self) -> int:
        return len(self.state)

    @property
    def root(self) -> torch.Tensor:
        return self.state.root

    @property
    def head_logits(self) -> torch.Tensor | None:
        """Independent heads' logits (B, n_heads, V) for the next draft: computed on first read after a step."""
        st = self.state
        if st.head_logits is None:
            with torch.inference_mode():
                st.head_logits = self._lazy_head_logits()
        return st.head_logits

    def _lazy_head_logits(self) -> torch.Tensor | None:
        st = self.state
        if st.head_inputs is not None:
            states, pos = st.head_inputs
            hidden = torch.stack([head(states, pos)[:, 0] for head in self.mtp.heads[: self.n_run]], 1)
            return self._head_logits(hidden)
        if st.head_hidden is not None:
            return self._head_logits(st.head_hidden)
        return None

    @property
    def requests(self) -> list["Request"]:
        return self.state.requests

    @property
    def prompts(self) -> list[list[int]]:
        return self.state.prompts

    @property
    def results(self) -> list[RowResult]:
        return self.state.results

    @property
    def done(self) -> list[bool]:
        return self.state.done

    def sequences(self) -> list[list[int]]:
        """Each row's tokens so far, prompt + emitted (the root last)."""
        return [p + r.tokens for p, r in zip(self.state.prompts, self.state.results)]

    def draft_context(self) -> DraftContext:
        """What the proposer reads this step (:class:`~mtp.decode.proposers.DraftContext`)."""
        heads = self.mtp is not None and self.proposer.needs_heads  # plain (a batch too big to draft for): none
        return DraftContext(
            batch=len(self.state), device=self.device, root=self.state.root, sequences=self.sequences,
            head_logits=self.head_logits if heads and not self.sequential_heads else None,
            draft_depth=self.mtp.draft_depth if heads else 0,
            sequential_heads=self.sequential_heads, head_top=self.head_top if heads else None,
            head_logprobs=self.head_logprobs if heads else None, n_layers=self.n_layers,
            shallow_chain=self.shallow_chain if self.executor.supports_early_exit else None,
            done=tuple(self.state.done))

    def shallow_chain(self, layers: int, length: int) -> torch.Tensor:
        """Greedy chain of ``length`` tokens after the root from the first ``layers`` layers (early exit); the
        executor restores its cache afterwards."""
        chain = self.executor.shallow_chain(self.state, layers, length)
        self.forwards += length
        return chain

    # ------------------------------------------------------------------ the loop

    def _groups(self, requests: list["Request"]):
        """Rows that draw alike: (row indices or None for all, sampling, generator). Greedy rows form one
        group; sampling rows with their own generator (a request's seed) form one each."""
        groups: dict = {}
        for i, r in enumerate(requests):
            sampling = r.sampling or self.sampling
            key = "greedy" if sampling.greedy and self.acceptance == "exact" else \
                (id(sampling), id(r.generator or self.generator))
            groups.setdefault(key, (sampling, r.generator or self.generator, []))[2].append(i)
        if len(groups) == 1:
            sampling, gen, _ = next(iter(groups.values()))
            return [(None, sampling, gen)]
        return [(torch.tensor(rows, device=self.device), sampling, gen) for sampling, gen, rows in groups.values()]

    def _accept_with(self, logits, draft: Draft, sampling: Sampling, generator):
        if self.acceptance == "typical":
            return accept_typical(logits, draft, sampling, self.typical_epsilon, generator=generator)
        if sampling.greedy:
            return accept_greedy(logits, draft)
        return accept_sample(logits, draft, sampling, generator)

    def _accept(self, logits, draft: Draft):
        groups = self._groups(self.state.requests)
        if groups[0][0] is None:
            return self._accept_with(logits, draft, groups[0][1], groups[0][2])
        parts = [(rows, self._accept_with(logits[rows], draft.rows(rows), sampling, gen))
                 for rows, sampling, gen in groups]
        b, width = logits.shape[0], max(a.path.shape[1] for _, a in parts)
        path = torch.full((b, width), -1, dtype=torch.long, device=self.device)
        length = torch.zeros(b, dtype=torch.long, device=self.device)
        next_root = torch.zeros(b, dtype=torch.long, device=self.device)
        for rows, a in parts:
            path[rows, :a.path.shape[1]] = a.path
            length[rows], next_root[rows] = a.length, a.next_root
        return Accepted(path, length, next_root)

    def _choose(self, logits: torch.Tensor, requests: list["Request"]) -> torch.Tensor:
        """Each row's first token from its (B, V) prefill logits, drawn as its request says."""
        groups = self._groups(requests)
        if groups[0][0] is None:
            return groups[0][1].choose(logits, groups[0][2])
        out = torch.zeros(logits.shape[0], dtype=torch.long, device=self.device)
        for rows, sampling, gen in groups:
            out[rows] = sampling.choose(logits[rows], gen)
        return out

    def _emit(self, row: int, tokens: list[int]) -> list[int]:
        """Append tokens to a row until a stop condition; returns what was appended."""
        res, req = self.state.results[row], self.state.requests[row]
        added = []
        for t in tokens:
            res.tokens.append(t)
            added.append(t)
            if t in req.eos:
                res.finish = "eos"
                break
            if len(res.tokens) >= req.max_new_tokens:
                res.finish = "length"
                break
            if req.stop and self._hits_stop(res.tokens, req):
                res.finish = "stop"
                break
        if res.finish in ("eos", "stop") or len(res.tokens) >= req.max_new_tokens:
            self.state.done[row] = True
        return added

    def _hits_stop(self, tokens: list[int], req: "Request") -> bool:
        window = max(len(s) for s in req.stop) + 8
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        return any(s in tail for s in req.stop)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 128, eos_token_ids=None,
                 stop_strings=(), callback: Callable[[int, list[int]], None] | None = None) -> GenerateOutput:
        """Decode a batch of token-id prompts. ``callback(row, new_tokens)`` streams each step's tokens."""
        if not prompts:
            raise UserError("empty prompt: give at least one token of text")
        start = time.perf_counter()
        self.generator.manual_seed(self.seed)
        eos = eos_token_ids if eos_token_ids is not None else self.tokenizer.eos_token_id
        eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        stop = tuple(s for s in stop_strings if s)
        requests = [Request(list(p), max_new_tokens, eos, stop) for p in prompts]
        self.reset()
        self.forwards = self.verify_tokens = self.verify_forwards = 0
        with self.session():
            self.add(requests, callback)
            while not all(self.state.done):
                self.step(callback)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # the slots and caches stay until the next call: they show what was committed
        return GenerateOutput(self.state.results, time.perf_counter() - start, self.forwards, self.verify_tokens,
                              self.verify_forwards)

    # ------------------------------------------------------------------ a running batch (continuous batching)

    def reset(self) -> None:
        """Forget the running batch (rows, slots, caches), in the executor too."""
        self.state = Batch()
        self.executor.reset()

    @contextlib.contextmanager
    def session(self):
        """Within the block the executor returns the hidden states the heads read (PyTorch: taps registered on the
        backbone once, not per step): :meth:`add`, :meth:`step` and :meth:`drop` run inside one."""
        taps = tuple(self.mtp.tapped) if self.n_run else ()
        every = self.eagle or self.transformer_heads  # heads that read every prompt position
        dtype = next(self.mtp.parameters()).dtype if self.n_run else None
        with self.executor.session(taps, every, dtype):
            self._in_session = True
            try:
                yield self
            finally:
                self._in_session = False

    def _size_for_batch(self) -> None:
        """Drafts sized for the running batch and its longest context (methods.cached_batch_cost, context_cost)."""
        if self._resize is None or not self.state.requests:
            return
        requests = self.state.requests
        key = (len(requests), context_bucket(max(len(r.prompt) + r.max_new_tokens // 2 for r in requests)))
        if key not in self._sized:
            self._sized[key] = self._resize(*key)
        self.proposer = self._sized[key]

    def prepare(self, max_batch: int) -> None:
        """Size drafts (measuring the verify-cost curves it needs, once) for every batch up to ``max_batch`` now,
        not when such a batch first comes (a server's first busy moment)."""
        if self._resize is None:
            return
        for b in range(2, max_batch + 1):
            if (b, 0) not in self._sized:
                self._sized[(b, 0)] = self._resize(b, 0)
        first_long = context_bucket(LONG_PROMPT)
        if (not self.max_context or self.max_context > LONG_PROMPT) and (1, first_long) not in self._sized:
            # how the verify cost grows with the context is measured now too, not when a first long prompt comes
            # (mid-serve, that would stall every running row)
            self._sized[(1, first_long)] = self._resize(1, first_long)

    def check(self, request: "Request") -> None:
        """Refuse, in one line, a request this decoder cannot serve."""
        if request.max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {request.max_new_tokens}")
        if not request.prompt:
            raise UserError("empty prompt: give at least one token of text")
        if len(request.generated) >= request.max_new_tokens:
            raise UserError(f"a resumed row already has {len(request.generated)} of its {request.max_new_tokens} "
                            "tokens")
        if self.max_context and len(request.prompt) + request.max_new_tokens > self.max_context:
            raise UserError(f"prompt of {len(request.prompt)} tokens + {request.max_new_tokens} new tokens is longer "
                            f"than the model's context ({self.max_context} tokens)")

    @torch.inference_mode()
    def add(self, requests: list["Request"], callback: Callable[[int, list[int]], None] | None = None) -> list[int]:
        """Prefill new rows and append them to the running batch (between steps); returns their row indices.
        Each new row's first token is emitted (``callback(row, tokens)``)."""
        if not self._in_session:
            raise RuntimeError("SpeculativeDecoder.add / step / drop run inside `with decoder.session():`")
        for r in requests:
            self.check(r)
        b_old, b = len(self.state.requests), len(requests)
        longest = max(len(r.context) for r in requests)
        capacity = longest + max(r.max_new_tokens - len(r.generated) for r in requests) + 64
        total = b_old + b
        self.executor.check_room(self.state, requests, total, capacity)
        old = self.state
        self.state = Batch(list(requests), [list(r.prompt) for r in requests],
                           [RowResult(tokens=list(r.generated)) for r in requests], [False] * b)  # prefilled alone
        try:
            self._prefill(requests, longest, capacity)
        except BaseException:
            self.state = old  # the running rows go on as they were
            raise
        if b_old:  # the running rows, then the new ones
            new, self.state = self.state, old
            self.executor.join(self.state, new)
            self.state.extend(new)
        self._size_for_batch()
        rows = list(range(b_old, total))
        for i, root in zip(rows, self.state.root[b_old:].tolist()):
            self.state.results[i].steps = 1
            added = self._emit(i, [root])
            if callback:
                callback(i, added)
        return rows

    @torch.inference_mode()
    def drop(self, rows: list[int]) -> None:
        """Remove rows from the running batch (finished, or their client left) between steps; the others keep
        their order. Their slots are freed and the holes compacted away."""
        gone = set(rows)
        keep = [i for i in range(len(self.state.requests)) if i not in gone]
        if len(keep) == len(self.state.requests):
            return
        if not keep:
            forwards = (self.forwards, self.verify_tokens, self.verify_forwards)
            self.reset()
            self.forwards, self.verify_tokens, self.verify_forwards = forwards
            return
        index = self.state.select(keep)
        self.executor.select(self.state, index, keep)
        self._size_for_batch()

    def _prefill(self, requests: list["Request"], longest: int, capacity: int) -> None:
        """Prompts of new rows, left-padded, through the backbone into fresh slots; the heads read them."""
        dev, b = self.device, len(requests)
        prompts = [r.context for r in requests]
        ids = torch.zeros(b, longest, dtype=torch.long, device=dev)
        valid = torch.zeros(b, longest, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=dev)
            valid[i, longest - len(p):] = True
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        self.state.head_logits = self.state.seq_states = self.state.root_next = self.state.eagle_state = None
        self.state.head_inputs = self.state.head_hidden = None
        self.state.head_slots = self.state.head_caches = None
        logits, states = self.executor.prefill(self.state, ids, pos, valid, capacity, requests)
        self.forwards += 1
        self.state.next_pos = pos[:, -1] + 1
        self.state.root = self._choose(logits[:, -1], requests)
        if self.n_run:
            if self.eagle:
                self.state.eagle_state = EagleDraftState(self.mtp, b, dev, capacity, self.bucket)
                self.state.root_next = self.state.root
                self._heads_step(states, torch.arange(longest, device=dev).expand(b, -1), valid, pos, ids)
            elif self.transformer_heads:
                self.state.head_slots = Slots(b, dev, capacity, bucket=self.bucket)
                self.state.head_caches = [self.state.head_slots.cache() for _ in range(self.n_run)]
                idx = torch.arange(longest, device=dev).expand(b, -1)
                self._heads_step(states, idx, valid, pos)
            else:
                last = torch.full((b, 1), longest - 1, dtype=torch.long, device=dev)
                self._heads_step(states, last, torch.ones(b, 1, dtype=torch.bool, device=dev), pos)

    @torch.inference_mode()
    def step(self, callback: Callable[[int, list[int]], None] | None = None) -> list[list[int] | None]:
        """One propose -> verify -> accept -> commit step over the running batch; returns, per row, the tokens
        it emitted (None for rows already done)."""
        dev, b = self.device, len(self.state.requests)
        if all(self.state.done):  # e.g. every row just joined and ended at its first token: nothing to verify
            return [None] * b
        guarded = self.guard is not None and not isinstance(self.proposer, PlainProposer)
        drafting = not guarded or self.guard.drafting(self.state.done.count(False))
        draft = self.proposer.propose(self.draft_context()) if drafting else Draft.empty(b, dev)
        draft = self.executor.fit(self.state, draft)
        n = draft.size
        q_tokens = torch.cat([self.state.root[:, None], draft.tokens], 1)  # (B, 1+N)
        q_pos = self.state.next_pos[:, None] + draft.depth_q()
        allowed_new = draft.ancestor_mask()
        if n and not bool(draft.valid.all()):  # padding nodes see only themselves
            node_valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), draft.valid], 1)
            allowed_new = (allowed_new & node_valid[:, :, None] & node_valid[:, None, :]) | \
                torch.eye(n + 1, dtype=torch.bool, device=dev)[None]
        self.verify_tokens += n + 1
        self.verify_forwards += 1
        logits, states = self.executor.verify(self.state, q_tokens, q_pos, allowed_new, draft)
        self.forwards += 1
        acc = self._accept(logits, draft)

        # the one read-back of the step: per row, its accepted length, next root and path tokens
        path = acc.path
        path_tokens = q_tokens.gather(1, path.clamp(min=0))
        host = torch.cat([acc.length[:, None], acc.next_root[:, None], path_tokens], 1).tolist()
        lengths = [0 if self.state.done[i] else row[0] for i, row in enumerate(host)]
        m = max(lengths)

        # commit: move each row's accepted slots to the front of the step's slots, drop the rest
        keep_idx = path[:, :m]
        keep_valid = (keep_idx >= 0) & (torch.arange(m, device=dev)[None] <
                                        torch.tensor(lengths, device=dev)[:, None])
        keep_idx = keep_idx.clamp(min=0)
        self.executor.commit(self.state, keep_idx, keep_valid, lengths)
        self.state.next_pos = self.state.next_pos + torch.tensor(lengths, device=dev)
        if self.n_run:
            self.state.root_next = acc.next_root
            self._heads_step(states, keep_idx, keep_valid, q_pos, path_tokens[:, :m])
        emitted: list[list[int] | None] = [None] * b  # what each row emitted (cut at its stop)
        verified: list[list[int] | None] = [None] * b  # what the step verified (what proposers learn from)
        for i, row in enumerate(host):
            if self.state.done[i]:
                continue
            verified[i] = row[2:2 + lengths[i]][1:] + [row[1]]
            res = self.state.results[i]
            res.steps += 1
            emitted[i] = self._emit(i, verified[i])
            res.accepted.append(len(emitted[i]))
            if callback:
                callback(i, emitted[i])
        if drafting:
            self.proposer.observe(verified)
        if guarded:
            self.guard.record(sum(len(e) for e in emitted if e))
        self.state.root = acc.next_root
        return emitted


@dataclass
class Request:
    """One row's decoding: its prompt and when to stop; ``sampling`` / ``generator`` None: the decoder's."""

    prompt: list[int]
    max_new_tokens: int = 128
    eos: frozenset = frozenset()
    stop: tuple = ()
    sampling: Sampling | None = None
    generator: torch.Generator | None = None
    generated: tuple = ()
    """Tokens this row already produced and emitted (a row resumed after its batch failed, see
    mtp.serve.scheduler): read as context after the prompt, counted against ``max_new_tokens`` and stop strings,
    not emitted again."""

    @property
    def context(self) -> list[int]:
        """What the prefill reads: the prompt, then the tokens already generated."""
        return list(self.prompt) + list(self.generated)
