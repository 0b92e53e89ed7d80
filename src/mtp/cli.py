"""The ``mtp`` command line: one typed function per subcommand; argparse only maps flags onto them.

Bad input ends in one line, ``mtp: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import shlex
import sys
import tempfile
import types
import typing
from pathlib import Path

from mtp.config import AnalyzeConfig, BenchEngineConfig, ExportConfig, TrainConfig
from mtp.errors import UserError


# ----------------------------------------------------------------------------- output helpers


def _check_writable_file(path: str | None, flag: str) -> None:
    """Fail before any slow work if an output file cannot be written."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write to {parent}")


def _check_writable_dir(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} exists and is not a directory")


def write_json(path: str | Path, obj) -> None:
    """Write atomically: a temporary file in the same folder, then a rename (never a half-written file)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        from mtp.backbones import make_shareable

        make_shareable(tmp)  # results are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- subcommands


def analyze(cfg: AnalyzeConfig, json_path: str | None = None, out_dir: str | None = None,
            progress: bool = True, command: str = "") -> int:
    """How much multi-token prediction the models already have: Markdown on stdout, JSON and plots."""
    from mtp.analysis.plots import write_plots
    from mtp.analysis.report import markdown
    from mtp.analysis.run import analyze as run_analysis

    _check_writable_file(json_path, "--json")
    _check_writable_dir(out_dir, "--out")
    report = run_analysis(cfg, progress=progress)
    report["command"] = command
    print(markdown(report))
    if json_path:
        write_json(json_path, report)
        print(f"\nJSON: {json_path}")
    if out_dir:
        for path in write_plots(report, out_dir):
            print(f"plot: {path}")
    return 0


def bench_analyze(model: str, data: str, context: int, positions: int, positions_per_window: int, k: int,
                  top_p: float, max_candidates: int, chunk_tokens: int, repeats: int, dtype: str, device: str,
                  seed: int, json_path: str | None = None, progress: bool = True, command: str = "") -> int:
    """Batched vs naive marginalization on the same positions: both times, the ratio, the largest difference."""
    from mtp.bench.analyze import bench_analyze as run_bench, format_bench_analyze

    _check_writable_file(json_path, "--json")
    result = run_bench(model, data, context=context, positions=positions, positions_per_window=positions_per_window,
                       k=k, top_p=top_p, max_candidates=max_candidates, chunk_tokens=chunk_tokens, repeats=repeats,
                       dtype=dtype, device=device, seed=seed, progress=progress)
    result["command"] = command
    print(format_bench_analyze(result))
    if json_path:
        write_json(json_path, result)
    return 0


def train(cfg: TrainConfig, progress: bool = True, command: str = "") -> int:
    """Train MTP heads on a backbone; the result is cfg.out/heads (config.json + model.safetensors)."""
    from mtp.training.train import train as run_train

    summary = run_train(cfg, progress=progress, command=command)
    if summary.get("heads"):
        print(f"heads: {summary['heads']}  (log: {cfg.out}/metrics.jsonl, {summary['steps']} steps)")
    return 0


def evaluate(model: str, heads: str, data: str, context: int, max_positions: int, positions_per_window: int,
             marginal: bool, max_candidates: int, seed: int, device: str, dtype: str, json_path: str | None = None,
             progress: bool = True, command: str = "", write_accuracy: bool = False) -> int:
    """Per-head top-1 / top-5 on held-out text beside the backbone's own marginalization."""
    from mtp.analysis.run import load_corpora
    from mtp.backbones import load_backbone, resolve_backbone
    from mtp.training.evaluate import eval_table, evaluate_heads
    from mtp.model.mtp import MTPModel, resolve_heads

    _check_writable_file(json_path, "--json")
    resolve_backbone(model)
    folder = resolve_heads(heads, model)
    corpus = next(iter(load_corpora([data]).values()))
    backbone, tokenizer = load_backbone(model, dtype=dtype, device=device)
    mtp_model = MTPModel.from_pretrained(folder, backbone=backbone)
    result = evaluate_heads(mtp_model, tokenizer, corpus, context=context, max_positions=max_positions,
                            per_window=positions_per_window, seed=seed, marginal=marginal,
                            max_candidates=max_candidates, progress=progress)
    result.update({"model": model, "heads_dir": str(folder), "command": command})
    print(eval_table(result))
    if json_path:
        write_json(json_path, result)
    if write_accuracy:  # what `mtp generate` sizes its trees from
        from mtp.decode.methods import accuracy_record

        write_json(folder / "accuracy.json", accuracy_record(result["rank_accuracy"], result["data"],
                                                             result["positions"], command))
        print(f"per-rank accuracies written to {folder / 'accuracy.json'}")
    return 0


def generate(model: str, prompt: str, heads: str | None, method: str | None, sampling_args: dict,
             max_new_tokens: int, stop: list[str], chat: bool, compare: bool, tree: str | None, nodes: int | None,
             draft_len: int | None, exit_layer: int | None, acceptance: str, seed: int, device: str,
             dtype: str, adapt: bool = False, draft_vocab: int | None = None) -> int:
    """Stream the model's answer, then tokens/s, tokens per step and the speedup over plain decoding."""
    from mtp.decode.accept import Sampling
    from mtp.decode.methods import HEAD_METHODS
    from mtp.decode.run import (Streamer, adaptive_sizes, build_decoder, default_heads_available, encode_prompt,
                                eos_ids, load_for_decoding)

    sampling = Sampling(**sampling_args)
    if heads is None and (method is None or method in HEAD_METHODS) and default_heads_available(model):
        heads = "default"
    method = method or ("tree" if heads else "lookup")
    backbone, tokenizer, mtp_model, folder = load_for_decoding(model, heads if method in HEAD_METHODS else None,
                                                              dtype, device)
    ids = encode_prompt(tokenizer, prompt, chat)
    eos = eos_ids(backbone, tokenizer)
    decoder, info = build_decoder(backbone, tokenizer, mtp_model, folder, model, method, sampling=sampling,
                                  acceptance=acceptance, tree=tree, nodes=nodes, draft_len=draft_len,
                                  exit_layer=exit_layer, seed=seed, adapt=adapt, draft_vocab=draft_vocab)
    decoder.generate([ids], 4, eos)  # warm-up, so the figures below are not first-call costs
    streamer = Streamer(tokenizer)
    out = decoder.generate([ids], max_new_tokens, eos, stop_strings=stop, callback=streamer)
    sys.stdout.write("\n")
    row = out.rows[0]
    tps = len(row.tokens) / out.seconds
    sizes = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("method", "tree", "adaptive"))
    if (adapted := adaptive_sizes(decoder)) is not None:
        unit = "draft length" if method == "blockwise" else "nodes"
        sizes += f", re-sized while decoding: {unit} {adapted['min']}-{adapted['max']}, last {adapted['final']}"
    line = (f"[{method}{' (' + sizes + ')' if sizes else ''}] {len(row.tokens)} tokens in {out.seconds:.2f} s: "
            f"{tps:.1f} tokens/s, {row.tau:.2f} tokens per backbone forward")
    if compare and method != "plain":
        plain, _ = build_decoder(backbone, tokenizer, None, None, model, "plain", sampling=sampling, seed=seed)
        ref = plain.generate([ids], max_new_tokens, eos, stop_strings=stop)
        ptps = len(ref.rows[0].tokens) / ref.seconds
        if ref.rows[0].tokens == row.tokens:
            same = "identical output"
        elif not sampling.greedy:
            same = "output differs (sampling: same distribution, different draw)"
        elif dtype in ("bfloat16", "float16"):
            same = (f"output differs from plain {dtype} decoding by rounding (a k-token forward rounds differently "
                    f"from k one-token forwards; float32 is token-identical)")
        else:
            same = "OUTPUT DIFFERS"
        line += f"; plain decoding {ptps:.1f} tokens/s: speedup {tps / ptps:.2f}x, {same}"
    print(line, file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- argument parsing


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (litgpt-style help text), read from the source."""
    docs, tree = {}, ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a typed config dataclass: --field-name, typed, with its default and docstring."""
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})".strip()
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif origin is list:
            parser.add_argument(flag, dest=f.name, type=args[0], action="append", default=None,
                                help=help_text + "; repeatable")
        else:  # int, float, str, or Optional[...] of one of them
            base = next(a for a in args if a is not type(None)) if origin in (typing.Union, types.UnionType) else hint
            parser.add_argument(flag, dest=f.name, type=base, default=default, help=help_text)


def dataclass_from_args(cls, args: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and f.default is dataclasses.MISSING:  # list flags not given: the field's default
                continue
            values[f.name] = value
    return cls(**values)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"mtp: error: {message} (see `{self.prog} --help`)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for choosing windows (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    d = AnalyzeConfig.__dataclass_fields__
    parser = _Parser(prog="mtp", description="Multi-token prediction: measure it, train it, decode faster with it.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("analyze", help="how much MTP ability next-token models already have (marginalization, "
                                       "logit lens)")
    a.add_argument("--model", action="append", dest="models", metavar="NAME|PATH",
                   help="built-in name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), HF folder or .gguf file; "
                        "repeatable (default smollm2-135m)")
    a.add_argument("--data", action="append", metavar="CORPUS|FILE",
                   help="code, prose, translation, or a .txt/.jsonl file; repeatable (default code)")
    a.add_argument("--text", action="append", metavar="FILE", help="a user text file (shorthand for --data FILE)")
    a.add_argument("--k", type=int, default=d["k"].default, help="largest prediction distance, 1-3 (default 3)")
    a.add_argument("--top-p", type=float, action="append", dest="top_p",
                   help="mass covered by each sum over intermediate tokens; repeatable (default 0.99 and 0.9)")
    a.add_argument("--max-candidates", type=int, default=d["max_candidates"].default,
                   help="most candidate paths per position and k (default %(default)s)")
    a.add_argument("--context", type=int, default=d["context"].default,
                   help="least tokens of left context per position (default %(default)s)")
    a.add_argument("--max-positions", type=int, default=d["max_positions"].default,
                   help="scored positions per model and corpus (default %(default)s)")
    a.add_argument("--positions-per-window", type=int, default=d["positions_per_window"].default,
                   help="scored positions per token window (default %(default)s)")
    a.add_argument("--chunk-tokens", type=int, default=d["chunk_tokens"].default,
                   help="candidate tokens per batched forward (default %(default)s)")
    a.add_argument("--no-lens", action="store_true", help="skip the logit-lens layer analysis")
    a.add_argument("--json", dest="json_path", metavar="FILE", help="write every figure as JSON")
    a.add_argument("--out", metavar="DIR", help="write PNG plots here")
    _add_common(a)

    t = sub.add_parser("train", help="train MTP heads on a pretrained backbone (frozen, joint or LoRA)")
    add_dataclass_arguments(t, TrainConfig)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("distill", help="self-distillation data: the backbone's own responses to a prompt set")
    g.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    g.add_argument("--prompts", action="append", metavar="SET|FILE",
                   help="chat, code, translation, code-prefix (their train split) or a .jsonl with a prompt "
                        "field; repeatable")
    g.add_argument("--out", required=True, metavar="FILE.jsonl")
    g.add_argument("--limit", type=int, default=None, help="prompts per set (default: all)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--engine", default="transformers",
                   help="transformers (batched generate) | llama.cpp (llama-server on the model's GGUF, --batch-size "
                        "parallel slots; `mtp engines setup llama.cpp` first)")
    _add_common(g)

    e = sub.add_parser("eval", help="per-head accuracy on held-out text beside marginalization")
    e.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    e.add_argument("--heads", default="default", metavar="DIR|default",
                   help="a heads folder (e.g. RUN/heads) or `default`: the heads shipped for the model")
    e.add_argument("--data", default=None, metavar="CORPUS|FILE", help="held-out text: code, prose, translation "
                                                                        "(their eval split) or a file")
    e.add_argument("--text", default=None, metavar="FILE", help="a user text file (shorthand for --data FILE)")
    e.add_argument("--context", type=int, default=256)
    e.add_argument("--max-positions", type=int, default=500)
    e.add_argument("--positions-per-window", type=int, default=16)
    e.add_argument("--no-marginal", action="store_true", help="skip the marginalization baseline")
    e.add_argument("--max-candidates", type=int, default=128)
    e.add_argument("--json", dest="json_path", metavar="FILE")
    e.add_argument("--write-accuracy", action="store_true",
                   help="store per-rank head accuracies as accuracy.json beside the heads (sizes decoding trees)")
    _add_common(e)

    r = sub.add_parser("generate", help="decode faster with the model's own MTP heads (lossless)")
    r.add_argument("prompt")
    r.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    r.add_argument("--heads", default=None, metavar="DIR|default",
                   help="MTP heads (default: the heads shipped for a built-in model, if any)")
    r.add_argument("--method", default=None,
                   help="plain | blockwise | tree | dynamic | hybrid (tree + lookup) | lookup | early-exit "
                        "(default: tree with heads, lookup without)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--acceptance", default="exact", help="exact (lossless; default) | typical (Medusa, lossy)")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string; repeatable")
    r.add_argument("--tree", default=None, metavar="JSON|FILE", help="static tree paths, e.g. [[0],[0,0],[1]]")
    r.add_argument("--nodes", type=int, default=None, help="tree nodes (default: from the measured verify cost)")
    r.add_argument("--draft-len", type=int, default=None,
                   help="blockwise / lookup / hybrid's lookup / early-exit draft length")
    r.add_argument("--exit-layer", type=int, default=None, help="early-exit: layers that draft (default half)")
    r.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="heads draft only the N most frequent tokens of their training data (FR-Spec; lossless, the "
                        "verify forward decides); 0 = the whole vocabulary (default: from the heads)")
    r.add_argument("--adapt", action="store_true",
                   help="re-size the tree / draft every 8 steps from the acceptance seen while decoding")
    r.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    r.add_argument("--no-compare", action="store_true", help="skip the plain-decoding run that measures the speedup")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    r.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default float32)")

    pt = sub.add_parser("pretrain", help="pretrain a multi-token model from scratch (trunk + n transformer heads)")
    pt.add_argument("--preset", default="tiny", help="tiny | mini | small | base | large (default tiny)")
    pt.add_argument("--heads", type=int, default=4, help="n: tokens predicted per position; 1 = next-token only")
    pt.add_argument("--tokenizer", default="bytes", help="bytes | bpe (trained on the corpus) | a tokenizer folder")
    pt.add_argument("--data", action="append", metavar="CORPUS|FILE", help="repeatable (default code)")
    pt.add_argument("--out", default="runs/pretrain", metavar="DIR")
    pt.add_argument("--max-steps", type=int, default=None, help="default: the preset's")
    pt.add_argument("--seq-len", type=int, default=None)
    pt.add_argument("--batch-size", type=int, default=None)
    pt.add_argument("--lr", type=float, default=None)
    pt.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    pt.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for the final evaluation")
    pt.add_argument("--save-every", type=int, default=200)
    pt.add_argument("--log-every", type=int, default=10)
    pt.add_argument("--resume", action="store_true")
    pt.add_argument("--autocast", default="auto", help="bf16 autocast: auto | on | off")
    _add_common(pt)

    cv = sub.add_parser("convert", help="Meta's multi-token checkpoint layout (params.json + consolidated.pth, "
                                        "extra_heads) into an mtp heads folder")
    cv.add_argument("checkpoint", metavar="DIR")
    cv.add_argument("--out", required=True, metavar="DIR", help="gets backbone/ (HF Llama) and heads/")
    cv.add_argument("--tokenizer", default=None, metavar="DIR", help="a Hugging Face tokenizer folder to ship with it")
    cv.add_argument("--dtype", default="float32")

    x = sub.add_parser("export", help="heads into a serving engine's format: eagle3 (vLLM, SGLang), gguf "
                                      "(llama.cpp), medusa (vLLM); prints the command that serves them")
    add_dataclass_arguments(x, ExportConfig)

    en = sub.add_parser("engines", help="real serving engines, set up by mtp: llama.cpp (built from the sources "
                                        "vendored in llama-cpp-python) and vLLM (its own virtual environment)")
    en.add_argument("action", choices=["setup", "status"])
    en.add_argument("engine", nargs="?", choices=["llama.cpp", "vllm"], help="which engine to set up")
    en.add_argument("--jobs", type=int, default=None, help="llama.cpp: parallel compile jobs (default: all cores)")

    rp = sub.add_parser("compare", help="several `mtp eval` results on the same text: one table and a plot")
    rp.add_argument("results", nargs="+", metavar="NAME=FILE.json")
    rp.add_argument("--plot", metavar="FILE.png", help="accuracy vs head index per variant")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True,
                                                                       parser_class=_Parser)
    b = bench.add_parser("analyze", help="batched vs naive marginalization: time, ratio, largest difference")
    b.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    b.add_argument("--data", default="code", metavar="CORPUS|FILE")
    b.add_argument("--context", type=int, default=256)
    b.add_argument("--positions", type=int, default=32, help="scored positions (default %(default)s)")
    b.add_argument("--positions-per-window", type=int, default=16)
    b.add_argument("--k", type=int, default=2)
    b.add_argument("--top-p", type=float, default=0.99)
    b.add_argument("--max-candidates", type=int, default=128)
    b.add_argument("--chunk-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3, help="runs of each method per window (median)")
    b.add_argument("--json", dest="json_path", metavar="FILE")
    _add_common(b)

    v = bench.add_parser("verify", help="verify-cost curve: time of one forward over k tokens, t(k)/t(1)")
    v.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    v.add_argument("--dtype", action="append", dest="dtypes", help="repeatable (default float32 and bfloat16)")
    v.add_argument("--context", type=int, default=256, help="cached prefix length (default %(default)s)")
    v.add_argument("--repeats", type=int, default=7)
    v.add_argument("--device", default="cpu")
    v.add_argument("--json", dest="json_path", metavar="FILE")
    v.add_argument("--quiet", action="store_true")

    dd = bench.add_parser("decode", help="self-speculative decoding vs plain baselines: tokens/s, tau, speedup")
    dd.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    dd.add_argument("--heads", default="default", metavar="DIR|default")
    dd.add_argument("--prompts", default="chat", metavar="SET|FILE.jsonl",
                    help="chat, code, translation, code-prefix (their eval split) or a .jsonl with a prompt field")
    dd.add_argument("--methods", default="blockwise,tree,dynamic,lookup",
                    help="comma-separated: plain, blockwise, tree, dynamic, hybrid, lookup, early-exit")
    dd.add_argument("--batch-size", type=int, default=1)
    dd.add_argument("--max-new-tokens", type=int, default=128)
    dd.add_argument("--limit", type=int, default=20, help="prompts (default %(default)s)")
    dd.add_argument("--temperature", type=float, default=0.0)
    dd.add_argument("--nodes", type=int, default=None, help="tree nodes (default: from the measured verify cost)")
    dd.add_argument("--draft-len", type=int, default=None,
                    help="blockwise / lookup / hybrid's lookup / early-exit draft length (default: per method)")
    dd.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="heads draft only the N most frequent tokens of their training data (FR-Spec; lossless, the "
                        "verify forward decides); 0 = the whole vocabulary (default: from the heads)")
    dd.add_argument("--adapt", action="store_true",
                    help="re-size trees / drafts every 8 steps from the acceptance seen while decoding")
    dd.add_argument("--compare-adaptive", action="store_true",
                    help="also run blockwise / tree / hybrid with --adapt (rows '<method>-adaptive')")
    dd.add_argument("--no-chat", action="store_true")
    dd.add_argument("--json", dest="json_path", metavar="FILE")
    dd.add_argument("--plot", metavar="FILE.png")
    _add_common(dd)

    be = bench.add_parser("engine", help="a real engine (llama.cpp, vLLM): plain, its n-gram speculation and our "
                                         "exported EAGLE-3 heads, on the same prompts; mtp's engine beside it")
    add_dataclass_arguments(be, BenchEngineConfig)
    be.add_argument("--quiet", action="store_true", help="no progress messages")

    ps = bench.add_parser("pretrain-step", help="training cost of n-token pretraining: step time vs next-token "
                                                "training (same trunk and parameter-matched), memory vs naive")
    ps.add_argument("--preset", default="mini", help="tiny | mini | small | base | large (default mini)")
    ps.add_argument("--heads", type=int, default=4, help="n (default 4)")
    ps.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: bytes, 259)")
    ps.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ps.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ps.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per unembedding + loss chunk")
    ps.add_argument("--repeats", type=int, default=5, help="timed steps per probe after the measured one")
    ps.add_argument("--rounds", type=int, default=2, help="times each probe runs, alternating (default 2)")
    ps.add_argument("--json", dest="json_path", metavar="FILE")
    _add_common(ps)

    m = bench.add_parser("train-memory", help="peak memory and time of one training step: memory-efficient head "
                                              "order vs naive")
    m.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kind", default="mlp")
    m.add_argument("--mode", default="frozen", help="frozen | joint | lora")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per unembedding + loss chunk")
    m.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one (median)")
    m.add_argument("--json", dest="json_path", metavar="FILE")
    _add_common(m)
    return parser


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    progress, command = not getattr(args, "quiet", False), "mtp " + shlex.join(argv)
    if args.command == "analyze":
        data = (args.data or []) + (args.text or [])
        cfg = AnalyzeConfig(models=args.models or ["smollm2-135m"], data=data or ["code"], k=args.k,
                            top_p=args.top_p or [0.99, 0.9], max_candidates=args.max_candidates,
                            context=args.context, max_positions=args.max_positions,
                            positions_per_window=args.positions_per_window, chunk_tokens=args.chunk_tokens,
                            lens=not args.no_lens, seed=args.seed, device=args.device, dtype=args.dtype)
        return analyze(cfg, json_path=args.json_path, out_dir=args.out, progress=progress, command=command)
    if args.command == "train":
        return train(dataclass_from_args(TrainConfig, args), progress=progress, command=command)
    if args.command == "distill":
        from mtp.training.distill import distill

        summary = distill(args.model, args.prompts or ["chat", "code"], args.out, limit=args.limit,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          temperature=args.temperature, seed=args.seed, device=args.device, dtype=args.dtype,
                          progress=progress, engine=args.engine)
        print(f"distilled {summary['prompts']} prompts into {summary['out']} "
              f"({summary['finished_share']:.0%} ended with EOS)")
        return 0
    if args.command == "eval":
        if args.context < 1 or args.max_positions < 1 or args.positions_per_window < 1 or args.max_candidates < 1:
            raise UserError("--context, --max-positions, --positions-per-window and --max-candidates must be >= 1")
        return evaluate(args.model, args.heads, args.text or args.data or "code", args.context, args.max_positions,
                        args.positions_per_window, not args.no_marginal, args.max_candidates, args.seed, args.device,
                        args.dtype, json_path=args.json_path, progress=progress, command=command,
                        write_accuracy=args.write_accuracy)
    if args.command == "bench" and args.bench == "analyze":
        return bench_analyze(args.model, args.data, args.context, args.positions, args.positions_per_window, args.k,
                             args.top_p, args.max_candidates, args.chunk_tokens, args.repeats, args.dtype,
                             args.device, args.seed, json_path=args.json_path, progress=progress, command=command)
    if args.command == "pretrain":
        from mtp.training.pretrain import PretrainConfig, pretrain

        for name in ("max_steps", "seq_len", "batch_size", "vocab_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.lr is not None and args.lr <= 0:
            raise UserError(f"--lr must be positive, got {args.lr}")
        cfg = PretrainConfig(preset=args.preset, heads=args.heads, tokenizer=args.tokenizer,
                             data=tuple(args.data or ["code"]), out=args.out, max_steps=args.max_steps,
                             seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, vocab_size=args.vocab_size,
                             eval_tokens=args.eval_tokens, save_every=args.save_every, log_every=args.log_every,
                             resume=args.resume, seed=args.seed, device=args.device, dtype=args.dtype,
                             autocast=args.autocast)
        result = pretrain(cfg, progress=progress, command=command)
        if "heads" not in result:  # not rank 0 under torchrun
            return 0
        print(f"held-out ({result['eval_tokens']} tokens): next-token loss {result['ntp_loss']:.4f} nats, "
              f"{result['ntp_bits_per_byte']:.3f} bits/byte")
        print("| head | predicts | loss | top-1 |\n|---:|---|---:|---:|")
        for h in result["heads"]:
            print(f"| {h['head']} | {h['predicts']} | {h['loss']:.4f} | {h['top1']:.3f} |")
        print(f"model: {cfg.out}/heads (backbone {cfg.out}/init + trained weights); log: {cfg.out}/metrics.jsonl")
        return 0
    if args.command == "export":
        from mtp.export.run import export

        result = export(dataclass_from_args(ExportConfig, args))
        print(f"exported {result['heads']} as {result['format']} into {result['out']}")
        for engine, line in result["serve"].items():
            print(f"serve with {engine}:\n  {line}")
        return 0
    if args.command == "engines":
        from mtp.engines.setup import engines_command

        return engines_command(args.action, args.engine, args.jobs)
    if args.command == "compare":
        from mtp.training.evaluate import compare_table, plot_accuracy_vs_head

        named = {}
        for item in args.results:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"{item!r}: give NAME=FILE.json")
            try:
                named[name] = json.loads(Path(path).expanduser().read_text())
                named[name]["heads"][0]["top1"]
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                raise UserError(f"{path} is not an `mtp eval` JSON result ({type(e).__name__})") from None
        print(compare_table(named))
        if args.plot:
            _check_writable_file(args.plot, "--plot")
            plot_accuracy_vs_head(named, args.plot)
        return 0
    if args.command == "convert":
        from mtp.convert import convert_meta

        heads_dir = convert_meta(args.checkpoint, args.out, args.tokenizer, args.dtype)
        print(f"heads: {heads_dir}  (backbone: {Path(args.out).expanduser().resolve() / 'backbone'})")
        return 0
    if args.command == "generate":
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        return generate(args.model, args.prompt, args.heads, args.method,
                        {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
                        args.max_new_tokens, args.stop, not args.no_chat, not args.no_compare, args.tree, args.nodes,
                        args.draft_len, args.exit_layer, args.acceptance, args.seed, args.device, args.dtype,
                        adapt=args.adapt, draft_vocab=args.draft_vocab)
    if args.command == "bench" and args.bench == "verify":
        from mtp.bench.verify import bench_verify, format_bench_verify

        _check_writable_file(args.json_path, "--json")
        result = bench_verify(args.model, args.dtypes or ["float32", "bfloat16"], args.context, args.repeats,
                              args.device)
        result["command"] = command
        print(format_bench_verify(result))
        if args.json_path:
            write_json(args.json_path, result)
        return 0
    if args.command == "bench" and args.bench == "decode":
        from mtp.bench.decode import bench_decode, format_bench_decode, plot_bench_decode

        _check_writable_file(args.json_path, "--json")
        _check_writable_file(args.plot, "--plot")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        result = bench_decode(args.model, args.prompts, methods, args.heads, args.batch_size, args.max_new_tokens,
                              args.limit, args.dtype, args.device, args.seed, args.temperature, not args.no_chat,
                              args.nodes, progress, args.draft_len, adapt=args.adapt,
                              compare_adaptive=args.compare_adaptive, draft_vocab=args.draft_vocab)
        result["command"] = command
        print(format_bench_decode(result))
        if args.json_path:
            write_json(args.json_path, result)
        if args.plot:
            plot_bench_decode(result, args.plot)
        return 0
    if args.command == "bench" and args.bench == "engine":
        from mtp.bench.engine import bench_engine, format_bench_engine, plot_bench_engine

        cfg = dataclass_from_args(BenchEngineConfig, args)
        _check_writable_file(cfg.json, "--json")
        _check_writable_file(cfg.plot, "--plot")
        result = bench_engine(cfg)
        result["command"] = command
        print(format_bench_engine(result))
        if cfg.json:
            write_json(cfg.json, result)
        if cfg.plot:
            plot_bench_engine([result], cfg.plot)
        return 0
    if args.command == "bench" and args.bench == "pretrain-step":
        from mtp.bench.pretrain_step import bench_pretrain_step, format_bench_pretrain_step

        _check_writable_file(args.json_path, "--json")
        for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        if min(args.chunk_tokens, args.repeats, args.rounds) < 1:
            raise UserError("--chunk-tokens, --repeats and --rounds must be >= 1")
        result = bench_pretrain_step(args.preset, args.heads, args.vocab, args.batch_size, args.seq_len,
                                     args.chunk_tokens, args.repeats, args.rounds, args.device, args.dtype)
        result["command"] = command
        print(format_bench_pretrain_step(result))
        if args.json_path:
            write_json(args.json_path, result)
        return 0
    if args.command == "bench" and args.bench == "train-memory":
        from mtp.bench.train_memory import bench_train_memory, format_bench_train_memory

        _check_writable_file(args.json_path, "--json")
        if min(args.heads, args.batch_size, args.seq_len, args.chunk_tokens, args.repeats) < 1:
            raise UserError("--heads, --batch-size, --seq-len, --chunk-tokens and --repeats must be >= 1")
        result = bench_train_memory(args.model, args.heads, args.kind, args.mode, args.batch_size, args.seq_len,
                                    args.chunk_tokens, args.repeats, args.device, args.dtype)
        result["command"] = command
        print(format_bench_train_memory(result))
        if args.json_path:
            write_json(args.json_path, result)
        return 0
    raise AssertionError(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    import warnings

    # library deprecation notices (e.g. transformers' about peft's calls) are not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our own bars and messages say what is happening
    try:
        return run(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except UserError as e:
        print(f"mtp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtp: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("mtp: error: out of memory: lower --chunk-tokens or --max-candidates", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
