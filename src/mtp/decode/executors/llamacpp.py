"""The llama.cpp executor (``--backend llama.cpp``): the decoder's target model a GGUF run in-process by llama.cpp
(:mod:`mtp.engines.llamacpp_lib`) instead of a PyTorch module, under the same decoding loop (proposers,
acceptance, stop rules, continuous batching).

- prefill: each new row's prompt into its own llama.cpp sequence;
- verify: every row's [root] + draft tree in one ``llama_decode``, each root-to-leaf path a sequence, so
  llama.cpp's own mask is the tree-attention mask (:class:`~mtp.engines.llamacpp_lib.RowCache`);
- commit: the accepted path stays in the row's sequence, the rest of the step is dropped (bitset edits);
- rows that leave free their sequence.

Logits come back as float32 numpy arrays and enter the acceptance rules as CPU tensors (no copy). Heads run in
PyTorch on the states llama.cpp returns for the layers they tap (the last layer's output before the final norm
for ``--tap last``: a source fix records it, :mod:`mtp.engines.patches`), with the unembedding of the PyTorch
model they were loaded on. Heads that read every prompt position (transformer heads, EAGLE-3) get the states of
every prompt token from the prefill; the others the last token's only.

Also here: llama.cpp's verify curve t(k) on this machine (:func:`verify_curve`), measured once and cached, which
sizes the drafts on this backend.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mtp.decode.executors import Executor
from mtp.decode.tree import Draft
from mtp.engines.llamacpp_lib import LlamaContext, RowCache
from mtp.errors import NoRoomYet, UserError

N_SEQ = 64  # sequences in one context: rows x paths of their trees
KV_VIEW_PAD = 256  # llama.cpp attends a view of its KV cells padded to this (src/llama-kv-cache.cpp, get_n_kv)


class LlamaCppBackbone:
    """A GGUF target in llama.cpp, standing where the decoder's PyTorch backbone stands: ``config`` (the model's
    Hugging Face config: context length, layers), ``device`` (the CPU) and ``dtype`` (of the logits)."""

    def __init__(self, gguf: str | Path, config, n_ctx: int = 4096, threads: int | None = None,
                 n_seq: int = N_SEQ, n_batch: int = 512):
        self.gguf = Path(gguf)
        self.config = config
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.ctx = LlamaContext(self.gguf, n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch,
                                threads=threads or default_threads())
        self.rows = RowCache(self.ctx)
        self.generation_config = None  # the model's (its EOS ids), set by whoever loads it

    def close(self) -> None:
        self.ctx.close()


def default_threads() -> int:
    """llama.cpp's threads: the CPUs this process may run on (``MTP_LLAMA_THREADS`` overrides)."""
    env = os.environ.get("MTP_LLAMA_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LlamaCppExecutor(Executor):
    """:class:`~mtp.decode.executors.Executor` on a :class:`LlamaCppBackbone` (see the module's text). Its rows live
    in the target's llama.cpp context, not in the decoder's batch; one decoder decodes on a target at a time."""

    name = "llama.cpp"

    def __init__(self, target: LlamaCppBackbone, bit_exact: bool = False):
        self.target, self.config, self.device = target, target.config, target.device
        self._taps, self._every, self._dtype = (), False, torch.float32
        self.bit_exact = bit_exact

    @contextlib.contextmanager
    def session(self, taps: tuple[int, ...], every_position: bool = False, states_dtype: torch.dtype | None = None):
        """llama.cpp returns the states of the layers the heads tap with the logits (no hooks)."""
        self._taps, self._every, self._dtype = tuple(taps), every_position, states_dtype or torch.float32
        try:
            yield self
        finally:
            self._taps, self._every = (), False

    def reset(self) -> None:
        if self.target.rows.rows:
            self.target.rows.keep_rows([])

    def check_room(self, running, requests, total: int, capacity: int) -> None:
        """Every row reserves its prompt, its new tokens and a tree's cells; the cells of dropped tree nodes count
        too (see :class:`~mtp.engines.llamacpp_lib.RowCache`). Rows that would fit an empty context but not beside
        the running ones raise :class:`NoRoomYet` (a server queues them)."""
        rows = self.target.rows
        cells = [len(r.prompt) + r.max_new_tokens + 64 for r in requests]
        own = sum(cells)
        held = sum(len(r.prompt) + r.max_new_tokens + 64 for r in running.requests)  # held until the row leaves
        n_ctx = self.target.ctx.n_ctx
        if max(cells) > n_ctx:
            big = requests[cells.index(max(cells))]
            raise UserError(f"a prompt of {len(big.prompt)} tokens + {big.max_new_tokens} new tokens needs "
                            f"{max(cells)} KV cells, llama.cpp's context holds {n_ctx}: ask for fewer new tokens")
        if total > rows.ctx.n_seq // 2:
            raise UserError(f"at most {rows.ctx.n_seq // 2} rows on --backend llama.cpp, got {total}")
        if own + held + rows.dropped > n_ctx:
            raise NoRoomYet(f"{len(requests)} new row(s) need {own} KV cells; the {len(running.requests)} running "
                            f"ones hold {held + rows.dropped} of llama.cpp's {n_ctx}: decode fewer prompts at once")

    def prefill(self, batch, ids, pos, valid, capacity: int, requests):
        every = self._every
        logits, states = self.target.rows.add_rows([r.context for r in requests], self._taps, every)
        if states is not None:  # (B, L, H) per layer, left-padded like ``ids``
            padded = []
            for s in states:
                full = torch.zeros(ids.shape[0], ids.shape[1], self.target.ctx.n_embd, dtype=self._dtype)
                if every:
                    for r, rows in enumerate(s):
                        full[r, ids.shape[1] - len(rows):] = torch.from_numpy(rows)
                else:
                    full[:, -1] = torch.from_numpy(s)
                padded.append(full)
            states = padded
        return torch.from_numpy(logits)[:, None], states

    def fit(self, batch, draft: Draft) -> Draft:
        """--bit-exact: no node past the end of the row's KV view. llama.cpp pads its view to KV_VIEW_PAD cells and
        its attention splits the keys across threads in chunks of view / threads, so a verify that makes the view
        grow computes its first tokens over another split than their one-token decodes did (up to 0.3 in qwen's
        logits): such a row verifies only the tokens that fit below the view's next step."""
        if not self.bit_exact or not draft.size:
            return draft
        rows = self.target.rows
        used = max(rows.past, default=0) + rows.dropped  # the cells the next token's cell lies beyond
        room = -(-(used + 1) // KV_VIEW_PAD) * KV_VIEW_PAD - used - 1  # draft tokens the view holds as it is
        if draft.size <= room:
            return draft
        valid = draft.valid & (draft.depth() <= room)
        return Draft(draft.tokens, draft.parents, valid)

    def verify(self, batch, q_tokens, q_pos, allowed_new, draft: Draft):
        active = [i for i, d in enumerate(batch.done) if not d]
        logits, states = self.target.rows.verify(q_tokens.tolist(), draft.parents.tolist(), draft.valid.tolist(),
                                                 active)
        if states is not None:
            states = [torch.from_numpy(s).to(self._dtype) for s in states]
        return torch.from_numpy(logits), states

    def commit(self, batch, keep_idx, keep_valid, lengths: list[int]) -> None:
        idx = keep_idx.tolist()
        self.target.rows.commit({i: idx[i][:n] for i, n in enumerate(lengths) if n})

    def join(self, batch, new) -> None:
        pass  # the new rows were appended to the same llama.cpp context

    def select(self, batch, index, keep: list[int]) -> None:
        self.target.rows.keep_rows(keep)


LLAMA_POINTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)  # where llama.cpp's verify curve is measured


def verify_curve(target: LlamaCppBackbone, context: int = 256, points=LLAMA_POINTS, repeats: int = 7,
                 warmup: int = 2, batch: int = 1) -> dict[int, float]:
    """llama.cpp's cost t(k), in seconds (the median of ``repeats``), of verifying a chain of k tokens in each of
    ``batch`` rows -- one decode, the logits of all read back as the decoder reads them -- after a cached
    ``context``-token prompt per row. Rounds over every k, alternating direction, like
    :func:`mtp.decode.methods.verify_cost` (same format: the draft sizing reads either; per row, t_B(k) of B rows
    at once). The ceiling a method can reach is tau * t(1) / t(k)."""
    import statistics
    import time

    rows = target.rows
    if rows.rows:
        raise RuntimeError("verify_curve needs the target to itself (no running rows)")
    vocab = target.ctx.n_vocab
    rows.add_rows([[(17 + 31 * i + 5 * b) % vocab for i in range(context)] for b in range(batch)])
    times: dict[int, list[float]] = {k: [] for k in points}
    try:
        for r in range(warmup + repeats):
            for k in (points if r % 2 == 0 else points[::-1]):
                tokens = [[(101 + 7 * j + 3 * b) % vocab for j in range(k)] for b in range(batch)]
                start = time.perf_counter()
                rows.verify(tokens, [list(range(-1, k - 2))] * batch, [[True] * (k - 1)] * batch)
                elapsed = time.perf_counter() - start
                rows._step = None  # no commit: every row back to its prompt alone (chains: no spare sequences)
                for b in range(batch):
                    rows.ctx.seq_rm(rows.base[b], context)
                    rows.past[b] = context
                if r >= warmup:
                    times[k].append(elapsed)
        return {k: statistics.median(ts) for k, ts in times.items()}
    finally:
        rows.keep_rows([])


def _curve_key(target: LlamaCppBackbone) -> str:
    """The GGUF file, CPU, thread count and llama.cpp build a curve was measured on."""
    import hashlib
    import json

    from mtp.engines import llamacpp
    from mtp.machine import cpu_signature

    st = target.gguf.stat()
    raw = json.dumps([str(target.gguf.resolve()), st.st_size, int(st.st_mtime), cpu_signature(),
                      target.ctx.threads, llamacpp.build_stamp()], sort_keys=True)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cached_verify_curve(target: LlamaCppBackbone) -> dict[int, float]:
    """:func:`verify_curve` measured once per GGUF file, CPU, thread count and llama.cpp build; kept in the user
    cache beside the PyTorch curves."""
    from mtp.decode.methods import _measured_once

    def measure():
        # one decoder decodes on a target at a time: what an earlier one left when its generate call ended goes
        # (a server builds its decoder, and measures, before it takes requests)
        if target.rows.rows:
            target.rows.keep_rows([])
        return verify_curve(target)

    return _measured_once(f"llama.cpp-{_curve_key(target)}.json", lambda d: {int(k): float(v) for k, v in d.items()},
                          measure, f"llama.cpp's verify cost t(k) for {target.gguf.name}")


def cached_batch_curve(target: LlamaCppBackbone, batch: int, cost: dict[int, float]) -> dict[int, float] | None:
    """llama.cpp's verify curve for ``batch`` rows at once (rounded up to a power of two), measured once like
    :func:`cached_verify_curve`: from 2 rows on a batch's verify is compute-bound sooner (on a 2-core EPYC, 8
    one-token rows of the packaged Q4_1 smollm2 cost 6.1x one), so drafts that pay for one row do not for eight.
    The measurement needs the context to itself: with rows running and nothing cached, None (the caller keeps its
    sizes; ``mtp serve`` and ``bench decode`` measure up front:
    :meth:`~mtp.decode.engine.SpeculativeDecoder.prepare`)."""
    import json

    from mtp.decode.methods import BATCH_POINTS, _measured_once, batch_bucket, cache_dir

    b = batch_bucket(batch)
    if b == 1:
        return cost
    name = f"llama.cpp-{_curve_key(target)}.batch{b}.json"
    parse = lambda d: {int(k): float(v) for k, v in d.items()}  # noqa: E731
    if target.rows.rows:  # cannot measure now
        try:
            return parse(json.loads(cache_dir("verify", name).read_text()))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
    cells = b * (256 + max(BATCH_POINTS) + 8)
    if cells > target.ctx.n_ctx or b > target.ctx.n_seq // 2:
        return None  # this context cannot hold the measurement (a small --ctx-size): keep one row's sizes
    return _measured_once(name, parse, lambda: verify_curve(target, points=BATCH_POINTS, repeats=5, warmup=1, batch=b),
                          f"llama.cpp's verify cost for {b} rows at once")


EXACT_CONTEXTS = (64, 300)  # a KV view of 256 cells, and of 512 (from where llama.cpp's attention splits a query)


def exact_width(target: LlamaCppBackbone, contexts=EXACT_CONTEXTS, max_k: int = 16) -> int:
    """The most tokens one decode of ``target`` takes whose logits are bit for bit those of decoding the same
    tokens one at a time (plain decoding): 1 where no batch is. A verify wider than this rounds differently from
    plain decoding somewhere (llama.cpp's repacked quantized kernels take rows in fours and round otherwise than
    their one-row kernels: qwen2.5-coder-0.5b's Q4_K_M gives 3 here), and a greedy near-tie can then go the other
    way. Measured after a prompt of each length in ``contexts`` (below and past the 512-cell view where llama.cpp's
    attention splits a lone query's keys across threads: the fix ``fa-split-kv-every-row`` in
    :mod:`mtp.engines.patches` makes a batch's queries split alike), a chain of k synthetic tokens against the same
    tokens decoded one by one, k = 2, 3, ... until one differs."""
    import numpy as np

    rows = target.rows
    if rows.rows:
        raise RuntimeError("exact_width needs the target to itself (no running rows)")
    vocab = target.ctx.n_vocab
    follow = [(101 + 7 * j) % vocab for j in range(max_k)]
    width = max_k
    for n in contexts:
        if n + max_k + 1 > target.ctx.n_ctx:
            break
        rows.add_rows([[(17 + 31 * i) % vocab for i in range(n)]])
        try:
            ref = []
            for t in follow[:width]:  # plain decoding: one token per decode
                logits, _ = rows.verify([[t]], [[]], [[]])
                rows.commit({0: [0]})
                ref.append(logits[0, 0])
            rows.ctx.seq_rm(rows.base[0], n)  # the last cells: the chains below refill them in order
            rows.past[0] = n
            for k in range(2, width + 1):
                logits, _ = rows.verify([follow[:k]], [list(range(-1, k - 2))], [[True] * (k - 1)])
                rows._step = None  # no commit: back to the prompt alone (a chain: no spare sequences)
                rows.ctx.seq_rm(rows.base[0], n)
                rows.past[0] = n
                if not np.array_equal(logits[0], np.stack(ref[:k])):
                    width = k - 1
                    break
        finally:
            rows.keep_rows([])
        if width == 1:
            break
    return width


def cached_exact_width(target: LlamaCppBackbone) -> int:
    """:func:`exact_width` measured once per GGUF file, CPU, thread count and llama.cpp build (like the curve)."""
    from mtp.decode.methods import _measured_once

    if target.ctx.n_ctx < max(EXACT_CONTEXTS) + 17:  # too small a context to measure past the 512-cell view
        if target.rows.rows:
            target.rows.keep_rows([])
        return exact_width(target)  # what this context shows; not kept for larger ones

    def measure():
        if target.rows.rows:
            target.rows.keep_rows([])
        return {"width": exact_width(target)}

    return _measured_once(f"llama.cpp-{_curve_key(target)}.exact.json", lambda d: {"width": int(d["width"])},
                          measure, f"the widest verify llama.cpp computes like one-token decodes for "
                                   f"{target.gguf.name}")["width"]
