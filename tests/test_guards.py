"""Flags bounded by the model (its context, layers and vocabulary) are refused in one line once its config is read,
before any weights are loaded: no traceback, no minutes of silent work, no out-of-memory (issue 16)."""

import pytest

from mtp.errors import UserError
from tests.conftest import one_line_error


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: every check below must come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the flags were checked against the model's config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


CONTEXT = "exceed the model's context of 512 tokens"  # the tiny model's max_position_embeddings


@pytest.mark.parametrize("argv,fragments", [
    (["generate", "hi", "--max-new-tokens", "100000"], ["--max-new-tokens: 100000 tokens", CONTEXT]),
    (["generate", "hi", "--method", "early-exit", "--exit-layer", "2"], ["--exit-layer 2 must be below", "2 layers"]),
    (["generate", "hi", "--method", "early-exit", "--exit-layer", "7"], ["--exit-layer 7 must be below"]),
    (["bench", "decode", "--methods", "plain", "--max-new-tokens", "1000"], ["--max-new-tokens: 1000", CONTEXT]),
    (["bench", "decode", "--methods", "early-exit", "--exit-layer", "3"], ["--exit-layer 3 must be below"]),
    (["bench", "context", "--methods", "plain", "--contexts", "500", "--max-new-tokens", "64"],
     ["--contexts 500 + --max-new-tokens 64: 564 tokens", CONTEXT]),
    (["bench", "verify", "--context", "100000"], ["--context 100000 + the longest verify forward", CONTEXT]),
    (["eval", "--context", "9000"], ["--context 9000 + --positions-per-window 16: 9016 tokens", CONTEXT]),
    (["eval", "--max-candidates", "1000"], ["--max-candidates 1000 exceeds the model's vocabulary of 128 tokens"]),
    (["analyze", "--context", "600", "--no-lens"], ["--context 600 + --positions-per-window 16 + --k 3", CONTEXT]),
    (["analyze", "--max-candidates", "129"], ["--max-candidates 129 exceeds the model's vocabulary of 128"]),
    (["bench", "analyze", "--context", "500"], ["--context 500 + --positions-per-window 16 + --k 2", CONTEXT]),
    (["bench", "analyze", "--max-candidates", "200"], ["--max-candidates 200 exceeds the model's vocabulary"]),
    (["train", "--seq-len", "9000"], ["--seq-len: 9000 tokens", CONTEXT]),
    (["train", "--tap", "layer:3"], ["tap 'layer:3': the layer must be 0..2"]),
    (["bench", "train-memory", "--seq-len", "513"], ["--seq-len: 513 tokens", CONTEXT]),
    (["distill", "--out", "OUT", "--max-new-tokens", "600"], ["--max-new-tokens: 600 tokens", CONTEXT]),
    (["serve", "--port", "0", "--method", "plain", "--max-tokens", "1024"], ["--max-tokens: 1024 tokens", CONTEXT]),
    (["bench", "serve", "--max-tokens", "600"], ["--max-tokens: 600 tokens", CONTEXT]),
])
def test_flags_beyond_the_model_are_refused_before_its_weights_load(capsys, tmp_path, tiny_folder, no_weights,
                                                                    argv, fragments):
    argv = [str(tmp_path / "out.jsonl") if a == "OUT" else a for a in argv]
    one_line_error(capsys, [*argv, "--model", str(tiny_folder)], *fragments)


def test_the_checks_read_the_config_only(tiny_folder):
    """One helper per limit, fed the config read from the folder (a Gemma 3's sliding window is not its limit)."""
    from transformers import Gemma3TextConfig

    from mtp.backbones import backbone_config, check_context, check_layer, check_vocab

    cfg = backbone_config(str(tiny_folder))
    assert (cfg.max_position_embeddings, cfg.num_hidden_layers, cfg.vocab_size) == (512, 2, 128)
    check_context(512, "--x", cfg)  # the limit itself is fine
    check_layer(1, "--exit-layer", cfg)
    check_vocab(128, "--max-candidates", cfg)
    with pytest.raises(UserError, match="--x: 513 tokens exceed the model's context of 512"):
        check_context(513, "--x", cfg)
    gemma = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                             max_position_embeddings=8192, layer_types=["sliding_attention", "full_attention"])
    check_context(8192, "--context", gemma)
    with pytest.raises(UserError, match="context of 8192 tokens"):
        check_context(9000, "--context", gemma)


@pytest.fixture(scope="module")
def small_vocab_folder(tmp_path_factory):
    """A model of 64 tokens saved with the 101-token character tokenizer: ids 64 to 100 have no embedding."""
    from tests.conftest import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("vocab64"), vocab=64)


@pytest.mark.parametrize("argv", [
    ["generate", "hello ~~~"],
    ["train", "--data", "CORPUS", "--out", "RUN", "--heads", "1", "--seq-len", "16", "--max-steps", "1"],
    ["analyze", "--text", "CORPUS", "--no-lens", "--max-candidates", "32"],
])
def test_a_tokenizer_beyond_the_embedding_is_refused_before_its_weights_load(capsys, tmp_path, corpus_file,
                                                                             small_vocab_folder, no_weights, argv):
    """Not an IndexError inside torch.embedding mid-run: one line naming both sizes, the weights never loaded."""
    argv = [{"CORPUS": str(corpus_file), "RUN": str(tmp_path / "run")}.get(a, a) for a in argv]
    one_line_error(capsys, [*argv, "--model", str(small_vocab_folder)],
                   f"{small_vocab_folder}: the tokenizer has 101 tokens but the model's vocabulary holds only 64")
    assert not (tmp_path / "run").exists()


def test_an_added_token_past_the_embedding_is_not_refused(tmp_path):
    """Some released models add a pad token one past their embedding (never fed to it): only the base
    vocabulary counts."""
    import torch

    from mtp.backbones import load_backbone
    from tests.conftest import char_tokenizer, tiny_model

    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert (tok.vocab_size, len(tok)) == (101, 102)
    tiny_model("llama", vocab=101, dtype=torch.float32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, loaded = load_backbone(str(tmp_path))
    assert len(loaded) == 102 and model.get_input_embeddings().weight.shape[0] == 101


def test_a_model_name_that_is_not_a_folder_never_reaches_the_hub(capsys, tmp_path, monkeypatch):
    """Offline means offline: an unknown name is refused by mtp, not looked up on the Hugging Face hub."""
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["generate", "hi", "--model", "someone/some-model"], "does not exist")
    one_line_error(capsys, ["eval", "--model", "gpt2"], "unknown model 'gpt2'")


# ----------------------------------------------------------------------------- waits on outside processes


def _unbounded_waits() -> list[str]:
    """Calls in src/mtp (every file, the converters included) that wait on another process or a server without a
    time-out; an httpx client's requests have the time-out its constructor gets."""
    import ast
    from pathlib import Path

    import mtp

    waits = {"run", "check_output", "check_call", "call", "urlopen", "get", "post", "stream", "request",
             "AsyncClient", "Client", "wait", "communicate"}
    found = []
    for path in sorted(Path(mtp.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
            outside = owner in ("subprocess", "httpx", "urllib.request", "self.proc", "proc") or \
                name in ("urlopen", "AsyncClient", "Client")
            if name not in waits or not outside:
                continue
            timeout = next((k.value for k in node.keywords if k.arg == "timeout"), None)
            given = timeout is not None and not (isinstance(timeout, ast.Constant) and timeout.value is None)
            positional = name in ("wait", "communicate") and node.args
            if not (given or positional):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_wait_on_another_process_has_a_time_out():
    assert _unbounded_waits() == []


def test_a_stuck_or_absent_server_is_a_counted_failure_not_a_traceback():
    """bench serve's clients give up (connect 30 s, read 630 s: the server's own 600 s plus a margin)."""
    import asyncio
    import socket

    from mtp.bench.serve import _scaling

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = asyncio.run(_scaling(f"http://127.0.0.1:{port}", "m", ["hi"], 2, 3, 4))
    assert (out["requests"], out["completed"], out["tokens"]) == (3, 0, 0)


def test_a_training_probe_that_runs_too_long_is_stopped(monkeypatch):
    import mtp.bench.train_memory as tm

    monkeypatch.setattr(tm, "PROBE_TIMEOUT", 0.05)
    with pytest.raises(UserError, match="took more than"):
        tm._probe("m", "efficient", 1, "mlp", "frozen", 1, 8, 8, 1, "cpu", "float32", "last", "efficient")


def test_every_transformers_load_is_local_only():
    """Offline means offline: each from_pretrained of transformers in src/mtp (every file, the converters
    included) passes local_files_only=True, so no name can send it to the Hugging Face hub."""
    import ast
    from pathlib import Path

    import mtp

    found = []
    for path in sorted(Path(mtp.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and ast.unparse(node.func.value) not in ("MTPModel", "cls")
                    and not any(k.arg == "local_files_only" for k in node.keywords)):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert found == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["parent", "inside"])
@pytest.mark.parametrize("command", ["train", "analyze", "export", "convert", "pretrain"])
def test_a_folder_output_apart_from_every_input(tmp_path, capsys, command, where, overwrite):
    """Every command that writes a folder refuses one that holds an input or lies inside one, with or without
    --overwrite, in one line, before anything is read or written; the input stays byte for byte."""
    from tests.conftest import one_line_error, save_tiny_folder

    runs = tmp_path / "RUN"
    model = save_tiny_folder(runs / "model")
    (runs / "notes.txt").write_text("mine")
    data = runs / "data.txt"
    data.write_text("def f(x):\n    return x\n" * 20)
    out = str(runs if where == "parent" else model / "sub")
    argv = {"train": ["train", "--model", str(model), "--out", out],
            "analyze": ["analyze", "--model", str(model), "--out", out],
            "export": ["export", "--heads", str(model), "--format", "eagle3", "--out", out],
            "convert": ["convert", str(model), "--out", out],
            "pretrain": ["pretrain", "--data", str(data), "--tokenizer", str(model), "--out", out]}[command]
    if command == "pretrain" and where == "inside":
        argv[argv.index("--out") + 1] = str(model / "sub")  # inside the tokenizer's folder
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    capsys.readouterr()  # the fixture's own output
    one_line_error(capsys, argv + overwrite, "--out")
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
    assert not (model / "sub").exists()
