"""Draft trees: the candidate tokens of one decoding step and how they hang together.

A draft is a forest below the *root*, the one token of the step that is already certain (the backbone's
own choice at the last committed position). Every node has a parent: -1 for the root, else an earlier
node, so nodes are in topological order. The verify forward feeds ``[root] + nodes`` and each query sees
the committed cache, its ancestors and itself (tree attention, Medusa arXiv 2401.10774 §2.1.2).

A static tree is a list of paths of ranks, Medusa's notation: ``(0, 1)`` is the node that takes the top-1
token of head 1 and, below it, the second-best token of head 2. ``compile_tree`` checks a spec (no gaps,
no duplicates) and turns it into the buffers a step needs; it is plain tensor code, testable without a
model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp.errors import UserError
from mtp.trees import check_paths

@dataclass
class Draft:
    """Per-row candidate nodes below the root: tokens, parents (-1 = root), valid (padding is False).

    All (B, N). ``depth`` of a node is its distance from the root (children of the root have depth 1).
    Depths and the ancestor mask are computed once per draft (static trees pass them precomputed).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    valid: torch.Tensor
    _depth_q: torch.Tensor | None = None  # (B, 1+N), root first
    _anc: torch.Tensor | None = None  # (B, 1+N, 1+N)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def _build(self) -> None:
        b, n = self.tokens.shape
        dev = self.tokens.device
        parent_q = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), self.parents + 1], 1)  # root -> root
        node = torch.arange(n + 1, device=dev).expand(b, -1)
        anc = torch.eye(n + 1, dtype=torch.bool, device=dev).repeat(b, 1, 1)
        for _ in range(n):  # pointer jumping up the tree, one level per pass
            node = parent_q.gather(1, node)
            anc.scatter_(2, node[..., None], True)
            if not bool((node > 0).any()):
                break
        self._anc = anc
        self._depth_q = anc.sum(-1) - 1

    def depth_q(self) -> torch.Tensor:
        """(B, 1+N) depth in query order: the root 0, its children 1, ..."""
        if self._depth_q is None:
            self._build()
        return self._depth_q

    def depth(self) -> torch.Tensor:
        """(B, N) depth of each node (1 for children of the root)."""
        return self.depth_q()[:, 1:]

    def ancestor_mask(self) -> torch.Tensor:
        """(B, 1+N, 1+N) bool: query i may see key j iff j is the root, i itself or an ancestor of i.
        Shared by steps of a static tree: do not modify in place."""
        if self._anc is None:
            self._build()
        return self._anc

    def rows(self, index: torch.Tensor) -> "Draft":
        """The draft of rows ``index`` (1-D) only."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Draft(self.tokens[index], self.parents[index], self.valid[index], pick(self._depth_q), pick(self._anc))

    @staticmethod
    def empty(batch: int, device) -> "Draft":
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return Draft(z, z.clone(), z.bool())

    @staticmethod
    def chain(tokens: torch.Tensor, valid: torch.Tensor | None = None) -> "Draft":
        """A single path per row: node i's parent is node i - 1."""
        b, n = tokens.shape
        parents = (torch.arange(n, device=tokens.device) - 1).expand(b, n).clone()
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        else:  # a chain stops at its first invalid node
            valid = valid.long().cumprod(1).bool()
        return Draft(tokens, parents, valid)


def union(drafts: list[Draft]) -> Draft:
    """One draft holding every path of ``drafts`` (per row, shared prefixes merged, duplicates dropped).

    Nodes keep their first draft's order, so parents still precede children; rows are padded to the
    largest union. Lets a step verify, in one forward, what several proposers suggest.
    """
    nonempty = [d for d in drafts if d.size]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else drafts[0]
    drafts = nonempty
    b, dev = drafts[0].tokens.shape[0], drafts[0].tokens.device
    rows = []
    for row in range(b):
        index: dict[tuple[int, ...], int] = {}
        toks, pars = [], []
        for d in drafts:
            t, p, v = d.tokens[row].tolist(), d.parents[row].tolist(), d.valid[row].tolist()
            paths: list[tuple[int, ...] | None] = []
            for i in range(len(t)):
                parent = () if p[i] < 0 else paths[p[i]]
                if not v[i] or parent is None:
                    paths.append(None)
                    continue
                path = parent + (t[i],)
                paths.append(path)
                if path not in index:
                    index[path] = len(toks)
                    toks.append(t[i])
                    pars.append(index[parent] if parent else -1)
        rows.append((toks, pars))
    n = max(len(t) for t, _ in rows)
    tokens = torch.zeros(b, n, dtype=torch.long)
    parents = torch.full((b, n), -1, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for row, (t, p) in enumerate(rows):
        tokens[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        parents[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        valid[row, : len(t)] = True
    return Draft(tokens.to(dev), parents.to(dev), valid.to(dev))


@dataclass(frozen=True)
class CompiledTree:
    """A static tree's buffers: per node its parent (-1 = root), depth (= the head it reads) and rank."""

    paths: tuple[tuple[int, ...], ...]
    parents: torch.Tensor  # (N,)
    depth: torch.Tensor  # (N,) 1-based: node at depth d takes a token of head d
    rank: torch.Tensor  # (N,) which of head d's top tokens
    max_rank: int
    max_depth: int
    _buffers: tuple | None = None  # parents, depths and ancestor mask on the device, built on first use

    @property
    def size(self) -> int:
        return len(self.paths)

    def draft(self, head_top: torch.Tensor) -> Draft:
        """Fill the tree from each row's top tokens per head: head_top (B, D, R) -> Draft (B, N)."""
        d = self.depth.to(head_top.device) - 1
        r = self.rank.to(head_top.device)
        return self._draft_of(head_top[:, d, r])  # (B, N)

    def draft_sequential(self, root: torch.Tensor, head_top) -> Draft:
        """Fill the tree depth by depth with sequential heads: a node's token is rank r of head d given the
        tokens on its path (the root, then its ancestors'). ``head_top(d, prev_ids (B, U, d), r)`` returns
        (B, U, r) for the U distinct parents at depth d - 1."""
        b, dev = root.shape[0], root.device
        tokens = torch.zeros(b, self.size, dtype=torch.long, device=dev)
        for d, (anc, nodes, slots, ranks, r) in enumerate(self._sequential_plan(), 1):
            prev = torch.cat([root[:, None, None].expand(-1, anc.shape[0], 1), tokens[:, anc.to(dev)]], 2)
            top = head_top(d, prev, r)  # (B, U, r)
            tokens[:, nodes.to(dev)] = top[:, slots.to(dev), ranks.to(dev)]
        return self._draft_of(tokens)

    def _sequential_plan(self) -> list:
        """Per depth: the distinct parents' ancestor paths (U, d - 1) as node indices, and for each node of
        the depth its index, its parent's slot among the U and its rank; the largest rank + 1."""
        plan = self.__dict__.get("_plan")
        if plan is not None:
            return plan
        parents = self.parents.tolist()

        def path(i):  # node indices from depth 1 down to node i
            out = []
            while i >= 0:
                out.append(i)
                i = parents[i]
            return out[::-1]

        plan = []
        for d in range(1, self.max_depth + 1):
            nodes = [i for i in range(self.size) if int(self.depth[i]) == d]
            uniq = sorted({parents[i] for i in nodes})
            anc = torch.tensor([path(u) for u in uniq], dtype=torch.long).reshape(len(uniq), d - 1)
            slots = torch.tensor([uniq.index(parents[i]) for i in nodes])
            ranks = self.rank[nodes]
            plan.append((anc, torch.tensor(nodes), slots, ranks, int(ranks.max()) + 1))
        object.__setattr__(self, "_plan", plan)
        return plan

    def _draft_of(self, tokens: torch.Tensor) -> Draft:
        b, dev = tokens.shape[0], tokens.device
        if self._buffers is None or self._buffers[0].device != dev:
            proto = Draft(tokens[:1], self.parents.to(dev)[None], torch.ones_like(tokens[:1], dtype=torch.bool))
            object.__setattr__(self, "_buffers", (proto.parents, proto.depth_q(), proto.ancestor_mask()))
        parents, depth_q, anc = self._buffers
        return Draft(tokens, parents.expand(b, -1), torch.ones_like(tokens, dtype=torch.bool),
                     depth_q.expand(b, -1), anc.expand(b, -1, -1))


def compile_tree(paths, max_depth: int | None = None) -> CompiledTree:
    """Check a list of paths (no gaps, no duplicates, non-negative integer ranks) and compile it.

    Nodes are ordered by depth, then lexicographically, so parents always precede their children.
    """
    order = check_paths(paths, max_depth)
    depth = max(len(p) for p in order)
    index = {p: i for i, p in enumerate(order)}
    parents = torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in order])
    return CompiledTree(tuple(order), parents, torch.tensor([len(p) for p in order]),
                        torch.tensor([p[-1] for p in order]), max(p[-1] for p in order) + 1, depth)


def chain_tree(depth: int) -> CompiledTree:
    """Blockwise parallel decoding (Stern et al. 2018): one path of every head's top-1 token."""
    return compile_tree([(0,) * d for d in range(1, depth + 1)])


def tree_from_accuracy(acc: list[list[float]], nodes: int) -> CompiledTree:
    """The ``nodes`` paths with the highest expected acceptance, from per-head rank accuracies.

    acc[d][r]: how often rank r of head d+1 is the right token (measured on held-out text, e.g. by
    ``mtp eval``). A path's expected acceptance is the product along it (Medusa §2.1.2, "optimized tree");
    products shrink along a path, so the best set is closed under prefixes (ties broken towards shallow).
    """
    import heapq

    if nodes < 1:
        raise UserError("a tree needs at least one node")
    heap = [(-acc[0][r], (r,)) for r in range(len(acc[0]))]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < nodes:
        score, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < len(acc):
            for r in range(len(acc[len(path)])):
                heapq.heappush(heap, (score * acc[len(path)][r], path + (r,)))
    return compile_tree(chosen)
