"""llama.cpp in-process: a GGUF model and its context through llama-cpp-python's low-level ctypes bindings.

The bindings (``llama_cpp.llama_cpp``) come from the same pinned sdist as the sources ``mtp engines setup
llama.cpp`` builds, and load that build's ``libllama.so`` (``LLAMA_CPP_LIB_PATH``), so the Python structs
match the library field for field. What a tree verifier needs from llama.cpp is all in its C API:

- a token of a batch may belong to several sequences (``llama_batch.seq_id[i]`` is a list) and the attention
  mask is built from sequence membership and positions (a query sees the cells of its *first* sequence id
  at positions up to its own; src/llama-kv-cache.cpp ``set_input_kq_mask``), so one ``llama_decode`` over a
  tree's nodes, each in the sequences of every root-to-leaf path through it, verifies the whole tree;
- with a unified KV cache (``kv_unified``) a cell holds a bitset of sequence ids and ``seq_cp`` / ``seq_rm``
  edit those bitsets: keeping the accepted path and dropping the rest costs no copy of keys or values;
- with ``embeddings`` on and pooling NONE a decode returns, beside the logits, the final hidden state (after
  the final norm) of every output token.

:class:`LlamaContext` wraps one model + context + batch: ``decode`` fills the batch from Python lists and
returns the logits (and hidden states) of the tokens that asked for them as numpy arrays (copies: the
library reuses its buffers). Everything llama.cpp refuses is a :class:`~mtp.errors.UserError` in one line.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import numpy as np

from mtp.engines import llamacpp
from mtp.errors import UserError

_LOCK = threading.Lock()
_LIB = None
_LOG: list[str] = []  # llama.cpp's last log lines (errors are explained from them)


def bindings():
    """The ``llama_cpp.llama_cpp`` module, loading this build's ``libllama.so`` (once per process)."""
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        lib_dir, py_dir = llamacpp.library_dir(), llamacpp.bindings_dir()
        if not (lib_dir / "libllama.so").is_file() or not (py_dir / "llama_cpp" / "llama_cpp.py").is_file():
            raise UserError(f"llama.cpp's library or Python bindings are not built ({lib_dir}): "
                            f"{llamacpp.BUILD_HINT}")
        loaded = sys.modules.get("llama_cpp")
        if loaded is not None and Path(getattr(loaded, "__file__", "")).parent.parent != py_dir:
            raise UserError(f"another llama_cpp package is already imported ({loaded.__file__}): mtp runs "
                            "llama.cpp through the bindings of its own build; import mtp's backend first")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
        if str(py_dir) not in sys.path:
            sys.path.insert(0, str(py_dir))
        try:
            import llama_cpp.llama_cpp as ll
        except (OSError, ImportError) as e:
            raise UserError(f"llama.cpp's bindings do not load ({e}): rebuild with `mtp engines setup llama.cpp`") \
                from None
        ll.llama_backend_init()
        _quiet(ll)
        _LIB = ll
        return ll


def _quiet(ll) -> None:
    """llama.cpp's log goes to a ring of recent lines, not to the terminal (MTP_LLAMA_LOG=1: stderr too)."""
    echo = os.environ.get("MTP_LLAMA_LOG") == "1"

    @ll.llama_log_callback
    def log(level, text, user_data):
        line = (text or b"").decode("utf-8", "replace")
        _LOG.append(line)
        del _LOG[:-50]
        if echo:
            sys.stderr.write(line)

    _quiet.callback = log  # the C side holds a pointer: keep the Python object alive
    ll.llama_log_set(log, ctypes.c_void_p(0))


def _staging(ll):
    """llama.cpp's staging API for layer states (src/llama-ext.h: C++ linkage, so mangled names): set and get."""
    fns = getattr(_staging, "fns", None)
    if fns is None:
        lib = ll._lib
        try:
            enable = lib._Z30llama_set_embeddings_layer_inpP13llama_contextjb
            get = lib._Z30llama_get_embeddings_layer_inpP13llama_contextj
        except AttributeError:
            raise UserError("this llama.cpp build has no layer-state API (llama_set_embeddings_layer_inp): "
                            "rebuild with `mtp engines setup llama.cpp`") from None
        enable.argtypes, enable.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None
        get.argtypes, get.restype = [ctypes.c_void_p, ctypes.c_uint32], ctypes.POINTER(ctypes.c_float)
        fns = _staging.fns = (enable, get)
    return fns


def _last_error() -> str:
    lines = [ln.strip() for ln in _LOG if ln.strip()]
    return lines[-1] if lines else "no message"


class LlamaContext:
    """One GGUF model, one context with a unified KV cache for ``n_seq`` sequences, and one batch buffer.

    :meth:`capture` makes every decode also return the residual stream at chosen layers (index i: the output of
    layer i, 0 the embeddings, n_layer the last layer's output before the final norm, which mtp's heads read).
    ``repack``: llama.cpp's repacked CPU weights (its fast small-batch kernels); ``MTP_LLAMA_NO_REPACK=1``
    turns them off (the ``--no-repack`` of llama-server).
    """

    def __init__(self, gguf: str | Path, n_ctx: int = 4096, n_seq: int = 1, n_batch: int = 512,
                 threads: int | None = None, repack: bool | None = None):
        ll = self.ll = bindings()
        path = Path(gguf)
        if not path.is_file():
            raise UserError(f"no GGUF file at {path}")
        if not 1 <= n_seq <= 256:
            raise UserError(f"llama.cpp runs 1 to 256 sequences in one context, asked for {n_seq}")
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = (os.environ.get("MTP_LLAMA_NO_REPACK") != "1") if repack is None else repack
        self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise UserError(f"llama.cpp cannot load {path}: {_last_error()}")
        self.ctx = self.batch = None
        try:
            cparams = ll.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
            cparams.n_seq_max = n_seq
            threads = threads or min(os.cpu_count() or 1, 8)
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.kv_unified = True  # sequences share the cells; seq_cp / seq_rm edit bitsets
            cparams.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
            cparams.no_perf = True
            if os.environ.get("MTP_LLAMA_FA") is not None:  # flash attention: -1 auto (default), 0 off, 1 on
                cparams.flash_attn_type = int(os.environ["MTP_LLAMA_FA"])
            self.ctx = ll.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise UserError(f"llama.cpp cannot make a context for {path} (n_ctx {n_ctx}, {n_seq} sequences): "
                                f"{_last_error()}")
            self.mem = ll.llama_get_memory(self.ctx)
            self.n_ctx, self.n_seq, self.n_batch, self.threads = ll.llama_n_ctx(self.ctx), n_seq, n_batch, threads
            self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
            self.n_embd = ll.llama_model_n_embd(self.model)
            self.batch = ll.llama_batch_init(n_batch, 0, n_seq)
            self.n_layer = ll.llama_model_n_layer(self.model)
            # a row's cells stay what its prompt put there: not so where llama.cpp may overwrite cells that left a
            # sliding window (gemma3) or keeps a recurrent state instead
            self.shares_prefixes = (ll.llama_model_n_swa(self.model) == 0
                                    and not ll.llama_model_is_recurrent(self.model)
                                    and not ll.llama_model_is_hybrid(self.model))
            self.captured: tuple[int, ...] = ()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ decoding

    def decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]] | list[int],
               outputs: list[bool] | None = None) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """One ``llama_decode`` of ``tokens`` at ``positions``, token i in the sequences ``seqs[i]`` (an int: one
        sequence). Returns the logits (n_out, V) float32 of the tokens whose ``outputs`` flag is set (all by
        default), in batch order, and their states: one (n_out, H) array per captured layer (:meth:`capture`),
        else None."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise UserError(f"a llama.cpp decode takes 1 to {self.n_batch} tokens, got {n}")
        outputs = [True] * n if outputs is None else outputs
        if self.captured and not all(outputs):
            raise RuntimeError("with layers captured every token of a decode must be an output")
        b = self.batch
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i] = tokens[i], positions[i]
            s = seqs[i]
            if isinstance(s, int):
                b.n_seq_id[i], b.seq_id[i][0] = 1, s
            else:
                b.n_seq_id[i] = len(s)
                for j, sid in enumerate(s):
                    b.seq_id[i][j] = sid
            b.logits[i] = outputs[i]
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise UserError(f"llama.cpp's decode of {n} tokens failed (status {rc}"
                            f"{': the KV cache is full' if rc == 1 else ''}): {_last_error()}")
        n_out = sum(1 for o in outputs if o)
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab)).copy()
        hidden = None
        if self.captured:
            get = _staging(self.ll)[1]
            hidden = [np.ctypeslib.as_array(get(self.ctx, il), shape=(n, self.n_embd)).copy() for il in self.captured]
        return logits, hidden

    def capture(self, layers) -> None:
        """Return the residual stream at ``layers`` (see the class text) from every decode, as a list of (n, H)
        arrays in that order; () stops it. Every token of a decode is then an output. Changing the set makes
        llama.cpp re-plan its graph once (a few ms)."""
        layers = tuple(int(i) for i in layers)
        if any(not 0 <= i <= self.n_layer for i in layers):
            raise UserError(f"layers to capture must be in 0..{self.n_layer}, got {list(layers)}")
        if layers == self.captured:
            return
        enable = _staging(self.ll)[0]
        for il in set(self.captured) | set(layers):
            enable(self.ctx, il, il in layers)
        self.captured = layers

    # ------------------------------------------------------------------ the KV cache by sequence

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Remove ``seq`` from the cells at positions [p0, p1) (-1: open); cells left in no sequence are free."""
        self.ll.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Add ``dst`` to the cells of ``src`` at positions [p0, p1): no keys or values are copied."""
        self.ll.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        """The largest position ``seq`` holds (-1: empty)."""
        return self.ll.llama_memory_seq_pos_max(self.mem, seq)

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.mem, True)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        ll = self.ll
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- a tree as llama.cpp sequences


class TreeLayout:
    """A draft tree below a root as llama.cpp sequences: every root-to-leaf path is one sequence, every node
    belongs to the sequences of all paths through it, nodes go into the batch in level order (positions never
    decrease within a sequence, as llama.cpp requires). Query index 0 is the root; node j (1..N) has the query
    parent ``parents[j - 1] + 1``; nodes whose ``valid`` is False (a batch's padding) are left out."""

    def __init__(self, parents: list[int], valid: list[bool]):
        n = len(parents)
        parent_q = [0] + [p + 1 for p in parents]
        ok = [True] + [bool(v) for v in valid]
        depth = [0] * (n + 1)
        for j in range(1, n + 1):  # parents may come after their children in the draft: walk up
            d, k = 0, j
            while k:
                k, d = parent_q[k], d + 1
            depth[j] = d
        has_child = [False] * (n + 1)
        for j in range(1, n + 1):
            if ok[j]:
                has_child[parent_q[j]] = True
        self.leaves = [j for j in range(n + 1) if ok[j] and not has_child[j]]
        member: list[list[int]] = [[] for _ in range(n + 1)]
        for path, leaf in enumerate(self.leaves):
            k = leaf
            while True:
                member[k].append(path)
                if k == 0:
                    break
                k = parent_q[k]
        self.order = sorted((j for j in range(n + 1) if ok[j]), key=lambda j: depth[j])  # level order, root first
        self.depth = depth
        self.paths = member  # per query index: the paths (0 .. n_paths-1) through it
        self.n_paths = len(self.leaves)

    def path_through(self, q: int) -> int:
        """A path (sequence) that holds node ``q`` and its ancestors."""
        return self.paths[q][0]


SHARE_PREFIX_MIN = 16  # the shortest shared prompt prefix a server's joining row reads from a running row's cells


class RowCache:
    """The rows of a decoding batch in one llama.cpp context: each row a base sequence holding its committed
    tokens; a verify step adds one spare sequence per extra path of the row's tree, and the commit keeps the
    accepted path in the base sequence and drops the rest (bitset edits, no copies).

    Dropped tree nodes are not freed at once: they move to a sequence of their own (the last id, never decoded),
    so the cells stay taken. A freed cell is reused by the next token llama.cpp stores, and a token stored in a cell
    that lies before the cells of earlier positions of its sequence (a rejected sibling's, below an accepted node's)
    is attended in another order: llama.cpp's CPU flash attention accumulates V in float16 over cells in cell
    order, so the logits round differently (smollm2-135m Q4_1: off by up to 0.67 after such a commit; the mask is
    right, and with flash attention off the result does not depend on the order, but then a k-token batch rounds
    differently from one-token decodes even at short contexts, which breaks identity with plain decoding where
    flash attention keeps it). A chain (whose rejected cells are the last ones) refills them in order: a lone
    row's chain frees its rejected tail at once. tests/test_llamacpp_backend.py holds the case.

    The dropped cells cost only their masked entries in attention; ``n_ctx`` must hold them (``dropped``). They are
    freed when no row is left, or, with ``max_dropped`` (a server, whose batch may never empty), once they pass
    it: from then on rows round as described above (still the model's computation, in another order). They also
    make the cache longer sooner: llama.cpp attends a view padded to 256 cells and splits its keys across threads by
    the view's length, so where cells lie changes the rounding (the source fix fa-split-kv-every-row makes a few
    query tokens split as one does; --bit-exact keeps a lone row's verify inside its view,
    :meth:`~mtp.decode.executors.llamacpp.LlamaCppExecutor.fit`)."""

    def __init__(self, ctx: LlamaContext):
        self.ctx = ctx
        self.base: list[int] = []  # per row: its sequence id
        self.past: list[int] = []  # per row: committed tokens (the next position)
        self.trash = ctx.n_seq - 1  # where dropped tree nodes go (see the class text)
        self._free = list(range(ctx.n_seq - 2, -1, -1))  # a stack, lowest id on top
        self._step = None  # the last verify's layouts and spare sequences, until its commit
        self.dropped = 0  # cells held by dropped tree nodes
        self.max_dropped: int | None = None  # free them once they pass this many (None: only when no row is left)
        self.compactions = 0
        self.prompts: list[list[int]] = []  # per row: its prompt (what a joining row's prompt may share)
        self.share_prefix = 0  # a joining prompt reuses a running row's cells of a prefix this long or longer (0: off)
        self.shared_tokens = 0  # prompt tokens not computed again so far

    @property
    def rows(self) -> int:
        return len(self.base)

    def _take(self) -> int:
        if not self._free:
            raise UserError(f"llama.cpp context has {self.ctx.n_seq} sequences and all are in use: "
                            "fewer rows or smaller trees")
        return self._free.pop()

    def add_rows(self, prompts: list[list[int]], layers=(), every_position: bool = False
                 ) -> tuple[np.ndarray, list | None]:
        """Prefill new rows (appended after the running ones); returns each new row's last-token logits (B, V)
        and, with ``layers``, the states of each new row's last prompt token at those layers ((B, H) each).
        The prompts run as llama.cpp's own prompt processing runs them (:meth:`_prefill_whole`); the states come
        from a second decode of the last token (:meth:`_last_states`).
        ``every_position``: the states of every prompt token instead (per layer, one (len(prompt), H) array per
        row), for heads that read the whole prompt (transformer heads, EAGLE-3); every token is then an output,
        which costs the unembedding of each (about a tenth more prefill for smollm2)."""
        seqs = [self._take() for _ in prompts]
        layers = tuple(layers)
        if every_position and layers:
            try:
                return self._prefill_every_position(prompts, seqs, layers)
            except BaseException:
                for s in seqs:
                    self.ctx.seq_rm(s)
                    self._free.append(s)
                raise
        try:
            starts = self._share(prompts, seqs)
            self.ctx.capture(())
            logits = self._prefill_whole(prompts, seqs, starts)
            states = self._last_states(prompts, seqs, layers) if layers else None
        except BaseException:
            for s in seqs:
                self.ctx.seq_rm(s)
                self._free.append(s)
            raise
        self.shared_tokens += sum(starts)
        self._append(prompts, seqs)
        return logits, states

    def _append(self, prompts, seqs) -> None:
        """The prefilled rows join the running ones."""
        self.base += seqs
        self.past += [len(p) for p in prompts]
        self.prompts += [list(p) for p in prompts]

    def _share(self, prompts, seqs) -> list[int]:
        """With ``share_prefix``: each new row's sequence takes the running rows' cells of the longest prefix its
        prompt shares with one of their prompts (``seq_cp``, a bitset edit: the cells are not copied, and stay while
        any sequence holds them), if at least ``share_prefix`` tokens long and short of the whole prompt (its last
        token is decoded, for the logits). Returns, per new row, the tokens taken so (its prefill starts there).
        What llama-server's ``cache_prompt`` does within a slot, across rows here: a chat template's system prompt,
        or one document asked about several times, is computed once. The reused keys and values were computed in
        another prefill, whose batch shape can round them otherwise than this prompt's own would (as with
        llama-server's cache): a lone row's answer is unchanged, as no running row is there to share with. Not on
        models with a sliding window or a recurrent state (``LlamaContext.shares_prefixes``): llama.cpp may reuse
        a cell that left a sequence's window, so a running row's first cells need not hold its prompt any more
        (llama-server does not reuse prompts there either)."""
        starts = [0] * len(prompts)
        if not self.share_prefix or not self.base or not self.ctx.shares_prefixes:
            return starts
        for i, p in enumerate(prompts):
            best, src = 0, None
            for r, q in enumerate(self.prompts):
                n, top = 0, min(len(p) - 1, len(q), self.past[r])
                while n < top and p[n] == q[n]:
                    n += 1
                if n > best:
                    best, src = n, self.base[r]
            if best >= self.share_prefix:
                self.ctx.seq_cp(src, seqs[i], 0, best)
                starts[i] = best
        return starts

    def _prefill_whole(self, prompts, seqs, starts: list[int] | None = None) -> np.ndarray:
        """Every prompt token in one decode (n_batch at a time), each row's last token the only output: what
        llama.cpp's own prompt processing computes (llama-server's, ``llama-cli``'s), so that the cache, and the
        plain greedy decoding that follows, are the same numbers. (Decoding the last token on its own instead
        rounds its keys and values through the one-token kernels: with Q4_K_M weights that turned 6 of 12
        greedy answers into others.) ``starts``: per row, the prompt tokens its sequence holds already (shared
        cells, :meth:`_share`). Returns each row's last-token logits (B, V)."""
        last = np.zeros((len(prompts), self.ctx.n_vocab), dtype=np.float32)
        starts = starts or [0] * len(prompts)
        body = [(r, i, t) for r, p in enumerate(prompts) for i, t in enumerate(p) if i >= starts[r]]
        for start in range(0, len(body), self.ctx.n_batch):
            part = body[start:start + self.ctx.n_batch]
            outs = [i == len(prompts[r]) - 1 for r, i, _ in part]
            logits, _ = self.ctx.decode([t for *_, t in part], [i for _, i, _ in part],
                                        [seqs[r] for r, _, _ in part], outs)
            got = iter(logits)
            for (r, _, _), out in zip(part, outs):
                if out:
                    last[r] = next(got)
        return last

    def _last_states(self, prompts, seqs, layers) -> list[np.ndarray]:
        """The states at ``layers`` of each row's last prompt token ((B, H) per layer), from a second decode of that
        token in a spare sequence that shares the row's other cells (a captured decode makes every token an
        output, which the prompt's own decode must not). Its cell then joins the dropped ones (a freed cell
        reused out of order rounds attention differently: see the class text)."""
        spare = []
        try:
            for s, p in zip(seqs, prompts):
                spare.append(self._take())
                self.ctx.seq_cp(s, spare[-1], 0, len(p) - 1)
            self.ctx.capture(layers)
            _, states = self.ctx.decode([p[-1] for p in prompts], [len(p) - 1 for p in prompts], spare)
            for t, p in zip(spare, prompts):
                self.ctx.seq_cp(t, self.trash, len(p) - 1, len(p))
            self.dropped += len(prompts)
        finally:
            for t in spare:
                self.ctx.seq_rm(t)
                self._free.append(t)
        self._compact()
        return states

    def _prefill_every_position(self, prompts, seqs, layers):
        self.ctx.capture(layers)
        states = [[np.zeros((len(p), self.ctx.n_embd), dtype=np.float32) for p in prompts] for _ in layers]
        last = np.zeros((len(prompts), self.ctx.n_vocab), dtype=np.float32)
        body = [(r, i, t) for r, p in enumerate(prompts) for i, t in enumerate(p)]
        for start in range(0, len(body), self.ctx.n_batch):
            part = body[start:start + self.ctx.n_batch]
            logits, got = self.ctx.decode([t for *_, t in part], [i for _, i, _ in part], [seqs[r] for r, _, _ in part])
            for k, (r, i, _) in enumerate(part):
                for layer, g in zip(states, got):
                    layer[r][i] = g[k]
                if i == len(prompts[r]) - 1:
                    last[r] = logits[k]
        self._append(prompts, seqs)
        return last, states

    def verify(self, tokens: list[list[int]], parents: list[list[int]], valid: list[list[bool]],
               rows: list[int] | None = None) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """One decode of every row's tree ([root] + nodes, query order); returns logits (B, 1+N, V) (padding
        nodes zero) and, with layers captured, their states ((B, 1+N, H) per layer). ``rows``: the rows that
        verify (the others, e.g. finished ones, add nothing)."""
        rows = list(range(self.rows)) if rows is None else rows
        q = len(tokens[0])
        layouts, spare = {}, {}
        batch_tok, batch_pos, batch_seq, where = [], [], [], []
        try:
            for r in rows:
                lay = layouts[r] = TreeLayout(parents[r], valid[r])
                ids = [self.base[r]] + [self._take() for _ in range(lay.n_paths - 1)]
                spare[r] = ids
                for s in ids[1:]:
                    self.ctx.seq_cp(self.base[r], s)  # the committed context, seen by every path
                for j in lay.order:
                    batch_tok.append(tokens[r][j])
                    batch_pos.append(self.past[r] + lay.depth[j])
                    batch_seq.append([ids[p] for p in lay.paths[j]])
                    where.append((r, j))
            logits, states = self.ctx.decode(batch_tok, batch_pos, batch_seq)
        except BaseException:
            for ids in spare.values():
                for s in ids[1:]:
                    self.ctx.seq_rm(s)
                    self._free.append(s)
            for r in rows:
                self.ctx.seq_rm(self.base[r], self.past[r])
            raise
        out = np.zeros((self.rows, q, logits.shape[1]), dtype=np.float32)
        hid = None if states is None else [np.zeros((self.rows, q, s.shape[1]), dtype=np.float32) for s in states]
        rs, js = np.array([w[0] for w in where]), np.array([w[1] for w in where])
        out[rs, js] = logits
        for h, s in zip(hid or [], states or []):
            h[rs, js] = s
        self._step = (layouts, spare)
        return out, hid

    def commit(self, accepted: dict[int, list[int]]) -> None:
        """Keep, per verified row, the accepted query indices (the root first, each the parent of the next) in its
        base sequence; every other node of the step is dropped and the spare sequences freed."""
        layouts, spare = self._step
        self._step = None
        # one row's chain: its rejected cells are the last ones stored, and the next tokens refill them in order
        chain_alone = len(spare) == 1 and all(layouts[r].n_paths == 1 for r in spare) and self.rows == 1
        for r, ids in spare.items():
            path = accepted.get(r, [0])
            lay, base, p0 = layouts[r], self.base[r], self.past[r]
            if not chain_alone:  # every cell of the step stays taken (the trash sequence holds the dropped ones)
                for t in ids:
                    self.ctx.seq_cp(t, self.trash, p0)
                self.dropped += len(lay.order) - len(path)
            s = ids[lay.path_through(path[-1])]
            if s != base:
                self.ctx.seq_rm(base, p0)
                self.ctx.seq_cp(s, base, p0, p0 + len(path))
            else:
                self.ctx.seq_rm(base, p0 + len(path))
            for t in ids[1:]:
                self.ctx.seq_rm(t)
                self._free.append(t)
            self.past[r] = p0 + len(path)
        self._compact()

    def _compact(self) -> None:
        if self.max_dropped is not None and self.dropped > self.max_dropped:
            self.ctx.seq_rm(self.trash)
            self.dropped = 0
            self.compactions += 1

    def keep_rows(self, keep: list[int]) -> None:
        """Only these rows go on, in this order; the others' cells are freed."""
        gone = set(range(self.rows)) - set(keep)
        for r in gone:  # their cells stay taken too (in the trash sequence) while other rows go on
            if len(gone) < self.rows:
                self.ctx.seq_cp(self.base[r], self.trash)
                self.dropped += self.past[r]
            self.ctx.seq_rm(self.base[r])
            self._free.append(self.base[r])
        self.base = [self.base[r] for r in keep]
        self.past = [self.past[r] for r in keep]
        self.prompts = [self.prompts[r] for r in keep]
        if not self.base:  # nothing left that a freed cell could come before: the dropped cells go too
            self.ctx.clear()
            self.dropped = 0
        else:
            self._compact()
