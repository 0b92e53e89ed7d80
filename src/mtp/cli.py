"""The ``mtp`` command line: a table of subcommands, each a typed config (``mtp.config``), a run function and a
formatter; the parser is generated from the configs and ``--config FILE.yaml|json`` fills the same fields.

Precedence: the config's defaults, then the ``--config`` file, then the flags given. Bad input ends in one line,
``mtp: error: ...``, and exit status 2, before any model is loaded; never a traceback. Only the chosen
command's modules are imported (``mtp --help`` loads no torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shlex
import sys
import typing

from mtp import config as C
from mtp.config import default_of, field_docs, field_type, flag_of, read_config_file
from mtp.errors import UserError


@dataclasses.dataclass(frozen=True)
class Command:
    config: type
    run: str
    """``module:function`` taking (config, command line) and returning a result (dict) or None. One convention:
    it lives in the module of the stage it drives (``mtp.training.train:train_command``), beside its formatter."""
    show: str | None = None
    """``module:function`` turning the result into the text printed."""
    plot: str | None = None
    """``module:function`` writing the result to the config's ``plot`` file."""
    stream: str = "stdout"


COMMANDS = {
    "analyze": Command(C.AnalyzeConfig, "mtp.analysis.run:analyze_command", "mtp.analysis.report:markdown"),
    "train": Command(C.TrainConfig, "mtp.training.train:train_command", "mtp.training.train:show_train"),
    "distill": Command(C.DistillConfig, "mtp.training.distill:distill", "mtp.training.distill:show_distill"),
    "eval": Command(C.EvalConfig, "mtp.training.evaluate:eval_command", "mtp.training.evaluate:eval_table"),
    "generate": Command(C.GenerateConfig, "mtp.decode.run:generate_command", "mtp.decode.run:show_generate",
                        stream="stderr"),
    "pretrain": Command(C.PretrainConfig, "mtp.training.pretrain:pretrain_command",
                        "mtp.training.pretrain:show_pretrain"),
    "convert": Command(C.ConvertConfig, "mtp.convert:convert_command", "mtp.convert:show_convert"),
    "serve": Command(C.ServeConfig, "mtp.serve.app:serve"),
    "export": Command(C.ExportConfig, "mtp.export.run:export", "mtp.export.run:format_export"),
    "engines": Command(C.EnginesConfig, "mtp.engines.setup:engines_command"),
    "compare": Command(C.CompareConfig, "mtp.training.evaluate:compare_command", "mtp.training.evaluate:compare_table",
                       plot="mtp.training.evaluate:plot_accuracy_vs_head"),
    "bench analyze": Command(C.BenchAnalyzeConfig, "mtp.bench.analyze:bench_analyze",
                             "mtp.bench.analyze:format_bench_analyze"),
    "bench verify": Command(C.BenchVerifyConfig, "mtp.bench.verify:bench_verify", "mtp.bench.verify:format_bench_verify"),
    "bench decode": Command(C.BenchDecodeConfig, "mtp.bench.decode:bench_decode", "mtp.bench.decode:format_bench_decode",
                            plot="mtp.bench.decode:plot_bench_decode"),
    "bench context": Command(C.BenchContextConfig, "mtp.bench.context:bench_context",
                             "mtp.bench.context:format_bench_context", plot="mtp.bench.context:plot_bench_context"),
    "bench serve": Command(C.BenchServeConfig, "mtp.bench.serve:bench_serve", "mtp.bench.serve:format_bench_serve"),
    "bench engine": Command(C.BenchEngineConfig, "mtp.bench.engine:bench_engine", "mtp.bench.engine:format_bench_engine",
                            plot="mtp.bench.engine:plot_bench_engine"),
    "bench pretrain-step": Command(C.BenchPretrainStepConfig, "mtp.bench.pretrain_step:bench_pretrain_step",
                                   "mtp.bench.pretrain_step:format_bench_pretrain_step"),
    "bench train-memory": Command(C.BenchTrainMemoryConfig, "mtp.bench.train_memory:bench_train_memory",
                                  "mtp.bench.train_memory:format_bench_train_memory"),
}

GROUP_HELP = {"bench": "benchmarks: methods timed side by side in one run, medians, the machine named"}
EPILOG = ("Every command also takes --config FILE.yaml|json (its fields, by flag name; flags given win). "
          f"{C.AUTO_INSTALL_HELP} MTP_CACHE moves mtp's cache (default ~/.cache/mtp).")


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- fields -> flags


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag (or positional) per field: typed, with its help text and default; absent flags stay absent."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    owner = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]  # the command's own fields first
    rank = {name: next(i for i, k in enumerate(owner) if name in vars(k).get("__annotations__", {}))
            for name in (f.name for f in dataclasses.fields(cls))}
    for f in sorted(dataclasses.fields(cls), key=lambda f: rank[f.name]):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        base, is_list, _ = field_type(hints[f.name])
        default = default_of(f)
        shown = f" (default: {default})" if default not in ("", None, []) else ""
        # argparse formats help with %: a literal one (e.g. "90%") must be doubled
        kw = {"help": (docs.get(f.name, "") + shown).strip().replace("%", "%%"), "default": argparse.SUPPRESS}
        if meta.get("metavar") or meta.get("choices"):  # choices are checked by the config, for files too
            kw["metavar"] = meta.get("metavar") or "{" + ",".join(meta["choices"]) + "}"
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="*" if is_list else "?", type=base, **kw)
            continue
        names = (flag_of(f), *meta.get("aliases", ()))
        if base is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **kw)
        elif is_list:
            kw["help"] += " (repeatable)"
            parser.add_argument(*names, dest=f.name, type=base, action="append", **kw)
        else:
            parser.add_argument(*names, dest=f.name, type=base, **kw)


# ----------------------------------------------------------------------------- parser and run


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"mtp: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtp", description="Multi-token prediction: measure it, train it, decode faster with it.",
                     epilog=EPILOG)
    groups = {"": parser.add_subparsers(dest="_command", required=True, parser_class=_Parser)}
    for name, cmd in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group not in groups:
            groups[group] = groups[""].add_parser(group, help=GROUP_HELP[group]).add_subparsers(
                dest="_group", required=True, parser_class=_Parser)
        doc = " ".join((cmd.config.__doc__ or "").split())
        p = groups[group].add_parser(leaf, help=doc, description=doc, epilog=EPILOG,
                                     argument_default=argparse.SUPPRESS)
        add_config_arguments(p, cmd.config)
        p.add_argument("--config", metavar="FILE.yaml|json", help="read fields from a YAML or JSON file")
        p.set_defaults(_name=name)
    return parser


def make_config(cls, given: dict, path: str | None):
    values = read_config_file(path, cls) if path else {}
    values.update(given)
    return cls(**values)


def parse(argv: list[str]) -> tuple[Command, object]:
    """The command asked for and its validated config (flags over the --config file over the defaults)."""
    given = vars(build_parser().parse_args(argv))
    cmd = COMMANDS[given.pop("_name")]
    for routing in ("_command", "_group"):
        given.pop(routing, None)
    cfg = make_config(cmd.config, given, given.pop("config", None))
    cfg.check_files()
    return cmd, cfg


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd, cfg = parse(argv)
    _quiet_libraries()
    if getattr(cfg, "dtype", None) == "auto" or getattr(cfg, "backend", None) == "auto":
        from mtp.machine import in_own_thread

        # measured (once, cached) on a thread that exits: a server's decoding thread then runs the only OpenMP pool
        cfg = in_own_thread(lambda: _resolve_auto(cfg))
    result = _load(cmd.run)(cfg, "mtp " + shlex.join(argv))
    if result is None:
        return 0
    if cmd.show:
        print(_load(cmd.show)(result), file=getattr(sys, cmd.stream))
    if getattr(cfg, "json", None):
        from mtp.io import write_json

        write_json(cfg.json, result)
        print(f"JSON: {cfg.json}", file=sys.stderr)
    if cmd.plot and getattr(cfg, "plot", None):
        _load(cmd.plot)(result, cfg.plot)
        print(f"plot: {cfg.plot}", file=sys.stderr)
    return 0


def _resolve_auto(cfg):
    """--backend auto first (it tells --dtype auto from a PyTorch precision asked for), then --dtype auto."""
    if getattr(cfg, "backend", None) == "auto" and hasattr(cfg, "method"):  # generate, serve (others: per method)
        from mtp.decode.run import choose_method, resolve_backend

        _, method = choose_method(cfg.model, cfg.heads, cfg.method)
        say = None if cfg.quiet else (lambda line: print(f"mtp: {line}", file=sys.stderr))
        cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg, cfg.model, [method], say))
    return _resolve_auto_dtype(cfg) if getattr(cfg, "dtype", None) == "auto" else cfg


def _resolve_auto_dtype(cfg):
    """--dtype auto made concrete before the command runs, so that what it loads, prints and writes names the
    dtype it used."""
    from mtp.backbones import resolve_dtype

    model = getattr(cfg, "model", None) or next(iter(getattr(cfg, "models", None) or []), None)
    dtype = resolve_dtype("auto", cfg.device, model, quiet=cfg.quiet)
    if not cfg.quiet:
        print(f"mtp: --dtype auto: {dtype} (the faster here)", file=sys.stderr)
    return dataclasses.replace(cfg, dtype=dtype)


def _quiet_libraries() -> None:
    """transformers' own progress bars and notices stay out of the user's way (our messages say what happens)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    except BrokenPipeError:  # `mtp ... | head`: the reader left; say nothing more (Python's own advice)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except MemoryError:  # the flags that size memory differ by command: name them where they exist
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        hint = {"analyze": "lower --chunk-tokens or --max-candidates", "eval": "lower --max-candidates",
                "train": "lower --batch-size or --seq-len (raise --grad-accum)",
                "pretrain": "lower --batch-size or --seq-len"}.get(command, "use a smaller model or smaller inputs")
        print(f"mtp: error: out of memory: {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
