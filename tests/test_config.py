"""The command line is generated from the typed configs: one source of flags and defaults, --config files,
one-line errors before any model is loaded, and no torch import for --help."""

import dataclasses
import json
import subprocess
import sys

import pytest

from mtp import config as C
from mtp.cli import COMMANDS, _load, main
from mtp.cli import parse as parse_command
from tests.conftest import one_line_error


def parse(argv):
    return parse_command(argv)[1]


REQUIRED = {"generate": ["hello"], "distill": ["--out", "x.jsonl"], "convert": ["ckpt", "--out", "o"],
            "export": ["--out", "o"], "compare": ["a=b.json"]}


def _defaults_as_flags(cls, skip) -> list[str]:
    """Every command-line field's declared default written out as the user would type it (a default of None or
    of an empty list has no spelling and is left out)."""
    import typing

    hints, argv = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        default = C.default_of(f)
        base, is_list, _ = C.field_type(hints[f.name])
        if f.name in skip or not f.metadata.get("cli", True) or default is None or (is_list and not default):
            continue
        values = default if is_list else [default]
        if f.metadata.get("positional"):
            argv += [str(v) for v in values]
        elif base is bool:
            argv.append(C.flag_of(f) if default else "--no-" + C.flag_of(f)[2:])
        else:
            for v in values:
                argv += [C.flag_of(f), str(v)]
    return argv


@pytest.mark.parametrize("name", list(COMMANDS))
def test_defaults_come_from_the_config_and_survive_being_typed(name):
    """Parsing only the required arguments gives the dataclass's own defaults (no default is written twice),
    and typing every default out as its flag (--x 3, --no-y, --z a --z b, a positional) gives the very same
    config: each flag is wired to its field, parses its type, and each default passes the config's own checks
    and normalizes to itself."""
    cmd = COMMANDS[name]
    argv = name.split() + REQUIRED.get(name, [])
    cfg = parse(argv)
    assert isinstance(cfg, cmd.config)
    skip = ("prompt", "out", "checkpoint", "results")  # given by REQUIRED
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        expected = C.default_of(f)
        if isinstance(expected, list) and f.name in ("methods", "ngram_modes", "mtp_methods"):
            expected = C._split_commas(expected)
        if f.name == "top_p" and isinstance(expected, list):
            expected = sorted(set(expected), reverse=True)
        assert getattr(cfg, f.name) == expected, (name, f.name)
    typed = argv + _defaults_as_flags(cmd.config, skip)
    assert len(typed) > len(argv), typed
    try:
        explicit = parse(typed)
    except SystemExit:
        pytest.fail(f"the defaults typed as flags are refused: mtp {' '.join(typed)}")
    assert dataclasses.asdict(explicit) == dataclasses.asdict(cfg), typed


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_field_has_help_and_the_table_resolves(name):
    cmd = COMMANDS[name]
    docs = C.field_docs(cmd.config)
    undocumented = [f.name for f in dataclasses.fields(cmd.config) if f.name not in docs]
    assert undocumented == []
    for ref in (cmd.run, cmd.show, cmd.plot):
        if ref:
            assert callable(_load(ref)), ref
    assert cmd.config.__doc__


def test_config_file_fills_fields_and_flags_win(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("max-steps: 7\nlr: 1\nheads: 2\ndata: [code]\nresume: true\n")
    cfg = parse(["train", "--config", str(f)])
    assert (cfg.max_steps, cfg.lr, cfg.heads, cfg.data, cfg.resume) == (7, 1.0, 2, ["code"], True)
    assert isinstance(cfg.lr, float)
    cfg = parse(["train", "--config", str(f), "--max-steps", "9", "--no-resume"])
    assert (cfg.max_steps, cfg.resume) == (9, False)
    j = tmp_path / "gen.json"
    j.write_text(json.dumps({"prompt": "hi", "method": "tree", "stop": "END", "nodes": 12}))
    cfg = parse(["generate", "--config", str(j)])
    assert (cfg.prompt, cfg.method, cfg.stop, cfg.nodes) == ("hi", "tree", ["END"], 12)
    analyze = tmp_path / "a.json"
    analyze.write_text(json.dumps({"model": ["m1", "m2"], "top_p": [0.5, 0.9]}))  # by flag name or field name
    cfg = parse(["analyze", "--config", str(analyze)])
    assert cfg.models == ["m1", "m2"] and cfg.top_p == [0.9, 0.5]


@pytest.mark.parametrize("content,fragments", [
    ('{"max_stepz": 3}', ["unknown key 'max_stepz'"]),
    ('{"max_steps": "ten"}', ["max_steps must be int", "'ten'"]),
    ('{"max_steps": 2.5}', ["max_steps must be int"]),
    ('{"resume": "yes"}', ["resume must be bool"]),
    ('{"data": [1, 2]}', ["data must be str, got 1"]),
    ('{"max_steps": 0}', ["--max-steps must be at least 1"]),
    ('{"mode": "sideways"}', ["unknown --mode 'sideways'"]),
    ('[1, 2]', ["expected a mapping"]),
    ('{"max_steps": ', ["not valid JSON"]),
])
def test_bad_config_files(capsys, tmp_path, monkeypatch, content, fragments):
    import mtp.backbones

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(mtp.backbones, "load_backbone", refuse)
    f = tmp_path / "c.json"
    f.write_text(content)
    one_line_error(capsys, ["train", "--config", str(f)], *fragments)


def test_bad_flags_and_files(capsys, tmp_path):
    one_line_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "cannot read it")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml")], "not valid YAML")
    one_line_error(capsys, ["generate", "--method", "warp", "hi"], "unknown --method 'warp'")
    one_line_error(capsys, ["engines", "setup"], "say which engine")
    one_line_error(capsys, ["engines", "fly"], "unknown ACTION 'fly'")
    one_line_error(capsys, ["bench", "decode", "--methods", "tree,warp"], "unknown method 'warp'")
    one_line_error(capsys, ["train", "--max-steps", "x"], "invalid int value")
    one_line_error(capsys, ["generate", "   "], "empty prompt")
    one_line_error(capsys, ["compare", "nonsense"], "NAME=FILE.json")


def test_help_imports_no_torch():
    """`mtp --help` and a bad flag stay fast: the CLI, its configs and the package import no torch."""
    code = ("import sys; from mtp.cli import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    main(['--help']); main(['train', '--help']); main(['generate', '--bogus'])\n"
            "import mtp; mtp.__version__\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_names_auto_install_and_config(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "MTP_AUTO_INSTALL=0" in out and "--config" in out
    assert main(["bench", "decode", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--compare-adaptive" in out and "--draft-vocab" in out and "(default: 128)" in out


def test_lazy_public_api():
    import mtp

    assert mtp.AnalyzeConfig is C.AnalyzeConfig and callable(mtp.build_decoder)
    with pytest.raises(AttributeError):
        mtp.nothing_here


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_help_renders_and_every_float_flag_refuses_nan_and_inf(name, capsys):
    """A literal % in a field's help once made argparse print its own dictionary; NaN and inf pass every
    range check written as a comparison, so they are refused before any: one line naming the flag."""
    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert "option_strings" not in out and "usage:" in out
    cls = COMMANDS[name].config
    hints = C.typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, is_list, _ = C.field_type(hints[f.name])
        if base is not float:
            continue
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(C.UserError, match=f"{C.flag_of(f)} must be a finite number"):
                cls(**{f.name: [bad] if is_list else bad})


def test_an_output_that_is_also_an_input_is_refused_and_nothing_is_written(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, which the report must not replace\n")
    assert main(["analyze", "--text", str(notes), "--json", str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "also an input" in err[0] and "--json" in err[0]
    assert notes.read_text() == "my notes, which the report must not replace\n"


def test_heads_given_as_a_file_says_so(tmp_path):
    from mtp.heads_format import read_heads_config

    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(C.UserError, match="is a file, not a heads folder"):
        read_heads_config(f)


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--lora-alpha", "-5"], ["--lora-alpha must be positive", "-5"]),
    (["train", "--lora-alpha", "0"], ["--lora-alpha must be positive"]),
    (["generate", "hi", "--exit-layer", "0"], ["--exit-layer must be at least 1"]),
    (["bench", "decode", "--exit-layer", "-2"], ["--exit-layer must be at least 1"]),
    (["generate", "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
    (["distill", "--out", "x.jsonl", "--max-new-tokens", "-1"], ["--max-new-tokens must be at least 1"]),
    (["train", "--max-tokens", "0"], ["--max-tokens must be at least 1"]),
    (["serve", "--max-tokens", "-1"], ["--max-tokens must be at least 1"]),
    (["bench", "serve", "--max-tokens", "0"], ["--max-tokens must be at least 1"]),
    (["bench", "engine", "--max-new-tokens", "0"], ["--max-new-tokens must be between 1 and 100000"]),
    (["bench", "decode", "--methods", ""], ["--methods is empty"]),
    (["bench", "decode", "--methods", " , "], ["--methods is empty"]),
    (["bench", "context", "--methods", ""], ["give at least one --methods"]),
    (["bench", "serve", "--methods", ""], ["--methods is empty"]),
    (["generate", "hi", "--seed", "-1"], ["--seed must be between 0 and 2**63-1", "got -1"]),
    (["train", "--seed", str(2 ** 64)], ["--seed must be between", "and 2**63-1"]),  # every int: 64 bits
    (["bench", "engine", "--seed", str(2 ** 63)], ["--seed must be between", "and 2**63-1"]),
    (["bench", "engine", "--seed", "-1"], ["--seed must be between 0 and 2**63-1"]),
    (["generate", "hi", "--nodes", str(10 ** 9)], ["--nodes must be at most 1024"]),
    (["bench", "decode", "--draft-len", str(10 ** 9)], ["--draft-len must be at most 1024"]),
    (["generate", "hi", "--max-new-tokens", str(10 ** 9)], ["--max-new-tokens must be at most 1048576"]),
    (["bench", "decode", "--max-new-tokens", str(10 ** 9)], ["--max-new-tokens must be at most 1048576"]),
    (["bench", "context", "--max-new-tokens", str(10 ** 9)], ["--max-new-tokens must be at most 1048576"]),
    (["distill", "--out", "x.jsonl", "--max-new-tokens", str(10 ** 9)], ["--max-new-tokens must be at most"]),
    (["serve", "--max-tokens", str(10 ** 9)], ["--max-tokens must be at most 1048576"]),
    (["analyze", "--max-candidates", str(10 ** 12)], ["--max-candidates must be at most 65536"]),
    (["eval", "--max-candidates", str(10 ** 12)], ["--max-candidates must be at most 65536"]),
    (["bench", "analyze", "--max-candidates", str(10 ** 12)], ["--max-candidates must be at most 65536"]),
    (["engines", "setup", "llama.cpp", "--jobs", "100000"], ["--jobs must be at most 1024"]),
    (["bench", "engine", "--draft-len", "2000"], ["--draft-len must be at most 256"]),
    (["serve", "--max-batch", "100000"], ["--max-batch must be at most 256"]),
    (["bench", "serve", "--max-batch", "100000"], ["--max-batch must be at most 256"]),
    (["distill", "--out", "x.jsonl", "--batch-size", "10000"], ["--batch-size must be at most 256"]),
    (["serve", "--temperature", "3"], ["--temperature must be in [0, 2]"]),
    (["serve", "--backend", "llama.cpp", "--max-batch", "64"], ["at most 32 rows"]),
    (["serve", "--backend", "llama.cpp", "--ctx-size", "10"], ["--ctx-size must be at least 256"]),
    (["bench", "engine", "--engine", "vllm", "--heads", "none"], ["--heads none"]),
])
def test_nonsense_and_unbounded_flags_are_refused_in_one_line(capsys, monkeypatch, argv, fragments):
    """Each of these was once accepted silently (or ran into a traceback, a hang or out-of-memory later)."""
    import mtp.backbones

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(mtp.backbones, "load_backbone", refuse)
    err = one_line_error(capsys, argv, *fragments)
    assert "Traceback" not in err


def test_the_bounds_themselves_are_accepted():
    assert C.GenerateConfig(prompt="hi", seed=C.MAX_SEED, nodes=C.MAX_NODES, draft_len=C.MAX_NODES,
                            max_new_tokens=C.MAX_NEW_TOKENS).seed == 2 ** 63 - 1
    assert C.BenchEngineConfig(seed=0).seed == 0
    assert C.AnalyzeConfig(max_candidates=C.MAX_CANDIDATES).max_candidates == 65536
    assert C.TrainConfig(lora_alpha=1).lora_alpha == 1
    assert C.BenchEngineConfig(mtp_methods=[""]).mtp_methods == []  # "" skips mtp's own engine, as documented
