"""The decoding loop on llama.cpp's kernels (``--backend llama.cpp``): the same :class:`SpeculativeDecoder`
(proposers, acceptance, stop rules, continuous batching), with the target model a GGUF run in-process by
llama.cpp (:mod:`mtp.engines.llamacpp_lib`) instead of a PyTorch module.

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
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.tree import Draft
from mtp.engines.llamacpp_lib import LlamaContext, RowCache
from mtp.errors import NoRoomYet, UserError

N_SEQ = 64  # sequences in one context: rows x paths of their trees


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


class LlamaCppDecoder(SpeculativeDecoder):
    """:class:`SpeculativeDecoder` whose backbone forwards run in llama.cpp (see the module's text)."""

    def __init__(self, target: LlamaCppBackbone, tokenizer, **kw):
        super().__init__(target, tokenizer, **kw)
        if self.proposer.name == "early-exit":
            raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")
        self.target = target

    def reset(self) -> None:
        super().reset()
        target = getattr(self, "target", None)
        if target is not None and target.rows.rows:
            target.rows.keep_rows([])

    def _check_room(self, requests, total: int, capacity: int) -> None:
        """Every row reserves its prompt, its new tokens and a tree's cells; the cells of dropped tree nodes count
        too (see :class:`~mtp.engines.llamacpp_lib.RowCache`). Rows that would fit an empty context but not beside
        the running ones raise :class:`NoRoomYet` (a server queues them)."""
        rows = self.target.rows
        cells = [len(r.prompt) + r.max_new_tokens + 64 for r in requests]
        own = sum(cells)
        running = sum(len(r.prompt) + r.max_new_tokens + 64 for r in self.requests)  # held until the row leaves
        n_ctx = self.target.ctx.n_ctx
        if max(cells) > n_ctx:
            big = requests[cells.index(max(cells))]
            raise UserError(f"a prompt of {len(big.prompt)} tokens + {big.max_new_tokens} new tokens needs "
                            f"{max(cells)} KV cells, llama.cpp's context holds {n_ctx}: ask for fewer new tokens")
        if total > rows.ctx.n_seq // 2:
            raise UserError(f"at most {rows.ctx.n_seq // 2} rows on --backend llama.cpp, got {total}")
        if own + running + rows.dropped > n_ctx:
            raise NoRoomYet(f"{len(requests)} new row(s) need {own} KV cells; the {len(self.requests)} running ones "
                            f"hold {running + rows.dropped} of llama.cpp's {n_ctx}: decode fewer prompts at once")

    @contextlib.contextmanager
    def session(self):
        """llama.cpp returns the states of the layers the heads tap (no PyTorch hooks)."""
        self._mask_dtype = torch.float32
        self._taps = {}
        try:
            yield self
        finally:
            self._taps = None

    def _layers(self) -> tuple[int, ...]:
        return tuple(self.mtp.tapped) if self.n_run else ()

    def _prefill_backbone(self, ids, pos, valid, capacity: int, requests):
        # transformer heads and EAGLE-3 read every prompt position; the others the last one only
        every = self.eagle or self.transformer_heads
        logits, states = self.target.rows.add_rows([r.context for r in requests], self._layers(), every)
        self.forwards += 1
        if states is not None:  # (B, L, H) per layer, left-padded like ``ids``
            padded = []
            for s in states:
                full = torch.zeros(ids.shape[0], ids.shape[1], self.target.ctx.n_embd, dtype=self._heads_dtype())
                if every:
                    for r, rows in enumerate(s):
                        full[r, ids.shape[1] - len(rows):] = torch.from_numpy(rows)
                else:
                    full[:, -1] = torch.from_numpy(s)
                padded.append(full)
            states = padded
        return torch.from_numpy(logits)[:, None], states

    def _verify(self, q_tokens, q_pos, allowed_new, draft: Draft):
        active = [i for i, d in enumerate(self.done) if not d]
        logits, states = self.target.rows.verify(q_tokens.tolist(), draft.parents.tolist(), draft.valid.tolist(),
                                                 active)
        self.forwards += 1
        if states is not None:
            states = [torch.from_numpy(s).to(self._heads_dtype()) for s in states]
        return torch.from_numpy(logits), states

    def _heads_dtype(self) -> torch.dtype:
        return next(self.mtp.parameters()).dtype

    def _commit(self, keep_idx, keep_valid, lengths: list[int]) -> None:
        idx = keep_idx.tolist()
        self.target.rows.commit({i: idx[i][:n] for i, n in enumerate(lengths) if n})

    def _join_cache(self, new) -> None:
        pass  # the new rows were appended to the same llama.cpp context

    def _select_cache(self, index, keep: list[int]) -> None:
        self.target.rows.keep_rows(keep)

    def shallow_chain(self, layers: int, length: int) -> torch.Tensor:
        raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")


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
    sizes; ``mtp serve`` and ``bench decode`` measure up front, :meth:`LlamaCppDecoder.prepare`)."""
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
