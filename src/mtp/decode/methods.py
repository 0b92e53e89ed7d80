"""Decoding methods by name, with draft sizes chosen from the device's measured verify cost.

A verify forward over k tokens costs t(k); a step that emits tau tokens on average is worth
tau * t(1) / t(k) against plain decoding. On a CPU, bf16 forwards over up to ~8 tokens cost about what
one costs, float32 ones grow sooner; a GPU differs again. So the node budget of a tree is not a constant:
``verify_cost`` measures t(k) once per (model, dtype, device, threads) and caches it, and ``choose_tree``
takes the prefix of the accuracy-ranked tree that maximizes the expected speedup
(1 + sum of the nodes' acceptance probabilities) * t(1) / t(1 + nodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
import typing
from pathlib import Path

import torch

from mtp.config import HEAD_METHODS, METHODS, DraftOptions  # noqa: F401 (METHODS, HEAD_METHODS: re-exported)
from mtp.decode.proposers import (AdaptiveTreeProposer, DynamicTreeProposer, EarlyExitProposer, LookupProposer,
                                  MatchLookupProposer, PlainProposer, Proposer, TreeProposer, UnionProposer,
                                  blockwise)
from mtp.decode.slots import Slots
from mtp.decode.tree import chain_tree, compile_tree, tree_from_accuracy
from mtp.errors import UserError
from mtp.heads_format import read_accuracy
from mtp.hf_compat import forward_with_cache
from mtp.io import cache_dir, write_json
from mtp.machine import cpu_signature
from mtp.model.attention import attention_masks
from mtp.trees import read_tree

COST_POINTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)


@torch.inference_mode()
def verify_cost(backbone, context: int = 256, points=COST_POINTS, repeats: int = 7, warmup: int = 2,
                batch: int = 1) -> dict:
    """Median seconds of one forward over k new tokens (a chain) in each of ``batch`` rows against a cached
    ``context``-token prefix."""
    dev = backbone.device
    g = torch.Generator().manual_seed(0)
    vocab = backbone.config.vocab_size
    prefix = torch.randint(3, vocab, (batch, context), generator=g).to(dev)
    slots = Slots(batch, dev, context + max(points))  # the engine's own layout and attention buckets
    cache = slots.cache()
    slots.begin(torch.arange(context, device=dev).expand(batch, -1), None)
    forward_with_cache(backbone, cache, input_ids=prefix, use_cache=True, logits_to_keep=1)
    slots.keep_all(torch.ones(batch, context, dtype=torch.bool, device=dev))
    inputs = {}
    for k in points:
        ids = torch.randint(3, vocab, (batch, k), generator=g).to(dev)
        q_pos = torch.arange(context, context + k, device=dev).expand(batch, -1)
        tril = torch.ones(batch, k, k, dtype=torch.bool, device=dev).tril()
        allowed, k_pos = slots.begin(q_pos, tril)
        inputs[k] = (ids, q_pos, tril, attention_masks(backbone.config, allowed, q_pos, k_pos, backbone.dtype))
    # Rounds over every k, alternating direction, rather than k after k: a drift while measuring (a GPU's
    # clocks ramping up from idle, a neighbour's load) then shifts all of t(k) alike instead of the ratios.
    times: dict[int, list[float]] = {k: [] for k in points}
    for r in range(warmup + repeats):
        for k in (points if r % 2 == 0 else points[::-1]):
            ids, q_pos, tril, mask = inputs[k]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            slots.begin(q_pos, tril)
            forward_with_cache(backbone, cache, input_ids=ids, position_ids=q_pos, attention_mask=mask, use_cache=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
            slots.truncate(context)
    out = {k: statistics.median(ts) for k, ts in times.items()}
    return out


def cost_key(model_name: str, backbone) -> str:
    dev = backbone.device
    # per CPU model and flags too: the same user cache meets an AMX Xeon one day and an AMD EPYC the next
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu {cpu_signature()}"
    raw = json.dumps([model_name, str(backbone.dtype), name, torch.get_num_threads(), torch.__version__])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _measured_once(name: str, parse, measure, what: str):
    """``parse(json)`` of the user cache's ``verify/<name>``, or ``measure()`` announced on stderr and
    kept there (an unreadable or malformed entry is measured again)."""
    import sys

    path = cache_dir("verify", name)
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        pass
    print(f"mtp: measuring {what} once (cached in the user cache) ...", file=sys.stderr)
    value = measure()
    try:
        write_json(path, value, indent=None)
    except OSError:
        pass
    return value


def cached_verify_cost(model_name: str, backbone, context: int = 256) -> dict:
    """``verify_cost`` measured once per model, dtype, device and thread count; kept in the user cache."""
    return _measured_once(f"{cost_key(model_name, backbone)}.json",
                          lambda raw: {int(k): float(v) for k, v in raw.items()},
                          lambda: verify_cost(backbone, context), "this device's verify cost t(k)")


BATCH_POINTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)  # draft sizes that can pay when several rows verify at once


def batch_bucket(batch: int) -> int:
    """The batch a curve is measured for: ``batch`` rounded up to a power of two."""
    return 1 << max(0, batch - 1).bit_length()


def cached_batch_cost(model_name: str, backbone, batch: int, cost: dict | None = None) -> dict:
    """The verify-cost curve of ``batch`` rows (rounded up to a power of two), measured once per model, dtype,
    device and thread count like ``verify_cost`` and kept in the user cache: per row, t_B(k) of a forward over k
    tokens in each of B rows. Measured rather than derived from one row's curve (``batch_cost``) because each
    row's attention, cache reads and bookkeeping grow with the batch too: at batch 8 on a 2-core CPU the
    estimate from one row's curve called a 1-node tree 1.3x faster, and it was 0.85x."""
    b = batch_bucket(batch)
    if b == 1:
        return cost if cost is not None else cached_verify_cost(model_name, backbone)
    return _measured_once(f"{cost_key(model_name, backbone)}.batch{b}.json",
                          lambda raw: {int(k): float(v) for k, v in raw.items()},
                          lambda: verify_cost(backbone, SHORT_CONTEXT, BATCH_POINTS, repeats=5, warmup=1, batch=b),
                          f"this device's verify cost for {b} rows at once")


LONG_CONTEXT = 2048  # where the verify cost's growth with the context is measured (once, like the curve)
SHORT_CONTEXT = 256  # where the curve itself is measured


def context_growth(backbone, long: int = LONG_CONTEXT) -> dict:
    """How much a forward over 1 and over 16 new tokens slows down from a 256-token prefix to a ``long`` one
    (relative: t_long(k) / t_256(k) - 1), side by side. Attention over the prefix is what grows: one query
    reads it at the cost of the weights', sixteen queries read it sixteen times."""
    limit = getattr(backbone.config, "max_position_embeddings", None) or long + 64
    long = max(SHORT_CONTEXT + 64, min(long, limit - 64))
    short = verify_cost(backbone, SHORT_CONTEXT, points=(1, 16), repeats=5, warmup=1)
    far = verify_cost(backbone, long, points=(1, 16), repeats=5, warmup=1)
    return {"context": long, "g1": max(0.0, far[1] / short[1] - 1), "g16": max(0.0, far[16] / short[16] - 1)}


def cached_context_growth(model_name: str, backbone) -> dict:
    """``context_growth`` measured once per model, dtype, device and thread count (the user cache)."""
    return _measured_once(f"{cost_key(model_name, backbone)}.context.json",
                          lambda g: {"context": int(g["context"]), "g1": float(g["g1"]), "g16": float(g["g16"])},
                          lambda: context_growth(backbone), "how this device's verify cost grows with the context")


def context_cost(cost: dict, growth: dict, context: int) -> dict:
    """The verify-cost curve (measured at a 256-token prefix) at a ``context``-token prefix: each t(k) grows
    by g(k) per ``growth``'s context span, g linear in k from 1 to 16 tokens and flat beyond (both attention
    and the matrix products then scale with k), linear in the context. Trees sized from it shrink where a
    long prefix makes every draft token's attention expensive."""
    if context <= SHORT_CONTEXT:
        return cost
    f = (context - SHORT_CONTEXT) / (growth["context"] - SHORT_CONTEXT)

    def g(k: int) -> float:
        return growth["g1"] + (growth["g16"] - growth["g1"]) * min(k - 1, 15) / 15

    return {k: v * (1 + f * g(k)) for k, v in cost.items()}


LONG_PROMPT = 768  # from this many tokens of context on, drafts are sized for the context (context_bucket)


def context_bucket(tokens: int) -> int:
    """The context a call's drafts are sized for: 0 below ``LONG_PROMPT`` tokens (the curve as measured), else
    ``tokens`` rounded up to a multiple of 512."""
    return 0 if tokens < LONG_PROMPT else -(-tokens // 512) * 512


def batch_cost(cost: dict, batch: int) -> dict:
    """An estimate of the verify-cost curve for ``batch`` rows from one row's: a forward over k tokens per row
    costs about what one row's forward over ``batch * k`` tokens costs (the weights are read once either way;
    the work scales with the tokens), interpolated along the measured curve and extended along its last
    segment beyond it. It misses what grows per row besides (attention, cache reads, bookkeeping), so the
    engine sizes drafts from curves measured per batch (``cached_batch_cost``); this serves planning and tests."""
    if batch <= 1:
        return cost
    points = sorted(cost)

    def at(k: float) -> float:
        for a, b in zip(points, points[1:]):
            if k <= b:
                return cost[a] + (cost[b] - cost[a]) * (k - a) / (b - a)
        a, b = points[-2], points[-1]
        return cost[b] + (cost[b] - cost[a]) * (k - b) / (b - a)

    return {k: at(batch * k) for k in points}


def rank_accuracy(heads_dir: Path | None, depth: int) -> list[list[float]]:
    """Per head, how often each of its top ranks is right (``accuracy.json`` beside the heads, written by
    ``mtp eval`` or ``mtp pretrain``); without it a conservative prior (rank 1 of head d right 0.6 / d, each next rank a third)."""
    acc = read_accuracy(heads_dir, depth)
    if acc is not None:
        return acc[:depth]
    return [[0.6 / d * (1 / 3) ** r for r in range(8)] for d in range(1, depth + 1)]


def choose_tree(acc: list[list[float]], cost: dict, max_nodes: int = 64, extra: int = 0) -> tuple[int, float]:
    """Node budget maximizing expected tokens per step * t(1) / t(1 + nodes + extra); returns (nodes, expected
    speedup). ``extra``: nodes that other proposers add to every verify forward (hybrid's lookup chain)."""
    tree = tree_from_accuracy(acc, max_nodes)
    best, best_gain, total = 1, 0.0, 1.0
    for n, path in enumerate(tree.paths, 1):
        p = 1.0
        for d, r in enumerate(path):
            p *= acc[d][r] if r < len(acc[d]) else 0.0
        total += p
        if n + 1 + extra not in cost:  # only measured sizes: the curve is not smooth (kernel choices per shape)
            continue
        gain = total * cost[1] / cost[n + 1 + extra]
        if gain > best_gain:
            best, best_gain = n, gain
    return best, best_gain


FLAT_CURVE = 1.3  # t(16) / t(1) at most this: a verify forward over 16 tokens costs about what one costs


def hybrid_chain_len(cost: dict | None) -> int:
    """hybrid's prompt-lookup chain: 8 tokens where the verify curve is flat (bf16 on AMX CPUs, GPUs), else 4.

    Lookup's acceptance depends on the text (long when the answer copies, none otherwise), so it is not
    sized like the heads' tree; a chain token is nearly free on a flat curve and costs on a steep one."""
    if cost is None or 16 not in cost:
        return 4
    return 8 if cost[16] / cost[1] <= FLAT_CURVE else 4


ADAPT_EVERY = 8
ADAPTIVE_NOTE = f"re-sized every {ADAPT_EVERY} steps from the acceptance seen"


@dataclasses.dataclass
class DraftInputs:
    """What a proposer is sized from: the user's options, the heads (how many, where their accuracy.json lies,
    how many tokens they draft from), the device's verify-cost curve (None: not sized from it), the model's
    layer count (early exit)."""

    opts: DraftOptions
    depth: int = 0
    """Tokens past the next one the heads draft (:attr:`MTPModel.draft_depth`); 0 without heads."""
    heads_dir: Path | None = None
    cost: dict | None = None
    n_layers: int = 0
    vocab: int | None = None


@dataclasses.dataclass
class Sizing:
    """How a proposer's drafts were sized, and why (shown with results; :meth:`as_dict` for JSON)."""

    method: str
    nodes: int | None = None
    tree: list | str | None = None
    """The tree's paths, or "given" for a --tree."""
    draft_len: int | None = None
    lookup_draft_len: int | None = None
    """hybrid: the prompt-lookup chain beside the tree."""
    exit_layer: int | None = None
    sized_from: str | None = None
    expected_speedup: float | None = None
    """Predicted from the verify cost and the heads' accuracy (hybrid: the tree's alone)."""
    adaptive: str | None = None
    draft_vocab: int | None = None
    bit_exact: bool | None = None
    """llama.cpp: drafts cut at the widest verify it computes as one-token decodes (--bit-exact)."""

    def as_dict(self) -> dict:
        out: dict = {"method": self.method}
        what = "draft_len" if self.method in ("blockwise", "lookup") else "nodes"
        for key, value in (("nodes", self.nodes), ("tree", self.tree), ("draft_len", self.draft_len),
                           ("lookup_draft_len", self.lookup_draft_len), ("exit_layer", self.exit_layer),
                           (f"{what}_from", self.sized_from),
                           ("expected_speedup_of_tree" if self.method == "hybrid" else "expected_speedup",
                            self.expected_speedup),
                           ("adaptive", self.adaptive), ("draft_vocab", self.draft_vocab),
                           ("bit_exact", self.bit_exact)):
            if value is not None:
                out[key] = value
        return out


PROPOSERS: dict[str, "typing.Callable[[DraftInputs], tuple[Proposer, Sizing]]"] = {}
"""Each method's builder: a :class:`DraftInputs` to a proposer and how it was sized."""


def proposer(name: str):
    def wrap(build):
        PROPOSERS[name] = build
        return build
    return wrap


SIZED = "verify cost x head accuracy"


@proposer("plain")
def _plain(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    return PlainProposer(), Sizing("plain")


@proposer("blockwise")
def _blockwise(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    """Blockwise parallel decoding: every head's top-1 as one chain, as long as the curve pays for."""
    n, cost, draft_len = inp.depth, inp.cost, inp.opts.draft_len
    sizing = Sizing("blockwise")
    if draft_len is None and cost is not None:
        acc = rank_accuracy(inp.heads_dir, n)

        def size_chain(a):  # rank 0 of every head: the chain's acceptance probabilities
            return chain_tree(choose_tree([[r[0]] for r in a], cost, max_nodes=n)[0])

        draft_len, gain = choose_tree([[a[0]] for a in acc], cost, max_nodes=n)
        sizing.sized_from, sizing.expected_speedup = SIZED, round(gain, 3)
        if inp.opts.adapt:
            sizing.draft_len, sizing.adaptive = draft_len, ADAPTIVE_NOTE
            return AdaptiveTreeProposer(acc, size_chain, every=ADAPT_EVERY, name="blockwise"), sizing
    sizing.draft_len = min(draft_len or n, n)
    return blockwise(sizing.draft_len), sizing


@proposer("tree")
def _tree(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    """A static tree: the user's --tree, or the accuracy-ranked tree of --nodes or of the size the curve pays for."""
    opts, cost = inp.opts, inp.cost
    acc = rank_accuracy(inp.heads_dir, inp.depth)
    if opts.tree:
        compiled = compile_tree(read_tree(opts.tree), max_depth=inp.depth)
        if inp.vocab is not None and compiled.max_rank > inp.vocab:
            raise UserError(f"--tree asks for rank {compiled.max_rank - 1} but the heads draft from "
                            f"{inp.vocab} tokens: use ranks below {inp.vocab}")
        return TreeProposer(compiled), Sizing("tree", nodes=compiled.size, tree="given")
    sizing = Sizing("tree")
    nodes = _node_budget(opts.nodes, acc, cost, sizing)
    if opts.nodes is None and cost is not None and opts.adapt:
        def size_tree(a):
            return tree_from_accuracy(a, choose_tree(a, cost)[0])

        adaptive = AdaptiveTreeProposer(acc, size_tree, every=ADAPT_EVERY)
        sizing.nodes, sizing.tree, sizing.adaptive = nodes, [list(p) for p in adaptive.tree.paths], ADAPTIVE_NOTE
        return adaptive, sizing
    compiled = tree_from_accuracy(acc, nodes)
    sizing.nodes, sizing.tree = nodes, [list(p) for p in compiled.paths]
    return TreeProposer(compiled), sizing


def _node_budget(nodes: int | None, acc, cost: dict | None, sizing: Sizing) -> int:
    """--nodes, else the size the verify-cost curve pays for (16 without a curve); says which in ``sizing``."""
    if nodes is None:
        if cost is None:
            nodes, sizing.sized_from = 16, "fixed default (no verify-cost curve)"
        else:
            nodes, gain = choose_tree(acc, cost)
            sizing.sized_from, sizing.expected_speedup = SIZED, round(gain, 3)
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    return nodes


@proposer("dynamic")
def _dynamic(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    """A tree grown per step from the heads' own probabilities, of --nodes or of the size the curve pays for."""
    sizing = Sizing("dynamic")
    sizing.nodes = _node_budget(inp.opts.nodes, rank_accuracy(inp.heads_dir, inp.depth), inp.cost, sizing)
    return DynamicTreeProposer(nodes=sizing.nodes, top_k=min(8, sizing.nodes)), sizing


@proposer("hybrid")
def _hybrid(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    """The heads' tree and a prompt-lookup chain in one verify forward; the tree sized with the chain counted."""
    opts, cost = inp.opts, inp.cost
    look_len = opts.draft_len or hybrid_chain_len(cost)
    nodes, sized_from, gain = opts.nodes, None, None
    if nodes is None and opts.tree is None and cost is not None:
        acc = rank_accuracy(inp.heads_dir, inp.depth)
        nodes, gain = choose_tree(acc, cost, extra=look_len)  # 1 if none fits
        sized_from, gain = "verify cost x head accuracy, lookup chain included", round(gain, 3)
        if opts.adapt:
            def size_tree(a):
                return tree_from_accuracy(a, choose_tree(a, cost, extra=look_len)[0])

            tree_proposer = AdaptiveTreeProposer(acc, size_tree, every=ADAPT_EVERY)
            return (UnionProposer([tree_proposer, LookupProposer(draft_len=look_len)]),
                    Sizing("hybrid", nodes=nodes, tree=[list(p) for p in tree_proposer.tree.paths],
                           lookup_draft_len=look_len, adaptive=ADAPTIVE_NOTE, sized_from=sized_from,
                           expected_speedup=gain))
    tree_proposer, sizing = _tree(dataclasses.replace(inp, opts=dataclasses.replace(opts, nodes=nodes, adapt=False)))
    sizing = dataclasses.replace(sizing, method="hybrid", lookup_draft_len=look_len)
    if sized_from is not None:
        sizing.sized_from, sizing.expected_speedup = sized_from, gain
    return UnionProposer([tree_proposer, LookupProposer(draft_len=look_len)]), sizing


LOOKUP_SIZED = "verify cost x the acceptance seen per match length (re-chosen every 8 steps)"


@proposer("lookup")
def _lookup(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    """Prompt lookup: --draft-len tokens, or a length re-chosen while decoding from the verify-cost curve and the
    acceptance its drafts get after matches of each length (:class:`~mtp.decode.proposers.MatchLookupProposer`);
    8 without a curve."""
    if inp.opts.draft_len is None and inp.cost is not None:
        sized = MatchLookupProposer(inp.cost)
        return sized, Sizing("lookup", draft_len=sized.draft_len, sized_from=LOOKUP_SIZED, adaptive=LOOKUP_SIZED)
    draft_len = inp.opts.draft_len or 8
    return LookupProposer(draft_len=draft_len), Sizing("lookup", draft_len=draft_len)


@proposer("early-exit")
def _early_exit(inp: DraftInputs) -> tuple[Proposer, Sizing]:
    layer, draft_len = inp.opts.exit_layer or max(1, inp.n_layers // 2), inp.opts.draft_len or 3
    return EarlyExitProposer(layers=layer, draft_len=draft_len), Sizing("early-exit", exit_layer=layer,
                                                                        draft_len=draft_len)


def make_proposer(method: str, opts: DraftOptions | None = None, *, depth: int = 0, heads_dir: Path | None = None,
                  cost: dict | None = None, n_layers: int = 0, vocab: int | None = None) -> tuple[Proposer, Sizing]:
    """A proposer by name (:data:`PROPOSERS`) and how its drafts were sized (and why).

    Sizes chosen from the verify-cost curve (no --nodes / --draft-len / --tree) start from the held-out
    accuracies and, with ``adapt``, are re-chosen every ``ADAPT_EVERY`` steps from the acceptance seen while
    decoding (:class:`~mtp.decode.proposers.AdaptiveTreeProposer`). ``vocab``: how many tokens the heads draft
    from (a --tree rank must be below it).
    """
    if method not in PROPOSERS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if method in HEAD_METHODS and depth < 1:
        raise UserError(f"method {method!r} drafts with MTP heads: pass --heads DIR or default")
    return PROPOSERS[method](DraftInputs(opts or DraftOptions(), depth, heads_dir, cost, n_layers, vocab))
