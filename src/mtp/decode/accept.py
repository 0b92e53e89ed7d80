"""Acceptance rules: which drafted nodes the backbone itself would have produced.

Every rule sees the verify forward's logits at ``[root] + nodes`` (B, 1+N, V) and the draft, and returns
per row the accepted path (query indices, root first) and the next root token.

- ``greedy``: a node is right when it equals the backbone's argmax at its parent and its parent is right;
  the deepest right node wins. Token for token what plain greedy decoding says.
- ``sample``: recursive rejection sampling over the tree with deterministic drafts (SpecInfer, arXiv
  2305.09781, with the draft distribution a point mass on each candidate; Leviathan et al. arXiv 2211.17192
  and Chen et al. arXiv 2302.01318 for one chain). At the current node draw x from the backbone's processed
  distribution p; if a child carries x, accept it and continue there, else x is the next root. Every
  emitted token is distributed exactly as plain sampling from p would be: the output distribution is the
  backbone's.
- ``typical`` (Medusa, arXiv 2401.10774 §2.3.1): accept a node when p_parent(token) exceeds
  min(epsilon, delta * exp(-H(p_parent))). Faster on creative sampling, but **lossy**: the output
  distribution is no longer the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp.decode.tree import Draft
from mtp.errors import UserError


@dataclass
class Sampling:
    """Plain decoding's token choice: greedy at temperature 0, else temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")

    @classmethod
    def of(cls, options) -> "Sampling":
        """From a configuration's --temperature, --top-k and --top-p."""
        return cls(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> the distribution that sampling draws from (float32).

        Computed in float64 from the logits minus their maximum, so that every temperature and top-p a request
        may give is sampled as asked: a temperature of 1e-300 (0 in float32) puts all the mass on the largest
        logit(s) -- greedy, exactly -- instead of dividing by zero into NaNs; a top-p of 1e-300 keeps the most
        probable token."""
        logits = logits.double()
        logits = (logits - logits.amax(-1, keepdim=True)) / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits.softmax(-1).float()

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of (B, V) logits."""
        if self.greedy:
            return greedy_tokens(logits)
        return torch.multinomial(self.probs(logits), 1, generator=generator)[:, 0]


@dataclass
class Accepted:
    """path: (B, D+1) query indices of the accepted nodes, root (0) first, padded with -1;
    length: (B,) accepted nodes including the root; next_root: (B,) the token after the path."""

    path: torch.Tensor
    length: torch.Tensor
    next_root: torch.Tensor


def _path_to(draft: Draft, best: torch.Tensor) -> Accepted:
    """Query-index paths from the root to node ``best`` (query index, 0 = root) per row."""
    b = best.shape[0]
    dev = best.device
    rows = torch.arange(b, device=dev)
    if draft.size == 0:
        return Accepted(torch.zeros(b, 1, dtype=torch.long, device=dev), torch.ones(b, dtype=torch.long, device=dev),
                        torch.zeros(b, dtype=torch.long, device=dev))
    depth_q = draft.depth_q()
    on_path = draft.ancestor_mask()[rows, best]  # (B, 1+N): the root, best and the nodes between
    length = depth_q[rows, best] + 1
    width = int(length.max())
    slot = torch.where(on_path, depth_q, width)  # each path node goes to its depth; others to a spill column
    path = torch.full((b, width + 1), -1, dtype=torch.long, device=dev)
    path.scatter_(1, slot, torch.arange(draft.size + 1, device=dev).expand(b, -1))
    return Accepted(path[:, :width], length, torch.zeros(b, dtype=torch.long, device=dev))


def _right_nodes(draft: Draft, ok: torch.Tensor) -> torch.Tensor:
    """(B, 1+N): nodes whose own test and every ancestor's passed (the root always)."""
    b = ok.shape[0]
    ok_q = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ok.device), ok & draft.valid], 1)
    return ~(draft.ancestor_mask() & ~ok_q[:, None, :]).any(-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension. ``max(-1).indices`` gives the same index (the first maximum on ties)
    and on CPU takes a third to a fifth of ``argmax``'s time over a 49 k vocabulary (bf16 and float32)."""
    return logits.max(-1).indices


def accept_greedy(logits: torch.Tensor, draft: Draft) -> Accepted:
    """The deepest node whose every ancestor (and itself) equals the backbone's argmax at its parent."""
    target = greedy_tokens(logits)  # (B, 1+N)
    if draft.size == 0:
        acc = _path_to(draft, target[:, 0])
        acc.next_root = target[:, 0]
        return acc
    ok = draft.tokens == target.gather(1, draft.parents + 1)
    right = _right_nodes(draft, ok)
    best = torch.where(right, draft.depth_q(), -1).argmax(1)  # first of the deepest: higher-ranked branch on ties
    acc = _path_to(draft, best)
    acc.next_root = target.gather(1, best[:, None])[:, 0]
    return acc


def accept_sample(logits: torch.Tensor, draft: Draft, sampling: Sampling,
                  generator: torch.Generator | None = None) -> Accepted:
    """Recursive rejection sampling with deterministic drafts: the output distribution is the backbone's."""
    b, n = draft.tokens.shape
    dev = logits.device
    probs = sampling.probs(logits)  # (B, 1+N, V)
    parents_q = draft.parents + 1
    rows = torch.arange(b, device=dev)
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    live = torch.ones(b, dtype=torch.bool, device=dev)
    next_root = torch.zeros(b, dtype=torch.long, device=dev)
    if n == 0:  # plain sampling
        next_root = torch.multinomial(probs[:, 0], 1, generator=generator)[:, 0]
        return Accepted(torch.zeros(b, 1, dtype=torch.long, device=dev), torch.ones(b, dtype=torch.long, device=dev),
                        next_root)
    max_depth = int(draft.depth().max())
    for _ in range(max_depth + 1):
        x = torch.multinomial(probs[rows, cur], 1, generator=generator)[:, 0]
        child = (parents_q == cur[:, None]) & draft.valid & (draft.tokens == x[:, None])  # (B, N)
        has = child.any(1) & live
        next_root = torch.where(live & ~has, x, next_root)
        live = has
        cur = torch.where(has, child.int().argmax(1) + 1, cur)
        if not live.any():
            break
    acc = _path_to(draft, cur)
    acc.next_root = next_root
    return acc


def accept_typical(logits: torch.Tensor, draft: Draft, sampling: Sampling, epsilon: float = 0.09,
                   delta: float | None = None, generator: torch.Generator | None = None) -> Accepted:
    """Medusa's typical acceptance (lossy): p_parent(token) > min(epsilon, delta * exp(-entropy))."""
    delta = epsilon ** 0.5 if delta is None else delta
    b, n = draft.tokens.shape
    dev = logits.device
    temp = sampling.temperature or 1.0  # float64 less the maximum: a tiny temperature is the argmax, not NaN
    probs = ((logits.double() - logits.double().amax(-1, keepdim=True)) / temp).softmax(-1).float()  # (B, 1+N, V)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (B, 1+N)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    rows = torch.arange(b, device=dev)
    if n == 0:
        best = torch.zeros(b, dtype=torch.long, device=dev)
    else:
        tok_p = probs[rows[:, None], draft.parents + 1, draft.tokens]  # (B, N): p_parent(token)
        ok = tok_p > threshold.gather(1, draft.parents + 1)
        best = torch.where(_right_nodes(draft, ok), draft.depth_q(), -1).argmax(1)
    acc = _path_to(draft, best)
    last = logits[rows, best]
    acc.next_root = sampling.choose(last, generator)
    return acc
