"""The decoding loop on llama.cpp's kernels (``--backend llama.cpp``): the same :class:`SpeculativeDecoder`
(proposers, acceptance, stop rules, continuous batching), with the target model a GGUF run in-process by
llama.cpp (:mod:`mtp.engines.llamacpp_lib`) instead of a PyTorch module.

- prefill: each new row's prompt into its own llama.cpp sequence;
- verify: every row's [root] + draft tree in one ``llama_decode``, each root-to-leaf path a sequence, so
  llama.cpp's own mask is the tree-attention mask (:class:`~mtp.engines.llamacpp_lib.RowCache`);
- commit: the accepted path stays in the row's sequence, the rest of the step is dropped (bitset edits);
- rows that leave free their sequence.

Logits come back as float32 numpy arrays and enter the acceptance rules as CPU tensors (no copy). Heads are
not run on this backend yet (they read PyTorch hidden states); drafts without heads (prompt lookup) and plain
decoding are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.tree import Draft
from mtp.engines.llamacpp_lib import LlamaContext, RowCache
from mtp.errors import UserError

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
        if kw.get("mtp_model") is not None:
            raise UserError("--backend llama.cpp drafts without heads for now (plain, lookup): "
                            "heads run on --backend torch")
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
        rows = self.target.rows
        running = sum(len(r.prompt) + r.max_new_tokens for r in self.requests)
        need = running + sum(len(r.prompt) + r.max_new_tokens for r in requests) + 64 * total
        if need > self.target.ctx.n_ctx:
            raise UserError(f"{total} row(s) need {need} KV cells, llama.cpp's context holds "
                            f"{self.target.ctx.n_ctx}: decode fewer prompts at once or fewer new tokens")
        if total > rows.ctx.n_seq // 2:
            raise UserError(f"at most {rows.ctx.n_seq // 2} rows on --backend llama.cpp, got {total}")

    def _prefill_backbone(self, ids, pos, valid, capacity: int, requests):
        logits, _ = self.target.rows.add_rows([list(r.prompt) for r in requests])
        return torch.from_numpy(logits)[:, None], None

    def _verify(self, q_tokens, q_pos, allowed_new, draft: Draft):
        active = [i for i, d in enumerate(self.done) if not d]
        logits, _ = self.target.rows.verify(q_tokens.tolist(), draft.parents.tolist(), draft.valid.tolist(), active)
        return torch.from_numpy(logits), None

    def _commit(self, keep_idx, keep_valid, lengths: list[int]) -> None:
        idx = keep_idx.tolist()
        self.target.rows.commit({i: idx[i][:n] for i, n in enumerate(lengths) if n})

    def _join_cache(self, old: dict) -> None:
        pass  # the new rows were appended to the same llama.cpp context

    def _select_cache(self, index, keep: list[int]) -> None:
        self.target.rows.keep_rows(keep)

    def shallow_chain(self, layers: int, length: int) -> torch.Tensor:
        raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")


def verify_curve(target: LlamaCppBackbone, context: int = 301, ks=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                 repeats: int = 7) -> dict[int, float]:
    """llama.cpp's cost t(k), in ms, of verifying a chain of k tokens (one decode, logits of all k read back as
    the decoder reads them) after a cached ``context``-token prompt: the median of ``repeats`` after a warm-up.
    What the draft sizes of this backend follow, and the ceiling a method can reach: tau * t(1) / t(k)."""
    import statistics
    import time

    rows = target.rows
    if rows.rows:
        raise RuntimeError("verify_curve needs the target to itself (no running rows)")
    vocab = target.ctx.n_vocab
    prompt = [(17 + 31 * i) % vocab for i in range(context)]
    rows.add_rows([prompt])
    try:
        out = {}
        for k in ks:
            tokens = [[(101 + 7 * j) % vocab for j in range(k)]]
            parents, valid = [list(range(-1, k - 2))], [[True] * (k - 1)]
            times = []
            for rep in range(repeats + 1):
                start = time.perf_counter()
                rows.verify(tokens, parents, valid)
                elapsed = time.perf_counter() - start
                rows.commit({0: [0]})
                rows.ctx.seq_rm(rows.base[0], context)  # back to the prompt alone
                rows.past[0] = context
                if rep:
                    times.append(elapsed * 1000)
            out[k] = round(statistics.median(times), 3)
        return out
    finally:
        rows.keep_rows([])
