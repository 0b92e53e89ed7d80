"""Proposers: where a step's draft comes from. One interface, as transformers' candidate generators.

``propose(ctx)`` returns a :class:`~mtp.decode.tree.Draft` below the step's root. ``ctx`` is a
:class:`DraftContext`: the few things of the running batch a draft is made from, not the decoder. Head proposers
read ``ctx.head_logits`` (B, n_heads, V): the heads' predictions at the last committed position, where head d
predicts the token d places after the root (sequential heads: ``ctx.head_top`` / ``ctx.head_logprobs`` per
depth, given the path before it). Training-free proposers need no heads:

- ``blockwise``: one chain of every head's top-1 token (Stern et al. 2018; Gloeckle et al. §3.2);
- ``tree``: a static tree of head ranks (Medusa), compiled once (:mod:`mtp.decode.tree`);
- ``dynamic``: per row and step, the ``nodes`` paths with the largest product of head probabilities
  (EAGLE-2's confidence-ranked tree, arXiv 2406.16858, with the heads as the draft model);
- ``lookup``: prompt lookup decoding, the continuation of the latest earlier occurrence of the context's
  last n-gram (Saxena 2023; transformers' ``PromptLookupCandidateGenerator``);
- ``hybrid``: the heads' tree and the prompt-lookup chain in one draft (:func:`~mtp.decode.tree.union`):
  the heads cover free text, lookup the spans a reply copies from its context (code, edits, quotes);
- ``early-exit``: the first L layers of the backbone read through its own final norm and unembedding
  (the logit lens of Mehra et al. Fig. 2), drafting a chain autoregressively against the shared cache.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mtp.decode.tree import CompiledTree, Draft, chain_tree, union
from mtp.errors import UserError


@dataclass(frozen=True)
class DraftContext:
    """What a proposer reads at a step (the decoder builds one per step; tests build their own)."""

    batch: int  # rows
    device: torch.device
    root: torch.Tensor  # (B,) the step's root: the token already certain, not yet in the cache
    sequences: Callable[[], list[list[int]]]  # each row's tokens so far, prompt + emitted (the root last)
    head_logits: torch.Tensor | None = None  # (B, n_heads, V) independent heads' predictions after the root
    draft_depth: int = 0  # how many tokens ahead the heads draft
    sequential_heads: bool = False  # heads drafted depth by depth (hydra, EAGLE-3): head_top / head_logprobs
    head_top: Callable[[int, torch.Tensor, int], torch.Tensor] | None = None  # (d, paths (B, M, d), r) -> (B, M, r)
    head_logprobs: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # (d, paths (B, M, d)) -> (B, M, V)
    n_layers: int = 0  # the backbone's layers
    shallow_chain: Callable[[int, int], torch.Tensor] | None = None  # (layers, length) -> (B, length): early exit
    done: tuple[bool, ...] | None = None  # rows that finished (still in the batch): nothing to draft for them


class Proposer:
    needs_heads = False
    name = ""

    def propose(self, ctx: DraftContext) -> Draft:
        raise NotImplementedError

    def observe(self, verified: list[list[int] | None]) -> None:
        """After a step: per row the tokens the verify confirmed below the root (the true continuation, before
        the row's stop cuts it), None for a finished row."""

    def heads_needed(self) -> int | None:
        """How many heads (1..d) the drafts read: the decoder runs no others. None = all of them."""
        return None if self.needs_heads else 0


class PlainProposer(Proposer):
    """No draft: every step is one ordinary decoding step (our own plain loop)."""

    name = "plain"

    def propose(self, ctx: DraftContext) -> Draft:
        return Draft.empty(ctx.batch, ctx.device)


class TreeProposer(Proposer):
    """A static tree filled from each row's top tokens per head; ``blockwise`` is the one-path tree."""

    needs_heads = True

    def __init__(self, tree: CompiledTree, name: str = "tree"):
        self.tree, self.name = tree, name

    def heads_needed(self) -> int | None:
        return self.tree.max_depth

    def propose(self, ctx: DraftContext) -> Draft:
        if ctx.sequential_heads:
            if ctx.draft_depth < self.tree.max_depth:
                raise UserError(f"the tree is {self.tree.max_depth} deep but there are only "
                                f"{ctx.draft_depth} heads")
            return self.tree.draft_sequential(ctx.root, ctx.head_top)
        head_logits = ctx.head_logits[:, : self.tree.max_depth]
        if head_logits.shape[1] < self.tree.max_depth:
            raise UserError(f"the tree is {self.tree.max_depth} deep but the heads predict only "
                            f"{head_logits.shape[1]} tokens ahead")
        top = head_logits.topk(self.tree.max_rank, dim=-1).indices  # (B, D, R)
        return self.tree.draft(top)


def blockwise(depth: int) -> TreeProposer:
    return TreeProposer(chain_tree(depth), "blockwise")


class AdaptiveTreeProposer(TreeProposer):
    """A static tree re-chosen, while decoding, from the acceptance this text actually gives.

    After each step the engine reports what every row emitted below the root: the true continuation up to
    one token past the accepted path. Head d's rank of the true token at depth d is counted wherever the
    step reached depth d, which estimates P(rank r of head d is right | the draft was right up to depth
    d - 1): the factor a path's expected acceptance is made of. The held-out marginal accuracies of
    ``accuracy.json`` are the prior (``prior_weight`` pseudo-observations per depth); they underestimate
    deep nodes (a context that is easy for head 1 tends to be easy for head 2) and miss domain shift (heads
    distilled on chat answers, used on raw code). Every ``every`` steps ``resize(estimates)`` builds the
    tree anew (``methods.make_proposer``: node budget from the verify-cost curve). Estimates persist across
    ``generate`` calls of one decoder: it keeps learning the user's text. Lossless either way: only which
    candidates are verified changes, never which are accepted.
    """

    def __init__(self, prior: list[list[float]], resize, every: int = 8, prior_weight: float = 16.0,
                 ranks: int = 10, name: str = "tree"):
        if every < 1 or prior_weight <= 0 or ranks < 1:
            raise UserError("adaptive tree: every >= 1, prior_weight > 0 and ranks >= 1")
        self.depth, self.ranks = len(prior), ranks
        self.prior = torch.tensor([[float(x) for x in row[:ranks]] + [0.0] * max(0, ranks - len(row))
                                   for row in prior])
        self.hits = torch.zeros(self.depth, ranks)
        self.seen = torch.zeros(self.depth)
        self.resize, self.every, self.prior_weight = resize, every, prior_weight
        self.steps, self._top = 0, None
        self._trees: dict = {}
        super().__init__(self._sized(self.prior.tolist()), name)
        self.sizes = [self.tree.size]  # tree size after every re-sizing, for reports

    def heads_needed(self) -> int | None:
        return self.depth  # a re-sized tree may reach any head of the prior

    def _sized(self, acc: list[list[float]]) -> CompiledTree:
        tree = self.resize(acc)
        return self._trees.setdefault(tree.paths, tree)  # compiled buffers are reused when a shape comes back

    def estimates(self) -> list[list[float]]:
        w = self.prior_weight
        return ((self.hits + w * self.prior) / (self.seen[:, None] + w)).tolist()

    def propose(self, ctx: DraftContext) -> Draft:
        head_logits = ctx.head_logits[:, : self.depth]
        if head_logits.shape[1] < self.tree.max_depth:
            raise UserError(f"the tree is {self.tree.max_depth} deep but the heads predict only "
                            f"{head_logits.shape[1]} tokens ahead")
        top = head_logits.topk(min(self.ranks, head_logits.shape[-1]), dim=-1).indices  # (B, D, R)
        self._top = top
        return self.tree.draft(top[..., : self.tree.max_rank])

    def observe(self, verified: list[list[int] | None]) -> None:
        if self._top is None:
            return
        top = self._top.cpu()
        for row, tokens in enumerate(verified):
            if not tokens:
                continue
            reach = min(len(tokens), self.depth)
            truth = torch.tensor(tokens[:reach])
            match = top[row, :reach] == truth[:, None]  # (reach, R): at most one True per depth
            self.seen[:reach] += 1
            self.hits[:reach, : match.shape[1]] += match.float()
        self._top = None
        self.steps += 1
        if self.steps % self.every == 0:
            self.tree = self._sized(self.estimates())
            self.sizes.append(self.tree.size)


class DynamicTreeProposer(Proposer):
    """Best-first tree per row: a node's score is the product of its path's head probabilities."""

    needs_heads = True
    name = "dynamic"

    def __init__(self, nodes: int, top_k: int = 8, depth: int | None = None):
        if nodes < 1 or top_k < 1:
            raise UserError("a dynamic tree needs at least one node and top-k >= 1")
        self.nodes, self.top_k, self.depth = nodes, top_k, depth

    def heads_needed(self) -> int | None:
        return self.depth

    def propose(self, ctx: DraftContext) -> Draft:
        if ctx.sequential_heads:
            return self._propose_sequential(ctx)
        logp = ctx.head_logits.float().log_softmax(-1)
        if self.depth:
            logp = logp[:, : self.depth]
        vals, toks = logp.topk(self.top_k, dim=-1)  # (B, D, k)
        vals, toks = vals.cpu().tolist(), toks.cpu().tolist()
        b, n = len(vals), self.nodes
        tokens = torch.zeros(b, n, dtype=torch.long)
        parents = torch.full((b, n), -1, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        for row in range(b):
            v, t = vals[row], toks[row]
            heap = [(-v[0][r], r, -1, 0) for r in range(len(v[0]))]  # (-score, rank, parent node, depth index)
            heapq.heapify(heap)
            count = 0
            while heap and count < n:
                neg, r, parent, d = heapq.heappop(heap)
                tokens[row, count], parents[row, count], valid[row, count] = t[d][r], parent, True
                if d + 1 < len(v):
                    for r2 in range(len(v[d + 1])):
                        heapq.heappush(heap, (neg - v[d + 1][r2], r2, count, d + 1))
                count += 1
        dev = ctx.device
        return Draft(tokens.to(dev), parents.to(dev), valid.to(dev))

    def _propose_sequential(self, ctx: DraftContext) -> Draft:
        """EAGLE-2's expand-and-rerank (arXiv 2406.16858) with sequential heads: per depth, the ``top_k``
        best nodes of the previous depth are expanded by their ``top_k`` children (a node's score: the sum of
        the heads' log-probabilities along its path, each head given the path before it); the draft is the
        ``nodes`` best of every node expanded. A child never outscores its parent, so the draft is closed
        under prefixes."""
        b, dev, k = ctx.batch, ctx.device, self.top_k
        depth = min(self.depth or ctx.draft_depth, ctx.draft_depth)
        root = ctx.root
        paths = torch.zeros(b, 1, 0, dtype=torch.long, device=dev)  # the frontier's token paths (B, F, d - 1)
        front_score = torch.zeros(b, 1, device=dev)
        front_idx = torch.full((b, 1), -1, dtype=torch.long, device=dev)  # their indices in the pool
        toks, pars, scores, depths, offset = [], [], [], [], 0
        for d in range(1, depth + 1):
            f = paths.shape[1]
            prev = torch.cat([root[:, None, None].expand(-1, f, 1), paths], 2)  # (B, F, d)
            logp = ctx.head_logprobs(d, prev)  # (B, F, V)
            val, tok = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (B, F, k')
            kk = tok.shape[-1]
            score = (front_score[..., None] + val).reshape(b, -1)  # (B, F * k')
            tok = tok.reshape(b, -1)
            toks.append(tok)
            scores.append(score)
            pars.append(front_idx[..., None].expand(-1, -1, kk).reshape(b, -1))
            depths.append(torch.full_like(tok, d))
            if d < depth:
                top_s, top_i = score.topk(min(k, score.shape[1]), dim=-1)  # the next frontier
                parent_slot = top_i // kk
                paths = torch.cat([paths.gather(1, parent_slot[..., None].expand(-1, -1, d - 1)),
                                   tok.gather(1, top_i)[..., None]], 2)
                front_idx, front_score = offset + top_i, top_s
            offset += tok.shape[1]
        tok_all, par_all = torch.cat(toks, 1), torch.cat(pars, 1)
        key = torch.cat(scores, 1) - torch.cat(depths, 1).float() * 1e-6  # ties: the shallower node first
        n = min(self.nodes, tok_all.shape[1])
        chosen = key.topk(n, dim=-1).indices.sort(-1).values  # pool order: parents before children
        remap = torch.full_like(tok_all, -1)
        remap.scatter_(1, chosen, torch.arange(n, device=dev).expand(b, -1))
        par = par_all.gather(1, chosen)
        parents = torch.where(par < 0, par, remap.gather(1, par.clamp(min=0)))
        return Draft(tok_all.gather(1, chosen), parents, torch.ones(b, n, dtype=torch.bool, device=dev))


class LookupProposer(Proposer):
    """Prompt lookup: match the last n-gram (n = max_ngram .. 1) earlier in the row's tokens, copy what followed."""

    name = "lookup"

    def __init__(self, draft_len: int = 8, max_ngram: int = 3):
        if draft_len < 1 or max_ngram < 1:
            raise UserError("lookup needs a draft length and an n-gram size >= 1")
        self.draft_len, self.max_ngram = draft_len, max_ngram

    def _continuation(self, seq: list[int]) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching tail n-gram (vectorized: one
        comparison of every window per n, instead of a Python scan of the sequence)."""
        ids = torch.tensor(seq, dtype=torch.long)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            windows = ids[:-1].unfold(0, n, 1)  # (L - n, n): every n-gram that has a token after it
            hits = (windows == ids[-n:]).all(1).nonzero()
            if len(hits):
                start = int(hits[-1])  # latest earlier occurrence first
                return seq[start + n: start + n + self.draft_len]
        return []

    def propose(self, ctx: DraftContext) -> Draft:
        done = ctx.done or (False,) * ctx.batch
        return self._chains(ctx, [[] if d else self._continuation(seq) for seq, d in zip(ctx.sequences(), done)])

    @staticmethod
    def _chains(ctx: DraftContext, conts: list[list[int]]) -> Draft:
        """Each row's continuation as its chain (rows with none draft nothing)."""
        width = max((len(c) for c in conts), default=0)
        if width == 0:
            return Draft.empty(ctx.batch, ctx.device)
        tokens = torch.zeros(ctx.batch, width, dtype=torch.long)
        valid = torch.zeros(ctx.batch, width, dtype=torch.bool)
        for i, c in enumerate(conts):
            tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            valid[i, : len(c)] = True
        return Draft.chain(tokens.to(ctx.device), valid.to(ctx.device))


class SizedLookupProposer(LookupProposer):
    """Prompt lookup whose draft length is chosen, while decoding, from the verify-cost curve and the acceptance
    the drafts get on this text.

    How far a copied continuation holds depends on the text (an edit of the prompt's code: long; a fresh answer:
    a token or two), and what a drafted token costs on the machine (a steep CPU curve: most of a decoded one).
    Per draft position j the proposer counts the steps whose draft reached j with the tokens before it accepted,
    and how many of those accepted j too: h_j = P(token j accepted | tokens 1..j-1 were), with ``prior``
    pseudo-observations of the estimate at j - 1 (``prior_rate`` at j = 1). The expected tokens of a step drafting k are
    1 + sum_j<=k prod_i<=j h_i; every ``every`` steps the length is re-chosen among the lengths the curve was
    measured at, maximizing expected tokens * t(1) / t(1 + k). Lossless: only how many tokens are verified
    changes."""

    def __init__(self, cost: dict, max_len: int = 31, max_ngram: int = 3, every: int = 8,
                 prior_rate: float = 0.5, prior: float = 4.0):
        if every < 1 or prior <= 0 or not 0 < prior_rate < 1 or max_len < 1:
            raise UserError("sized lookup: every >= 1, prior > 0, 0 < prior rate < 1 and a draft length >= 1")
        self.cost = cost
        self.lengths = sorted(k - 1 for k in cost if 1 < k <= max_len + 1)
        if 1 not in cost or not self.lengths:
            raise UserError("sized lookup needs the verify cost of 1 and of 2 or more tokens")
        top = self.lengths[-1]
        self.reached = torch.zeros(top + 1)  # per position j: steps whose draft had j tokens, 1..j-1 accepted
        self.kept = torch.zeros(top + 1)  # ... and j accepted too
        self.every, self.prior_rate, self.prior, self.steps = every, prior_rate, prior, 0
        self._drafted: list[int] | None = None
        super().__init__(draft_len=self._choose(), max_ngram=max_ngram)
        self.sizes = [self.draft_len]

    def acceptance(self) -> list[float]:
        """h_j for j = 1..longest length: the estimated chance that draft token j is accepted after 1..j-1 were.
        Position j's prior is position j - 1's estimate (a copied span that held for j - 1 tokens tends to hold
        on), so positions never drafted yet are judged by the nearest one that was: drafts grow when the text
        copies, though a length never tried has no counts of its own."""
        out, prev = [], self.prior_rate
        for kept, reached in zip(self.kept[1:].tolist(), self.reached[1:].tolist()):
            prev = (kept + self.prior * prev) / (reached + self.prior)
            out.append(prev)
        return out

    def expected_gain(self, k: int) -> float:
        survive, tokens = 1.0, 1.0
        for h in self.acceptance()[:k]:
            survive *= h
            tokens += survive
        return tokens * self.cost[1] / self.cost[k + 1]

    def _choose(self) -> int:
        return max(self.lengths, key=self.expected_gain)

    def propose(self, ctx: DraftContext) -> Draft:
        draft = super().propose(ctx)
        self._drafted = draft.valid.sum(1).tolist() if draft.size else [0] * ctx.batch
        return draft

    def observe(self, verified: list[list[int] | None]) -> None:
        if self._drafted is None:
            return
        for row, tokens in enumerate(verified):
            n = self._drafted[row] if row < len(self._drafted) else 0
            if not tokens or not n:
                continue
            accepted = min(len(tokens) - 1, n)  # verified = the accepted draft tokens, then the next root
            upto = min(n, accepted + 1)  # positions 1..upto were reached with everything before accepted
            self.reached[1:upto + 1] += 1
            self.kept[1:accepted + 1] += 1
        self._drafted = None
        self.steps += 1
        if self.steps % self.every == 0:
            self.draft_len = self._choose()
            self.sizes.append(self.draft_len)


class MatchLookupProposer(SizedLookupProposer):
    """Prompt lookup sized per match length: how long the tail that matched earlier text is says how far the copy
    will hold. On qwen2.5-coder-0.5b's answers to edit requests (greedy, 12 requests, 3000 positions) the tokens a
    16-token copy got right averaged 0.5 after a 1-token match, 3.1 after 3, 5.9 after 5-6, 8.8 after 9-12 and 11
    after 17 or more. So drafting on every match (what plain prompt lookup does) pays on a steep verify curve only
    where long matches are common; here each match-length class (the longest n in ``classes`` whose tail n-gram
    occurs earlier) keeps its own acceptance counts (as :class:`SizedLookupProposer` keeps them for all steps) and
    its own draft length, chosen among 0 (no draft: a plain step) and the curve's lengths, maximizing expected
    tokens * t(1) / t(1 + k). A class's prior is n / (n + 1) per position (longer matches: more trust) with
    ``prior`` pseudo-observations; a class at 0 still drafts the shortest length once every ``probe`` visits,
    so that a text whose short matches start to hold is noticed. Lossless: only what is verified changes."""

    classes = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

    def __init__(self, cost: dict, max_len: int = 31, every: int = 8, prior: float = 4.0, probe: int = 32):
        if probe < 1:
            raise UserError("match lookup: probe >= 1")
        super().__init__(cost, max_len=max_len, max_ngram=self.classes[-1], every=every, prior=prior)
        top = self.lengths[-1]
        self.probe = probe
        self.c_reached = torch.zeros(len(self.classes), top + 1)
        self.c_kept = torch.zeros(len(self.classes), top + 1)
        self.visits = [0] * len(self.classes)
        self.per_class = [self._choose_for(c) for c in range(len(self.classes))]
        self._row_class: list[int] = []
        self.draft_len = max(self.per_class)  # what is reported (sizes): the longest any class drafts
        self.sizes = [self.draft_len]

    def class_acceptance(self, c: int) -> list[float]:
        """h_j for match class ``c``: :meth:`SizedLookupProposer.acceptance` on that class's counts."""
        n = self.classes[c]
        out, prev = [], n / (n + 1)
        for kept, reached in zip(self.c_kept[c, 1:].tolist(), self.c_reached[c, 1:].tolist()):
            prev = (kept + self.prior * prev) / (reached + self.prior)
            out.append(prev)
        return out

    def _gain_for(self, c: int, k: int) -> float:
        if k == 0:
            return 1.0
        survive, tokens = 1.0, 1.0
        for h in self.class_acceptance(c)[:k]:
            survive *= h
            tokens += survive
        return tokens * self.cost[1] / self.cost[k + 1]

    def _choose_for(self, c: int) -> int:
        return max([0, *self.lengths], key=lambda k: self._gain_for(c, k))

    def _match(self, seq: list[int]) -> tuple[int, list[int]]:
        """(match class, continuation): the longest class length n whose tail n-gram occurs earlier (a longer one
        cannot match where a shorter one does not), and what followed its latest occurrence; (-1, []) if none.
        The occurrences of the last token are found once and then filtered one position back at a time, so a step
        costs the length of the sequence once plus the number of candidate occurrences per position."""
        if len(seq) < 2:
            return -1, []
        ids = np.asarray(seq)
        ends = np.flatnonzero(ids[:-1] == ids[-1])  # where an earlier copy of the tail would end
        if not len(ends):
            return -1, []
        best, best_ends, matched = 0, ends, 1
        for c, n in enumerate(self.classes[1:], 1):
            if n > len(seq) - 1:
                break
            cand = ends
            for j in range(matched, n):
                cand = cand[cand >= j]
                cand = cand[ids[cand - j] == ids[-1 - j]]
                if not len(cand):
                    break
            if not len(cand):
                break
            ends, matched, best, best_ends = cand, n, c, cand
        e = int(best_ends[-1])  # the latest occurrence
        return best, seq[e + 1: e + 1 + self.lengths[-1]]

    def propose(self, ctx: DraftContext) -> Draft:
        conts, self._row_class = [], []
        for seq, done in zip(ctx.sequences(), ctx.done or (False,) * ctx.batch):
            c, cont = self._match(seq) if not done else (-1, [])
            k = 0
            if c >= 0:
                self.visits[c] += 1
                k = self.per_class[c]
                if k == 0 and self.visits[c] % self.probe == 0:
                    k = self.lengths[0]
            conts.append(cont[:k])
            self._row_class.append(c if k else -1)
        self._drafted = [len(x) for x in conts]
        return self._chains(ctx, conts)

    def observe(self, verified: list[list[int] | None]) -> None:
        if self._drafted is None:
            return
        for row, tokens in enumerate(verified):
            n = self._drafted[row] if row < len(self._drafted) else 0
            c = self._row_class[row] if row < len(self._row_class) else -1
            if not tokens or not n or c < 0:
                continue
            accepted = min(len(tokens) - 1, n)
            upto = min(n, accepted + 1)
            self.c_reached[c, 1:upto + 1] += 1
            self.c_kept[c, 1:accepted + 1] += 1
        super().observe(verified)  # the counts over every class (what is reported), the step count
        if self.steps % self.every == 0:  # the parent re-chose its global length and logged it: ours instead
            self.per_class = [self._choose_for(c) for c in range(len(self.classes))]
            self.draft_len = self.sizes[-1] = max(self.per_class)


class EarlyExitProposer(Proposer):
    """Draft a chain with the backbone's first ``layers`` layers (logit lens), sharing the committed cache."""

    name = "early-exit"

    def __init__(self, layers: int, draft_len: int = 3):
        if layers < 1 or draft_len < 1:
            raise UserError("early exit needs at least one layer and a draft length >= 1")
        self.layers, self.draft_len = layers, draft_len

    def propose(self, ctx: DraftContext) -> Draft:
        n_layers = ctx.n_layers
        if ctx.shallow_chain is None:
            raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")
        if self.layers >= n_layers:
            raise UserError(f"early exit at layer {self.layers} of a {n_layers}-layer model drafts nothing: "
                            f"use fewer layers")
        tokens = ctx.shallow_chain(self.layers, self.draft_len)
        return Draft.chain(tokens)


class UnionProposer(Proposer):
    """Several proposers' drafts verified together: the union of their paths, shared prefixes merged."""

    def __init__(self, proposers: list[Proposer], name: str = "hybrid"):
        if not proposers:
            raise UserError("a union of proposers needs at least one")
        self.proposers, self.name = proposers, name
        self.needs_heads = any(p.needs_heads for p in proposers)

    def propose(self, ctx: DraftContext) -> Draft:
        return union([p.propose(ctx) for p in self.proposers])

    def observe(self, verified: list[list[int] | None]) -> None:
        for p in self.proposers:
            p.observe(verified)

    def heads_needed(self) -> int | None:
        needed = [p.heads_needed() for p in self.proposers]
        return None if None in needed else max(needed)
