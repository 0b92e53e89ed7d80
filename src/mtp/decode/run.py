"""What ``mtp generate``, ``mtp bench decode`` and ``mtp serve`` share: loading, choosing the method, prompt
encoding, streaming, baselines."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from mtp.backbones import (backbone_config, check_context, check_layer, load_backbone, load_tokenizer,
                           local_model_folder, resolve_backbone)
from mtp.config import BIT_EXACT_METHODS, DraftOptions, GenerateConfig
from mtp.data import top_tokens
from mtp.decode.accept import Sampling
from mtp.decode.engine import GenerateOutput, RowResult, SpeculativeDecoder
from mtp.decode.guard import SpeedGuard
from mtp.decode.methods import (HEAD_METHODS, cached_batch_cost, cached_context_growth, cached_verify_cost,
                                context_cost, make_proposer, Sizing)
from mtp.decode.proposers import (AdaptiveTreeProposer, MatchLookupProposer, PlainProposer, SizedLookupProposer,
                                  UnionProposer)
from mtp.errors import UserError
from mtp.heads_format import read_accuracy, read_heads_config, resolve_heads
from mtp.model.mtp import MTPModel
from mtp.prompts import chat_format


def choose_method(model_name: str, heads: str | None, method: str | None) -> tuple[str | None, str]:
    """The heads and method a decoding command runs when the user leaves them open: a built-in model's shipped
    heads where a head method (or none) is asked for, then ``tree`` with heads, ``lookup`` without."""
    if heads is None and (method is None or method in HEAD_METHODS) and default_heads_available(model_name):
        heads = "default"
    return heads, method or ("tree" if heads else "lookup")


def default_heads_available(model_name: str) -> bool:
    try:
        resolve_heads("default", model_name)
        return True
    except UserError:
        return False


def load_for_decoding(model_name: str, heads: str | None, dtype: str, device: str,
                      needs: dict[str, int] | None = None, exit_layer: int | None = None, before_load=None):
    """Backbone, tokenizer, MTPModel (or None) and the heads folder; heads are checked against the backbone.

    ``needs``: the tokens each flag asks for (e.g. ``{"--max-new-tokens": 128}``), and ``exit_layer``: refused
    beyond the model's context and layer count once its config is read, before any weights are loaded;
    ``before_load()`` is called once they pass (serve announces the slow part there)."""
    resolve_backbone(model_name)
    folder = resolve_heads(heads, model_name) if heads else None
    if folder is not None:  # what sizes the drafts, checked before the weights load and any measurement
        read_accuracy(folder, read_heads_config(folder)["n_heads"])
    model_config = backbone_config(model_name)
    for flag, n in (needs or {}).items():
        check_context(n, flag, model_config)
    if exit_layer is not None:
        check_layer(exit_layer, "--exit-layer", model_config)
    if before_load is not None:
        before_load()
    backbone, tokenizer = load_backbone(model_name, dtype=dtype, device=device)
    backbone.eval()
    mtp_model = MTPModel.from_pretrained(folder, backbone=backbone).eval() if folder else None
    return backbone, tokenizer, mtp_model, folder


def eos_ids(backbone, tokenizer) -> list[int]:
    ids = getattr(backbone.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt, with the chat template (assistant turn opened) for chat models."""
    if not prompt.strip():
        raise UserError("empty prompt: give some text")
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    text = chat_format(tokenizer, prompt) if templated else prompt
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def build_decoder(backbone, tokenizer, mtp_model, folder: Path | None, model_name: str, method: str,
                  opts: DraftOptions | None = None, calibrate: bool = True) -> tuple[SpeculativeDecoder, Sizing]:
    """A decoder for ``method`` drafting and accepting as ``opts`` says; sizes left open are chosen from the
    verify-cost curve measured for ``model_name`` (when ``calibrate``) and the heads' held-out accuracy."""
    opts = opts or DraftOptions()
    if method in HEAD_METHODS and mtp_model is None:
        raise UserError(f"method {method!r} drafts with MTP heads: pass --heads DIR or default "
                        f"(or use lookup / early-exit, which need none)")
    heads = mtp_model if method in HEAD_METHODS else None
    shortlist = draft_shortlist(heads, opts.draft_vocab) if heads is not None else None
    if opts.adapt and mtp_model is not None and mtp_model.sequential and method in HEAD_METHODS:
        raise UserError(f"--adapt / --compare-adaptive re-size drafts of independent heads; "
                        f"{mtp_model.config.kind} heads are sequential")
    left_open = (method in ("tree", "dynamic", "hybrid") and opts.nodes is None and opts.tree is None) or \
        (method in ("blockwise", "lookup") and opts.draft_len is None)
    cost = cached_verify_cost(model_name, backbone) if calibrate and left_open else None
    width = (heads.eagle.draft_ids.numel() if heads is not None and heads.eagle is not None else
             len(shortlist) if shortlist is not None else backbone.get_output_embeddings().weight.shape[0])
    depth = mtp_model.draft_depth if mtp_model is not None else 0
    proposer, sizing = make_proposer(method, opts, depth=depth, heads_dir=folder, cost=cost,
                                     n_layers=backbone.config.num_hidden_layers, vocab=width)
    if shortlist is not None:
        sizing.draft_vocab = len(shortlist)
    resize = None
    if cost is not None:  # sized from the curve: re-sized for a call's batch and long prompts
        def resize(batch: int, context: int):
            curve = cached_batch_cost(model_name, backbone, batch, cost)  # measured for this many rows
            if context:
                curve = context_cost(curve, cached_context_growth(model_name, backbone), context)
            proposer, resized = make_proposer(method, opts, depth=depth, heads_dir=folder, cost=curve,
                                              n_layers=backbone.config.num_hidden_layers, vocab=width)
            gain = resized.expected_speedup
            # a batch (or context) where even the smallest draft is expected to cost more than it saves is
            # decoded plainly (serving: many rows make the verify compute-bound)
            return PlainProposer() if gain is not None and gain < 1 else proposer
    return SpeculativeDecoder(backbone, tokenizer, mtp_model=heads, proposer=proposer, sampling=Sampling.of(opts),
                              acceptance=opts.acceptance, seed=opts.seed, draft_vocab=shortlist,
                              resize=resize, guard=speed_guard(opts, sizing)), sizing


MIN_DRAFT_VOCAB = 4096


def draft_shortlist(mtp_model, size: int | None) -> torch.Tensor | None:
    """The token ids (sorted) the heads may draft (FR-Spec), or None for the whole vocabulary.

    ``size`` tokens by how often they were the heads' training targets, ties (unseen tokens) by id, which
    in BPE vocabularies follows merge order, roughly frequency. ``size`` None: every token the heads were
    trained to predict, at least ``MIN_DRAFT_VOCAB``, rounded up to a multiple of 64 -- heads rarely rank a
    token they never saw as a target first, so the shortlist costs them little; the whole vocabulary for
    heads saved without counts. ``size`` 0: the whole vocabulary."""
    counts = mtp_model.token_counts
    vocab = mtp_model.backbone.get_output_embeddings().weight.shape[0]
    if size is None:
        seen = int((counts > 0).sum()) if counts is not None else vocab
        size = -(-max(seen, MIN_DRAFT_VOCAB) // 64) * 64
    if size == 0 or size >= vocab:
        return None
    if counts is None:
        raise UserError("--draft-vocab needs the token counts that `mtp train` saves with heads; these heads "
                        "have none (retrain them, or pass --draft-vocab 0)")
    if size < 64:
        raise UserError(f"--draft-vocab {size} is too small to draft from: use 64 or more (0 = whole vocabulary)")
    return top_tokens(counts, size)


def speed_guard(opts: DraftOptions, sizing: Sizing) -> bool | SpeedGuard:
    """``--guard``'s guard: one that starts with plain steps (and probes the drafts) where the sizing itself expected
    the smallest draft not to pay (a steep verify curve: two CPU cores), else one that starts with the drafts."""
    if not opts.guard:
        return False
    gain = sizing.expected_speedup
    return SpeedGuard(start="plain") if gain is not None and gain < 1 else True


def adaptive_sizes(decoder: SpeculativeDecoder) -> dict | None:
    """What an adaptive tree / draft was re-sized to while decoding (None for fixed sizes)."""
    p = decoder.proposer
    if isinstance(p, SizedLookupProposer):
        sizes = sorted(p.sizes)
        out = {"initial": p.sizes[0], "final": p.sizes[-1], "median": sizes[len(sizes) // 2], "min": sizes[0],
               "max": sizes[-1], "resizings": len(p.sizes) - 1, "observed_steps": p.steps,
               "estimated_acceptance": [round(h, 4) for h in p.acceptance()[:8]]}
        if isinstance(p, MatchLookupProposer):  # the draft length per match length, at the end (0: no draft)
            out["per_match_length"] = dict(zip(p.classes, p.per_class))
            out["visits_per_match_length"] = dict(zip(p.classes, p.visits))
        return out
    found = [q for q in (p.proposers if isinstance(p, UnionProposer) else [p]) if isinstance(q, AdaptiveTreeProposer)]
    if not found:
        return None
    a = found[0]
    sizes = sorted(a.sizes)
    return {"initial": a.sizes[0], "final": a.sizes[-1], "median": sizes[len(sizes) // 2], "min": sizes[0],
            "max": sizes[-1], "resizings": len(a.sizes) - 1, "final_tree": [list(q) for q in a.tree.paths],
            "observed_steps": int(a.seen[0]), "estimated_rank_accuracy": [[round(x, 4) for x in row[:4]]
                                                                          for row in a.estimates()]}


class Streamer:
    """Prints a row's text as tokens arrive (whole characters only: a split UTF-8 sequence waits)."""

    def __init__(self, tokenizer, out=None):  # sys.stdout of the call, not of the import (tests capture it)
        self.tokenizer, self.out, self.tokens, self.printed = tokenizer, out or sys.stdout, [], 0

    def __call__(self, row: int, new: list[int]) -> None:
        if row != 0:
            return
        self.tokens.extend(new)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        new_text = text[self.printed:]
        self.out.write(new_text)
        self.out.flush()
        self.printed = len(text)
        if "\n" in new_text:
            self._trim(text)

    def _trim(self, text: str) -> None:
        """A line is complete: keep only the token that ends it and what follows (that token stays as context,
        so a tokenizer that drops a leading space cannot), so each step decodes the open line, not the answer."""
        for k in range(len(self.tokens) - 1, -1, -1):
            if "\n" in self.tokenizer.decode(self.tokens[k:k + 1], skip_special_tokens=True):
                tail = self.tokenizer.decode(self.tokens[k:], skip_special_tokens=True)
                if text.endswith(tail):  # decodes on its own to the same characters
                    self.tokens, self.printed = self.tokens[k:], len(tail)
                return


@torch.inference_mode()
def hf_generate(backbone, tokenizer, prompts: list[list[int]], max_new_tokens: int, eos: list[int],
                sampling: Sampling | None = None) -> GenerateOutput:
    """transformers' own ``generate`` (with its KV cache) as the plain baseline, left-padded."""
    dev = backbone.device
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, device=dev)
        mask[i, longest - len(p):] = 1
    sampling = sampling or Sampling()
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None) if sampling.greedy else \
        dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=eos or None, pad_token_id=pad, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = []
    for i in range(len(prompts)):
        new = out[i, longest:].tolist()
        finish = "length"
        for j, t in enumerate(new):
            if t in eos:
                new, finish = new[: j + 1], "eos"
                break
        rows.append(RowResult(tokens=new, finish=finish, steps=len(new)))
    return GenerateOutput(rows, seconds, max(len(r.tokens) for r in rows))


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def load_llama_target(model_name: str, kind: str, needs: dict[str, int] | None = None, n_ctx: int | None = None,
                      threads: int | None = None):
    """``--backend llama.cpp``: the model's GGUF (``kind``: packaged or a conversion) in llama.cpp, and its
    tokenizer; flags checked against the model's context before anything loads."""
    from mtp.decode.executors.llamacpp import LlamaCppBackbone
    from mtp.engines.targets import target_gguf

    resolve_backbone(model_name)
    model_config = backbone_config(model_name)
    for flag, n in (needs or {}).items():
        check_context(n, flag, model_config)
    folder = local_model_folder(model_name)
    tokenizer = load_tokenizer(folder, "--model")
    longest = getattr(model_config, "max_position_embeddings", None) or 4096
    target = LlamaCppBackbone(target_gguf(model_name, kind), model_config, n_ctx=n_ctx or min(longest, 8192),
                              threads=threads)
    try:
        from transformers import GenerationConfig

        target.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        target.generation_config = None
    return target, tokenizer


def build_llama_decoder(target, tokenizer, method: str, opts: DraftOptions, mtp_model=None, folder: Path | None = None,
                        calibrate: bool = True) -> tuple[SpeculativeDecoder, Sizing]:
    """A decoder whose verify runs in llama.cpp (``target``); heads (mlp, hydra) draft in PyTorch on the states it
    returns. Sizes left open are chosen from llama.cpp's own verify curve on this machine (measured once)."""
    from mtp.decode.executors.llamacpp import LlamaCppExecutor, cached_batch_curve, cached_verify_curve

    if method == "early-exit":
        raise UserError("early-exit drafts with the first layers of a PyTorch model: it needs --backend torch")
    if opts.bit_exact is True and method not in BIT_EXACT_METHODS:
        raise UserError(f"--bit-exact runs plain and lookup, not {method}: heads' states take a KV cell beside the "
                        "prompt and trees store accepted tokens after rejected ones, which moves where llama.cpp "
                        "splits its attention, so their answers are not exactly its plain greedy ones")
    if method in HEAD_METHODS and mtp_model is None:
        raise UserError(f"method {method!r} drafts with MTP heads: pass --heads DIR or default")
    heads = mtp_model if method in HEAD_METHODS else None
    shortlist = draft_shortlist(heads, opts.draft_vocab) if heads is not None else None
    left_open = (method in ("tree", "dynamic", "hybrid") and opts.nodes is None and opts.tree is None) or \
        (method in ("blockwise", "lookup") and opts.draft_len is None)
    cost = cached_verify_curve(target) if calibrate and left_open else None
    width = (heads.eagle.draft_ids.numel() if heads is not None and heads.eagle is not None else
             len(shortlist) if shortlist is not None else
             heads.backbone.get_output_embeddings().weight.shape[0] if heads is not None else None)

    def sized_by(method, opts, cost):
        return make_proposer(method, opts, depth=heads.draft_depth if heads is not None else 0,
                             heads_dir=folder if heads is not None else None, cost=cost,
                             n_layers=target.config.num_hidden_layers, vocab=width)

    # --bit-exact (default: greedy lookup with its length left open): one row's drafts cut at the exact width
    exact = opts.bit_exact if opts.bit_exact is not None else \
        (method == "lookup" and opts.temperature == 0 and opts.draft_len is None)
    proposer, sizing = sized_by(*(_bit_exact(target, method, opts, cost) if exact else (method, opts, cost)))
    if exact:
        sizing.bit_exact = True
    if shortlist is not None:
        sizing.draft_vocab = len(shortlist)
    resize = None
    if cost is not None:  # sized from the curve: re-sized for a batch of rows from llama.cpp's curve for as many
        # (rows side by side in one decode are not computed as each alone, plainly or not: no exact width for them)
        def resize(batch: int, context: int):
            curve = cached_batch_curve(target, batch, cost)
            if curve is None or curve is cost:  # one row, or not measurable now: one row's sizes
                return proposer
            sized, resized = sized_by(method, opts, curve)
            gain = resized.expected_speedup
            # where even the smallest draft costs more than it saves for this many rows: plain decoding
            return PlainProposer() if gain is not None and gain < 1 else sized
    return SpeculativeDecoder(target, tokenizer, mtp_model=heads, proposer=proposer, sampling=Sampling.of(opts),
                              acceptance=opts.acceptance, seed=opts.seed, draft_vocab=shortlist, resize=resize,
                              guard=speed_guard(opts, sizing), executor=LlamaCppExecutor(target, bit_exact=exact)), \
        sizing


def _bit_exact(target, method: str, opts: DraftOptions, cost: dict | None) -> tuple[str, DraftOptions, dict | None]:
    """--bit-exact: drafts no longer than llama.cpp's exact verify width for ``target`` allows (measured once,
    :func:`~mtp.decode.executors.llamacpp.cached_exact_width`): the curve cut there, an explicit --draft-len checked
    against it; plain decoding where no decode of more than one token is exact. Returns (method, opts, cost)."""
    from mtp.decode.executors.llamacpp import cached_exact_width

    if method == "plain":
        return method, opts, cost
    width = cached_exact_width(target)
    where = f"{target.gguf.name} on this CPU, measured once"
    if width == 1:
        if opts.draft_len is not None:
            raise UserError(f"--bit-exact: no llama.cpp decode of more than one token computes what one-token "
                            f"decodes compute ({where}): lookup cannot draft exactly, leave --draft-len out")
        print(f"mtp: no llama.cpp decode of more than one token computes what one-token decodes compute ({where}): "
              "lookup decodes plainly to keep llama.cpp's own greedy answers (--no-bit-exact drafts anyway)",
              file=sys.stderr)
        return "plain", opts, None
    if opts.draft_len is not None and opts.draft_len > width - 1:
        raise UserError(f"--bit-exact: llama.cpp computes at most {width} tokens per decode as it computes them one "
                        f"at a time ({where}): use --draft-len {width - 1} or less")
    if cost is not None:
        cost = {k: v for k, v in cost.items() if k <= width}
    elif opts.draft_len is None:
        opts = dataclasses.replace(opts, draft_len=width - 1)
    return method, opts, cost


class Loaded:
    """What a decoding command loaded: the target (a PyTorch model, or a GGUF in llama.cpp on ``--backend
    llama.cpp``), its tokenizer, the heads (a PyTorch module either way) and their folder; ``decoder(method,
    opts)`` builds a decoder on it for either backend."""

    def __init__(self, backend: str, model_name: str, backbone, tokenizer, mtp_model=None, folder: Path | None = None):
        self.backend, self.model_name, self.backbone, self.tokenizer = backend, model_name, backbone, tokenizer
        self.mtp_model, self.folder = mtp_model, folder

    def decoder(self, method: str, opts: DraftOptions, calibrate: bool = True) -> tuple[SpeculativeDecoder, Sizing]:
        if self.backend == "llama.cpp":
            return build_llama_decoder(self.backbone, self.tokenizer, method, opts, self.mtp_model, self.folder,
                                       calibrate)
        return build_decoder(self.backbone, self.tokenizer, self.mtp_model, self.folder, self.model_name, method,
                             opts, calibrate)


def resolve_backend(opts: DraftOptions, model_name: str, methods, say=None) -> str:
    """``--backend auto``: llama.cpp where it decodes this model faster than PyTorch on this machine -- measured
    once (one decoded token after a 256-token prompt on each, :func:`cached_backend_times`) -- else torch. Always
    torch on a GPU, with --dtype bfloat16 / float16 / float64 (a PyTorch precision), for a model that is not built
    in (no GGUF of it), for early exit (it runs the first layers of a PyTorch model), for a server of more than 32
    rows and where llama.cpp is not built. ``mtp`` resolves it before ``--dtype auto`` (which would otherwise read
    as a PyTorch precision asked for).
    ``say(line)``: told which was chosen and why. Any other --backend is returned as given."""
    if opts.backend != "auto":
        return opts.backend
    from mtp.backbones import BUILTIN_MODELS
    from mtp.engines import llamacpp

    if opts.device != "cpu" or opts.dtype not in ("auto", "float32") or model_name not in BUILTIN_MODELS \
            or "early-exit" in methods or not (llamacpp.library_dir() / "libllama.so").is_file() \
            or getattr(opts, "max_batch", 1) > 32:  # a server's rows beyond what one llama.cpp context serves
        if getattr(opts, "bit_exact", None) is True:
            raise UserError("--bit-exact gives llama.cpp's own greedy answers and runs on its CPU kernels: here "
                            "--backend auto runs PyTorch (a GPU, a PyTorch --dtype, a model without a GGUF, more "
                            "than 32 rows or llama.cpp not built); pass --backend llama.cpp or leave --bit-exact out")
        return "torch"
    if getattr(opts, "bit_exact", None) is True:  # llama.cpp's own greedy answers: only its kernels give them
        return "llama.cpp"
    times = cached_backend_times(model_name, opts.target, opts.dtype)
    backend = "llama.cpp" if times["llama.cpp"] < times["torch"] else "torch"
    if say is not None:
        say(f"--backend auto: {backend} (a decoded token: {times['llama.cpp'] * 1e3:.1f} ms on llama.cpp with the "
            f"{opts.target} GGUF, {times['torch'] * 1e3:.1f} ms on PyTorch {times['torch_dtype']}, measured once on "
            f"this CPU; --backend torch|llama.cpp chooses)")
    return backend


def cached_backend_times(model_name: str, target: str = "packaged", dtype: str = "auto") -> dict:
    """Seconds per plain decoded token of ``model_name`` on each backend here (PyTorch in ``dtype``, llama.cpp on its
    ``target`` GGUF; one token after a cached 256-token prompt, median of 9), measured once per model, GGUF, CPU,
    threads, torch and llama.cpp build and kept in the user cache."""
    import hashlib
    import json

    from mtp.backbones import resolve_dtype
    from mtp.decode.executors.llamacpp import LlamaCppBackbone, default_threads, verify_curve
    from mtp.decode.methods import _measured_once, verify_cost
    from mtp.engines import llamacpp
    from mtp.engines.targets import target_gguf
    from mtp.machine import cpu_signature

    gguf = target_gguf(model_name, target)
    dtype = resolve_dtype(dtype, "cpu", model_name, quiet=True)
    st = gguf.stat()
    raw = json.dumps([model_name, str(gguf.resolve()), st.st_size, int(st.st_mtime), dtype, cpu_signature(),
                      torch.get_num_threads(), default_threads(), torch.__version__, llamacpp.build_stamp()])
    name = f"backends-{hashlib.sha1(raw.encode()).hexdigest()[:16]}.json"

    def measure() -> dict:
        backbone, _ = load_backbone(model_name, dtype=dtype, device="cpu", require_tokenizer=False)
        torch_s = verify_cost(backbone, points=(1,), repeats=9)[1]
        del backbone
        llama = LlamaCppBackbone(gguf, backbone_config(model_name), n_ctx=1024)
        try:
            llama_s = verify_curve(llama, points=(1,), repeats=9)[1]
        finally:
            llama.close()
        return {"torch": torch_s, "llama.cpp": llama_s, "torch_dtype": dtype}

    def parse(d: dict) -> dict:
        return {"torch": float(d["torch"]), "llama.cpp": float(d["llama.cpp"]), "torch_dtype": str(d["torch_dtype"])}

    return _measured_once(name, parse, measure, f"how fast {model_name} decodes on PyTorch and on llama.cpp here")


def open_target(opts: DraftOptions, model_name: str, heads: str | None, methods, needs: dict[str, int],
                exit_layer: int | None = None, before_load=None, n_ctx: int | None = None,
                threads: int | None = None) -> Loaded:
    """Load what ``methods`` decode with on ``opts.backend``: heads only where a head method is among them. On
    llama.cpp the heads sit on the PyTorch model whose embeddings and unembedding they use, and ``n_ctx`` is
    llama.cpp's KV cells, shared by every row of a batch (default: the model's context, at most 8192), ``threads``
its compute threads (default: every CPU this process may use)."""
    need_heads = any(m in HEAD_METHODS for m in methods)
    if opts.backend == "auto":  # commands that say which one it is resolve it first
        opts = dataclasses.replace(opts, backend=resolve_backend(opts, model_name, methods))
    if opts.backend != "llama.cpp":
        backbone, tokenizer, mtp_model, folder = load_for_decoding(model_name, heads if need_heads else None,
                                                                  opts.dtype, opts.device, needs, exit_layer,
                                                                  before_load)
        return Loaded("torch", model_name, backbone, tokenizer, mtp_model, folder)
    if "early-exit" in methods:
        raise UserError("early-exit drafts with the first layers of a PyTorch model: it needs --backend torch")
    if opts.device != "cpu":
        raise UserError(f"--backend llama.cpp runs on the CPU: drop --device {opts.device}")
    mtp_model = folder = None
    if need_heads:
        _, _, mtp_model, folder = load_for_decoding(model_name, heads, opts.dtype, "cpu", needs,
                                                    before_load=before_load)
    elif before_load is not None:
        before_load()
    backbone, tokenizer = load_llama_target(model_name, opts.target, needs, n_ctx, threads)
    return Loaded("llama.cpp", model_name, backbone, tokenizer, mtp_model, folder)


def generate_command(cfg: GenerateConfig, command: str = "") -> dict:
    """Stream the model's answer; the result holds tokens/s, tokens per step and the speedup over plain decoding."""
    heads, method = choose_method(cfg.model, cfg.heads, cfg.method)
    cfg.backend = resolve_backend(cfg, cfg.model, [method],
                                  None if cfg.quiet else lambda line: print(f"mtp: {line}", file=sys.stderr))
    loaded = open_target(cfg, cfg.model, heads, [method], {"--max-new-tokens": cfg.max_new_tokens}, cfg.exit_layer)
    backbone, tokenizer = loaded.backbone, loaded.tokenizer
    decoder, sizing = loaded.decoder(method, cfg)
    ids, eos = encode_prompt(tokenizer, cfg.prompt, cfg.chat), eos_ids(backbone, tokenizer)
    decoder.generate([ids], 4, eos)  # warm-up, so the figures below are not first-call costs
    out = decoder.generate([ids], cfg.max_new_tokens, eos, stop_strings=cfg.stop, callback=Streamer(tokenizer))
    sys.stdout.write("\n")
    row = out.rows[0]
    sizes = {k: v for k, v in sizing.as_dict().items() if k not in ("method", "tree", "adaptive")}
    result = {"method": method, "sizes": sizes, "backend": cfg.backend,
              "adapted": adaptive_sizes(decoder), "guard": decoder.guard.report() if decoder.guard else None,
              "tokens": len(row.tokens), "seconds": out.seconds,
              "tokens_per_s": len(row.tokens) / out.seconds, "tau": row.acceptance_length,
              "dtype": cfg.dtype if cfg.backend == "torch" else f"GGUF {cfg.target}",
              "greedy": cfg.temperature == 0, "command": command}
    if cfg.compare and method != "plain":
        plain, _ = loaded.decoder("plain", cfg)
        ref = plain.generate([ids], cfg.max_new_tokens, eos, stop_strings=cfg.stop)
        result.update(plain_tokens_per_s=len(ref.rows[0].tokens) / ref.seconds,
                      identical=ref.rows[0].tokens == row.tokens)
        result["speedup"] = result["tokens_per_s"] / result["plain_tokens_per_s"]
    return result


def show_generate(r: dict) -> str:
    sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
    if (a := r["adapted"]) is not None:
        unit = "draft length" if r["method"] in ("blockwise", "lookup") else "nodes"
        sizes += f", re-sized while decoding: {unit} {a['min']}-{a['max']}, last {a['final']}"
    if g := (r.get("guard") or {}).get("1"):
        sizes += f", drafted {g['draft_share']:.0%} of steps (the guard timed the rest to go faster plainly)"
    line = (f"[{r['method']}{' (' + sizes + ')' if sizes else ''}] {r['tokens']} tokens in {r['seconds']:.2f} s: "
            f"{r['tokens_per_s']:.1f} tokens/s, {r['tau']:.2f} tokens per backbone forward")
    if "speedup" not in r:
        return line
    if r["identical"]:
        same = "identical output"
    elif not r["greedy"]:
        same = "output differs (sampling: same distribution, different draw)"
    elif r.get("backend") == "llama.cpp":
        same = ("output differs from plain llama.cpp decoding by rounding (its kernels for a k-token batch round "
                "differently from one-token decodes)")
    elif r["dtype"] in ("bfloat16", "float16"):
        same = (f"output differs from plain {r['dtype']} decoding by rounding (a k-token forward rounds differently "
                f"from k one-token forwards; float32 is token-identical)")
    else:
        same = "OUTPUT DIFFERS"
    return line + f"; plain decoding {r['plain_tokens_per_s']:.1f} tokens/s: speedup {r['speedup']:.2f}x, {same}"
