"""Multi-token prediction by marginalization (Mehra, Alonso Garcia & Mauch, arXiv 2502.09419, §3).

A next-token model predicts k steps ahead by summing over the intermediate tokens:

    p(x_{t+2} | x_{<=t}) = sum_{x_{t+1}} p(x_{t+1} | x_{<=t}) p(x_{t+2} | x_{<=t}, x_{t+1})

and likewise nested for k = 3. The sum runs over the smallest set of candidates covering ``top_p`` of
each conditional's mass (nested: every candidate's own continuations are truncated the same way), and at
most ``max_candidates`` paths per scored position are kept, the most probable first.

Every smaller ``top_p`` selects a prefix of the same sorted candidates, so one pass with the union of the
candidate sets yields the marginals for all requested ``top_p`` values at once.

Evaluators compute the conditional p(. | x_{<=t}, path) for many candidate paths:
- ``CachedEvaluator`` runs the window once, keeps its KV cache, and sends the candidates of all its
  positions through batched forwards with a tree attention mask (each candidate sees x_{<=t}, its own
  ancestors and itself, at position t + len(path)); earlier levels stay in the cache for later ones;
- ``NaiveEvaluator`` runs one full forward per candidate path: the reference, used by tests and the bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from mtp.hf_compat import cache_length, forward_with_cache, new_cache, select_cache, truncate_cache
from mtp.model.attention import attention_masks


def _float(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class Candidates:
    """The ``cap`` most probable next tokens of each of N distributions, and the nested top-p sizes."""

    tokens: torch.Tensor  # (N, C) sorted by probability, descending
    probs: torch.Tensor  # (N, C)
    count: torch.Tensor  # (nq, N) smallest n whose top-n mass reaches top_p[q], at most C
    capped: torch.Tensor  # (nq, N) True where the top-C mass stays below top_p[q] (the cap binds)

    @staticmethod
    def top(probs: torch.Tensor, top_ps: torch.Tensor, cap: int) -> "Candidates":
        c = min(cap, probs.shape[-1])
        p, tok = probs.topk(c, dim=-1)  # (N, C)
        reach = p.cumsum(-1).unsqueeze(0) >= top_ps.to(p.dtype)[:, None, None]  # (nq, N, C)
        reached = reach.any(-1)
        count = torch.where(reached, reach.to(torch.int8).argmax(-1) + 1, c)
        return Candidates(tok, p, count, ~reached & (c < probs.shape[-1]))

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
        return Candidates(torch.cat([p.tokens for p in parts]), torch.cat([p.probs for p in parts]),
                          torch.cat([p.count for p in parts], 1), torch.cat([p.capped for p in parts], 1))


@dataclass
class Level:
    """All candidate paths of one length l, one node per path (N nodes)."""

    root: torch.Tensor  # (N,) index of the scored position the path starts after
    path: torch.Tensor  # (N, l) tokens x_{t+1}, ..., x_{t+l}
    parent: torch.Tensor  # (N,) node of the path without its last token in the previous level
    weight: torch.Tensor  # (N,) path probability prod_i p(x_{t+i} | x_{<t+i})
    include: torch.Tensor  # (nq, N) in the truncated set of each top_p

    @property
    def depth(self) -> int:
        return self.path.shape[1]

    @staticmethod
    def roots(n: int, nq: int, dtype: torch.dtype, device) -> "Level":
        """The scored positions themselves: empty paths of probability 1."""
        return Level(torch.arange(n, device=device), torch.empty(n, 0, dtype=torch.long, device=device),
                     torch.full((n,), -1, device=device), torch.ones(n, dtype=dtype, device=device),
                     torch.ones(nq, n, dtype=torch.bool, device=device))


def _rank_within_root(weight: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Rank of each node among the nodes of its root by descending weight (0 = most probable)."""
    order = torch.argsort(weight, descending=True, stable=True)
    order = order[torch.argsort(root[order], stable=True)]  # grouped by root, descending weight within
    sorted_root = root[order]
    start = torch.searchsorted(sorted_root, sorted_root)  # index of each group's first node
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - start
    return rank


def expand(parents: Level, cand: Candidates, max_candidates: int, n_roots: int) -> tuple[Level, torch.Tensor]:
    """Children of the included parents: the next level of paths, and where the cap bound (nq, n_roots)."""
    nq, _, c = cand.count.shape[0], *cand.tokens.shape
    j = torch.arange(c, device=cand.tokens.device)
    pre = parents.include.unsqueeze(-1) & (j < cand.count.unsqueeze(-1))  # (nq, N, C) nested top-p
    pi, ci = pre.any(0).nonzero(as_tuple=True)
    root, weight, pre = parents.root[pi], parents.weight[pi] * cand.probs[pi, ci], pre[:, pi, ci]
    # At most max_candidates paths per root and top_p: keep the most probable.
    include = torch.empty_like(pre)
    for q in range(nq):
        w = torch.where(pre[q], weight, torch.full_like(weight, -1.0))
        include[q] = pre[q] & (_rank_within_root(w, root) < max_candidates)
    per_root = torch.zeros(nq, n_roots, dtype=torch.long, device=root.device)
    per_root.index_add_(1, root, pre.long())
    parent_capped = torch.zeros(nq, n_roots, dtype=torch.long, device=root.device)
    parent_capped.index_add_(1, parents.root, (parents.include & cand.capped).long())
    capped = (per_root > max_candidates) | (parent_capped > 0)
    keep = include.any(0)
    path = torch.cat([parents.path[pi], cand.tokens[pi, ci].unsqueeze(1)], 1)
    return Level(root[keep], path[keep], pi[keep], weight[keep], include[:, keep]), capped


# ----------------------------------------------------------------------------- evaluators


BUCKET = 16
"""Candidate chunks are padded to a multiple of this many queries. Every new (queries, keys) shape costs a
one-time kernel setup in bfloat16 on CPUs (oneDNN builds a primitive per shape), which dominated short
runs; padding leaves a handful of query shapes, at the price of at most BUCKET - 1 wasted rows per chunk."""


class CachedEvaluator:
    """Batched candidate forwards against one cached prefix, with tree attention masks.

    State lives here, explicitly, for one window at a time: the KV cache, the position id of every
    cache entry, and the cache slots of the paths of the levels kept for their children.
    """

    def __init__(self, model, chunk_tokens: int = 128):
        self.model, self.chunk = model, chunk_tokens

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: bool = False):
        """Run the window (L,) once; return logits at ``positions`` (P, V) and, if asked, all hidden states."""
        dev = self.model.device
        self.ids, self.t = input_ids.to(dev), positions.to(dev)
        self.cache = new_cache()  # full layers only: sliding windows are applied by our masks
        out = forward_with_cache(self.model, self.cache, input_ids=self.ids[None], use_cache=True,
                                 logits_to_keep=self.t, output_hidden_states=hidden_states)
        L = len(self.ids)
        self.key_pos = torch.arange(L, device=dev)
        self.allowed_prefix = torch.arange(L, device=dev)[None, :] <= self.t[:, None]  # (P, L)
        self.kept: list[torch.Tensor] = []  # per kept level l: (N, l) cache slots of each node's path
        hs = tuple(h[0, self.t] for h in out.hidden_states) if hidden_states else None
        return out.logits[0], hs

    @torch.inference_mode()
    def evaluate(self, level: Level, keep: bool) -> Iterator[tuple[slice, torch.Tensor]]:
        """Logits of p(. | x_{<=t}, path) for every node, chunk by chunk; ``keep`` leaves the nodes cached."""
        dev, depth, n = self.ids.device, level.depth, len(level.root)
        # Cache slots of each node's ancestors: the kept path slots of its parent.
        anc = self.kept[depth - 2][level.parent] if depth > 1 else torch.empty(n, 0, dtype=torch.long, device=dev)
        if depth > 1:  # drop cached candidates without children: shorter keys for every chunk below
            index = torch.cat([torch.arange(len(self.ids), device=dev), torch.unique(anc)])
            select_cache(self.cache, index)
            remap = torch.full((len(self.key_pos),), -1, dtype=torch.long, device=dev)
            remap[index] = torch.arange(len(index), device=dev)
            self.key_pos, anc = self.key_pos[index], remap[anc]
            self.kept = [remap[k] for k in self.kept]
        own = []
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            q, base = b - a, cache_length(self.cache)
            qp = min(-(-q // BUCKET) * BUCKET, max(q, self.chunk))  # padded: few distinct shapes (see BUCKET)
            root, rows, all_rows = level.root[a:b], torch.arange(q, device=dev), torch.arange(qp, device=dev)
            allowed = torch.zeros(qp, base + qp, dtype=torch.bool, device=dev)  # (Q, KV)
            allowed[:q, : len(self.ids)] = self.allowed_prefix[root]
            allowed[rows[:, None], anc[a:b]] = True
            allowed[all_rows, base + all_rows] = True  # padding queries see only themselves
            q_pos = self.t[root] + depth
            q_pos = torch.cat([q_pos, q_pos[-1:].expand(qp - q)])
            ids = torch.cat([level.path[a:b, -1], level.path[b - 1:b, -1].expand(qp - q)])
            k_pos = torch.cat([self.key_pos, q_pos])
            mask = attention_masks(self.model.config, allowed, q_pos, k_pos, self.model.dtype)
            out = forward_with_cache(self.model, self.cache, input_ids=ids[None], position_ids=q_pos[None],
                                     attention_mask=mask, use_cache=True)
            if keep:
                if qp > q:
                    truncate_cache(self.cache, base + q)
                self.key_pos = k_pos[: base + q]
                own.append(base + rows)
            else:
                truncate_cache(self.cache, base)
            yield slice(a, b), out.logits[0, :q]
        if keep:
            self.kept.append(torch.cat([anc, torch.cat(own).unsqueeze(1)], 1))


class NaiveEvaluator:
    """One full forward (no cache) per candidate path: slow, obviously correct."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: bool = False):
        self.ids, self.t = input_ids.to(self.model.device), positions.to(self.model.device)
        out = self.model(input_ids=self.ids[None], output_hidden_states=hidden_states)
        hs = tuple(h[0, self.t] for h in out.hidden_states) if hidden_states else None
        return out.logits[0, self.t], hs

    @torch.inference_mode()
    def evaluate(self, level: Level, keep: bool) -> Iterator[tuple[slice, torch.Tensor]]:
        for i in range(len(level.root)):
            seq = torch.cat([self.ids[: self.t[level.root[i]] + 1], level.path[i]])
            yield slice(i, i + 1), self.model(input_ids=seq[None]).logits[0, -1:]


# ----------------------------------------------------------------------------- marginalization


@dataclass
class WindowMarginals:
    """Results for the P scored positions of one window, k = 1 .. K (index k-1)."""

    marginals: list[torch.Tensor]  # per k: (nq, P, V) truncated marginal p(x_{t+k} | x_{<=t})
    candidates: list[torch.Tensor]  # per k >= 2: (nq, P) number of paths summed over
    capped: list[torch.Tensor]  # per k >= 2: (nq, P) the cap bound
    hidden_states: tuple | None  # per layer: (P, H), when asked for
    root_logits: torch.Tensor  # (P, V) next-token logits


def marginalize(evaluator, input_ids: torch.Tensor, positions: torch.Tensor, k: int, top_ps: list[float],
                max_candidates: int, hidden_states: bool = False) -> WindowMarginals:
    """Truncated k-step marginals at every scored position of one window (see module docstring)."""
    root_logits, hs = evaluator.start(input_ids, positions, hidden_states)
    p1 = torch.softmax(_float(root_logits), -1)  # (P, V)
    n_pos, vocab = p1.shape
    qs = torch.tensor(top_ps, dtype=p1.dtype, device=p1.device)
    marginals = [p1.unsqueeze(0).expand(len(top_ps), n_pos, vocab)]
    candidates, capped = [], []
    level = Level.roots(n_pos, len(top_ps), p1.dtype, p1.device)
    cand = Candidates.top(p1, qs, max_candidates)
    for depth in range(1, k):
        level, cap_hit = expand(level, cand, max_candidates, n_pos)
        count = torch.zeros(len(top_ps), n_pos, dtype=torch.long, device=p1.device)
        count.index_add_(1, level.root, level.include.long())
        candidates.append(count)
        capped.append(cap_hit)
        acc = torch.zeros(len(top_ps), n_pos, vocab, dtype=p1.dtype, device=p1.device)
        parts = []
        for sl, logits in evaluator.evaluate(level, keep=depth < k - 1):
            dist = torch.softmax(_float(logits), -1)  # (n, V)
            w = level.include[:, sl] * level.weight[sl]  # (nq, n)
            for q in range(len(top_ps)):
                acc[q].index_add_(0, level.root[sl], w[q, :, None] * dist)
            if depth < k - 1:
                parts.append(Candidates.top(dist, qs, max_candidates))
        marginals.append(acc)
        if depth < k - 1:
            cand = Candidates.cat(parts)
    return WindowMarginals(marginals, candidates, capped, hs, root_logits)
