"""Every file mtp reads is untrusted: each bad one is one `mtp: error:` line naming the file and the field,
refused before any model is built (issue 16). One parametrized test per reader."""

import json
import math
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtp import heads_format as hf
from mtp.cli import main
from mtp.errors import UserError
from mtp.model.mtp import HeadsConfig, MTPModel
from tests.conftest import one_line_error


def files_under(path):
    return sorted(str(p) for p in pathlib.Path(path).rglob("*"))


def deny(monkeypatch, path, method="read_bytes"):
    """Permission denied on ``path`` (simulated: tests may run as root, who reads any file)."""
    real = getattr(pathlib.Path, method)

    def denied(self, *a, **k):
        if self == pathlib.Path(path):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, method, denied)


@pytest.fixture(scope="module")
def good_heads(tmp_path_factory, tiny_folder):
    """Two mlp heads for the tiny model folder, with token counts and an accuracy.json."""
    from mtp.backbones import load_backbone

    backbone, _ = load_backbone(str(tiny_folder))
    model = MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2))
    model.token_counts = torch.arange(128)
    folder = tmp_path_factory.mktemp("good") / "heads"
    model.save_pretrained(folder)
    hf.write_accuracy(folder, [[0.5, 0.2], [0.3, 0.1]], "code", 10, "mtp eval")
    return folder


@pytest.fixture
def heads(good_heads, tmp_path):
    folder = tmp_path / "heads"
    shutil.copytree(good_heads, folder)
    return folder


def generate(tiny_folder, folder, *extra):
    return ["generate", "--model", str(tiny_folder), "--heads", str(folder), "--max-new-tokens", "2", "--quiet",
            *extra, "abc"]


# ----------------------------------------------------------------------------- heads config.json


@pytest.mark.parametrize("change,fragments", [
    ({"n_heads": "4"}, ["config.json: n_heads must be int, got '4'"]),
    ({"kind": 3}, ["config.json: kind must be str, got 3"]),
    ({"eagle_layers": "x"}, ["config.json: eagle_layers must be a list of int, got 'x'"]),
    ({"lora": []}, ["config.json: lora must be dict, got []"]),
    ({"tap": 5}, ["config.json: tap must be str, got 5"]),
    ({"n_heads": 10 ** 9}, ["config.json", "at most 64, got 1000000000"]),
    ({"n_heads": 3}, ["n_heads is 3 but model.safetensors holds 2 heads"]),
    ({"dtype": "float8"}, ["config.json: dtype must be one of float32, bfloat16, float16, float64"]),
    ({"trained_backbone": "half"}, ["trained_backbone must be none, full or lora, got 'half'"]),
    ({"backbone_fingerprint": [1]}, ["backbone_fingerprint must be dict"]),
    ({"backbone_fingerprint": {"shape": "x", "sample": []}}, ["backbone_fingerprint.shape must be a list of int"]),
    ({"backbone": None}, ["backbone must be str, got None"]),
    ("[1, 2]", ["not an mtp heads config"]),
    ("{oops", ["config.json is corrupt: not valid JSON"]),
    ("unreadable", ["cannot read", "config.json", "Permission denied"]),
])
def test_bad_heads_config(capsys, monkeypatch, tiny_folder, heads, change, fragments):
    path = heads / hf.CONFIG
    if change == "unreadable":
        deny(monkeypatch, path)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    before = files_under(heads.parent)
    one_line_error(capsys, generate(tiny_folder, heads, "--tree", "[[0]]"), *fragments)
    assert files_under(heads.parent) == before


# ----------------------------------------------------------------------------- model.safetensors


def _nan_head(state):
    key = next(k for k in state if k.startswith("heads.") and state[k].is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = math.nan
    return key


@pytest.mark.parametrize("change,fragments", [
    ("nan", ["model.safetensors: tensor heads.", "holds NaN or infinite values"]),
    ("inf", ["model.safetensors: tensor heads.", "holds NaN or infinite values"]),
    ("float counts", ["token_counts must be a 1-D integer tensor, got torch.float32"]),
    ("negative counts", ["token_counts must be counts >= 0, got -3"]),
    ("short counts", ["token_counts has 5 entries but the backbone's vocabulary has 128", "unusable"]),
    ("shape", ["weights do not fit this model"]),
    ("truncated", ["truncated or corrupt"]),
    ("unreadable", ["cannot read", "model.safetensors", "Permission denied"]),
])
def test_bad_heads_weights(capsys, monkeypatch, tiny_folder, heads, change, fragments):
    path = heads / hf.WEIGHTS
    state = load_file(path)
    if change == "nan":
        _nan_head(state)
    elif change == "inf":
        key = _nan_head(state)
        state[key].view(-1)[0] = -math.inf
    elif change == "float counts":
        state[hf.TOKEN_COUNTS] = state[hf.TOKEN_COUNTS].float()
    elif change == "negative counts":
        state[hf.TOKEN_COUNTS] = state[hf.TOKEN_COUNTS].clone()
        state[hf.TOKEN_COUNTS][4] = -3
    elif change == "short counts":
        state[hf.TOKEN_COUNTS] = state[hf.TOKEN_COUNTS][:5].clone()
    elif change == "shape":
        key = next(k for k in state if k.startswith("heads.") and state[k].dim() == 2)
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    if change == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif change == "unreadable":
        deny(monkeypatch, path, "open")
    else:
        save_file(state, path)
    before = files_under(heads.parent)
    one_line_error(capsys, generate(tiny_folder, heads, "--tree", "[[0]]"), *fragments)
    assert files_under(heads.parent) == before


# ----------------------------------------------------------------------------- accuracy.json


@pytest.mark.parametrize("content,fragment", [
    ('{"rank_accuracy": [[NaN], [0.1]]}', "rank_accuracy[0][0] must be a probability in [0, 1], got nan"),
    ('{"rank_accuracy": [[0.5], [-1]]}', "rank_accuracy[1][0] must be a probability in [0, 1], got -1"),
    ('{"rank_accuracy": [[5.0], [0.1]]}', "got 5.0"),
    ('{"rank_accuracy": [["x"], [0.1]]}', "got 'x'"),
    ('{"rank_accuracy": [[true], [0.1]]}', "got True"),
    ('{"rank_accuracy": [0.5, 0.4]}', "rank_accuracy must be a list, per head, of 1 to 1024 accuracies"),
    ('{"rank_accuracy": [[]]}', "rank_accuracy must be a list, per head"),
    ('{"rank_accuracy": {"0": [0.5]}}', "rank_accuracy must be a list, per head"),
    ('{"data": "code"}', "rank_accuracy must be a list, per head"),
    ('[[0.5]]', "rank_accuracy must be a list, per head"),
    ('{"rank_accuracy": [[0.5], [0.4], [0.3]]}', "rank_accuracy has 3 heads but the heads folder has 2"),
    ("{oops", "accuracy.json is corrupt: not valid JSON"),
])
def test_bad_accuracy(capsys, tiny_folder, heads, content, fragment):
    (heads / hf.ACCURACY).write_text(content)
    with pytest.raises(UserError, match="accuracy.json"):
        hf.read_accuracy(heads, 2)
    before = files_under(heads.parent)
    line = one_line_error(capsys, generate(tiny_folder, heads, "--method", "tree", "--nodes", "3"), fragment,
                          "accuracy.json")
    assert "--write-accuracy" in line or "not valid JSON" in line
    assert files_under(heads.parent) == before


def test_absent_accuracy_is_the_prior(heads):
    (heads / hf.ACCURACY).unlink()
    assert hf.read_accuracy(heads, 2) is None


# ----------------------------------------------------------------------------- mtp convert: params.json, tokenizer


@pytest.mark.parametrize("params,fragments", [
    ([1, 2], ["params.json must be a JSON object of model parameters, got list"]),
    ({"dim": "4096", "n_heads": 4}, ["params.json: dim must be int, got '4096'"]),
    ({"dim": 64, "n_heads": 4, "n_layers": 2.5}, ["params.json: n_layers must be int, got 2.5"]),
    ({"dim": 64, "n_heads": 0}, ["params.json: n_heads must be between 1 and 1024, got 0"]),
    ({"dim": -64, "n_heads": 4}, ["params.json: dim must be between 1 and 65536, got -64"]),
    ({"dim": 10 ** 9, "n_heads": 4}, ["params.json: dim must be between"]),
    ({"dim": 64, "n_heads": 4, "n_future_tokens": 0}, ["n_future_tokens must be between 1 and 65"]),
    ({"dim": 64, "n_heads": 4, "n_future_tokens": 10 ** 6}, ["n_future_tokens must be between 1 and 65"]),
    ({"dim": 64, "n_heads": 4, "n_layers": -2}, ["n_layers must be between 1 and 1024"]),
    ({"dim": 64, "n_heads": 4, "norm_eps": "x"}, ["norm_eps must be float"]),
    ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, ["n_kv_heads (3) must divide n_heads (4)"]),
    ({"n_heads": 4}, ["params.json: dim is missing"]),
    ("{oops", ["params.json is corrupt: not valid JSON"]),
])
def test_bad_meta_params(capsys, tmp_path, params, fragments):
    ckpt = tmp_path / "meta"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, ckpt / "consolidated.00.safetensors")
    one_line_error(capsys, ["convert", str(ckpt), "--out", str(tmp_path / "out")], *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,fragments", [
    ("gpt2", ["--tokenizer gpt2 is not a folder", "never downloads from the Hub"]),
    ("list config", ["tokenizer_config.json must be a JSON object, got a list"]),
    ("not json", ["tokenizer_config.json is corrupt: not valid JSON"]),
    ("empty folder", ["cannot load a tokenizer from it"]),
])
def test_bad_convert_tokenizer(capsys, monkeypatch, tmp_path, tiny_folder, case, fragments):
    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("huggingface_hub.file_download.hf_hub_download", no_hub)
    tok = tmp_path / "tok"
    if case != "gpt2":
        tok.mkdir()
    if case in ("list config", "not json"):
        shutil.copy(tiny_folder / "tokenizer.json", tok / "tokenizer.json")
        (tok / "tokenizer_config.json").write_text("[]" if case == "list config" else "{oops")
    ckpt = tmp_path / "meta"
    ckpt.mkdir()
    (ckpt / "params.json").write_text('{"dim": 64, "n_heads": 4}')
    spec = "gpt2" if case == "gpt2" else str(tok)
    one_line_error(capsys, ["convert", str(ckpt), "--out", str(tmp_path / "out"), "--tokenizer", spec], *fragments)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_tokenizer_beyond_the_checkpoints_vocabulary(capsys, tmp_path, tiny_folder):
    """The tiny folder's tokenizer has 101 ids; a checkpoint of 50 tokens has no embedding for 50 of them. Its
    vocabulary is params.json's vocab_size, or the embedding's rows where that is -1 (Llama's release)."""
    from tests.test_pretrain import write_meta_checkpoint

    for vocab_size in (50, -1):
        ckpt = tmp_path / f"meta{vocab_size}"
        _, params = write_meta_checkpoint(ckpt, vocab=50)
        (ckpt / "params.json").write_text(json.dumps({**params, "vocab_size": vocab_size}))
        one_line_error(capsys, ["convert", str(ckpt), "--out", str(tmp_path / "out"), "--tokenizer", str(tiny_folder)],
                       f"--tokenizer {tiny_folder}: the tokenizer has 101 tokens but the model's vocabulary holds "
                       "only 50")
        assert not (tmp_path / "out").exists()


def _set(state, key, value):
    state[key] = value


@pytest.mark.parametrize("damage,fragments", [
    (lambda s, p: _set(s, "tok_embeddings.weight", torch.tensor(1.0)),
     ["tok_embeddings.weight has shape (), expected (50, 32)", "dim 32, 4 heads, 2 kv heads"]),
    (lambda s, p: _set(p, "vocab_size", 0), ["params.json: vocab_size must be -1 or between 1 and"]),
    (lambda s, p: (_set(p, "vocab_size", -1), _set(s, "tok_embeddings.weight", torch.zeros(0, 32))),
     ["tok_embeddings.weight has shape (0, 32), expected (vocab_size >= 1, 32)"]),
    (lambda s, p: _set(p, "vocab_size", 60), ["tok_embeddings.weight has shape (50, 32), expected (60, 32)"]),
    (lambda s, p: _set(s, "output.weight", torch.zeros(49, 32)),
     ["output.weight has shape (49, 32), expected (50, 32)"]),
    (lambda s, p: _set(s, "norm.weight", torch.zeros(32, 1)), ["norm.weight has shape (32, 1), expected (32,)"]),
    (lambda s, p: _set(s, "layers.0.feed_forward.w1.weight", torch.zeros(32)),
     ["layers.0.feed_forward.w1.weight has shape (32,), expected (ffn hidden size >= 1, 32)"]),
    (lambda s, p: [_set(s, f"layers.1.feed_forward.{w}.weight", torch.zeros(*shape))
                   for w, shape in (("w1", (40, 32)), ("w3", (40, 32)), ("w2", (32, 40)))],
     ["layers.1.feed_forward.w1.weight has shape (40, 32), expected (48, 32)"]),  # one ffn width for all layers
    (lambda s, p: _set(s, "extra_heads.1.attention.wk.weight", torch.zeros(32, 32)),
     ["extra_heads.1.attention.wk.weight has shape (32, 32), expected (16, 32)"]),
    (lambda s, p: _set(s, "layers.2.attention_norm.weight", torch.zeros(32, dtype=torch.int64)),
     ["layers.2.attention_norm.weight holds int64 values, expected floating point"]),
    (lambda s, p: s.pop("extra_heads.0.ffn_norm.weight"), ["extra_heads.0 lacks ffn_norm.weight"]),
])
def test_convert_checks_every_tensors_shape(capsys, tmp_path, damage, fragments):
    """Each tensor against what params.json implies, before anything is built or written (issue 16)."""
    from tests.test_pretrain import write_meta_checkpoint

    ckpt = tmp_path / "meta"
    state, params = write_meta_checkpoint(ckpt, vocab=50)
    damage(state, params)
    torch.save(state, ckpt / "consolidated.00.pth")
    (ckpt / "params.json").write_text(json.dumps(params))
    one_line_error(capsys, ["convert", str(ckpt), "--out", str(tmp_path / "out")], *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content,fragment", [
    ("tokenizer_config.json", "[]", "tokenizer_config.json must be a JSON object, got a list"),
    ("config.json", "[1]", "config.json must be a JSON object, got a list"),
    ("config.json", "{oops", "config.json is corrupt: not valid JSON"),
])
def test_bad_hf_folder_json(capsys, tmp_path, tiny_folder, text_file, name, content, fragment):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / name).write_text(content)
    one_line_error(capsys, ["analyze", "--model", str(folder), "--text", str(text_file), "--quiet"], fragment)


# ----------------------------------------------------------------------------- --tree


@pytest.mark.parametrize("tree,fragments", [
    ("[" + ",".join(f"[{i}]" for i in range(5000)) + "]", ["has 5000 paths: a tree has at most 4096 nodes"]),
    ("[[" + ",".join(["0"] * 100) + "]]", ["has a path 100 ranks deep: a tree is at most 64 deep"]),
    ("[" * 100000, ["nested too deeply"]),
    ("[[-1]]", ["path [-1] must be a non-empty list of non-negative integer ranks"]),
    ("[[0.5]]", ["non-negative integer ranks"]),
    ('[["a"]]', ["non-negative integer ranks"]),
    ("[[0], [200]]", ["--tree asks for rank 200 but the heads draft from 128 tokens"]),
    ("DIR", ["is a directory, not a tree file"]),
    ("BINARY", ["tree.json is not UTF-8 text"]),
    ("UNREADABLE", ["cannot read", "tree.json", "Permission denied"]),
    ("MISSING", ["tree file", "does not exist"]),
])
def test_bad_tree(capsys, monkeypatch, tmp_path, tiny_folder, good_heads, tree, fragments):
    path = tmp_path / "tree.json"
    if tree == "DIR":
        tree = str(tmp_path)
    elif tree == "BINARY":
        path.write_bytes(b"[[0]\xff]")
        tree = str(path)
    elif tree == "UNREADABLE":
        path.write_text("[[0]]")
        deny(monkeypatch, path)
        tree = str(path)
    elif tree == "MISSING":
        tree = str(tmp_path / "nope.json")
    before = files_under(tmp_path)
    one_line_error(capsys, generate(tiny_folder, good_heads, "--tree", tree), *fragments)
    assert files_under(tmp_path) == before


# ----------------------------------------------------------------------------- mtp compare


GOOD_RESULT = {"data": "code", "positions": 10, "heads": [{"head": 0, "top1": 0.5, "top5": 0.7}]}


@pytest.mark.parametrize("content,fragment", [
    ({}, "data is missing"),
    ({"heads": []}, "data is missing"),
    ([], "the result must be a JSON object, got []"),
    ({**GOOD_RESULT, "heads": []}, "heads must be a non-empty list of heads, got []"),
    ({**GOOD_RESULT, "heads": [{"head": 0}]}, "heads[0].top1 is missing"),
    ({**GOOD_RESULT, "heads": [1]}, "heads[0] must be an object, got 1"),
    ({**GOOD_RESULT, "heads": [{"head": 0, "top1": 2.0, "top5": 0.5}]}, "heads[0].top1 must be an accuracy"),
    ({**GOOD_RESULT, "positions": "many"}, "positions must be a count, got 'many'"),
    ("{oops", "is corrupt: not valid JSON"),
])
def test_bad_compare_result(capsys, tmp_path, content, fragment):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(GOOD_RESULT))
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_line_error(capsys, ["compare", f"a={good}", f"b={bad}"], fragment)
    assert str(bad) in line and "mtp eval --json" in line or "not valid JSON" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "good.json"]


def test_good_compare_result(capsys, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD_RESULT))
    assert main(["compare", f"a={good}"]) == 0


# ----------------------------------------------------------------------------- text and prompt files


@pytest.mark.parametrize("name,flag", [("bad.txt", "--text"), ("bad.jsonl", "--data")])
def test_non_utf8_text_files(capsys, tmp_path, tiny_folder, name, flag):
    path = tmp_path / name
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    one_line_error(capsys, ["analyze", "--model", str(tiny_folder), flag, str(path), "--quiet"],
                   f"{path} is not UTF-8 text (byte 0xe9", "convert it to UTF-8")


def test_non_utf8_prompt_file(tmp_path):
    from mtp.prompts import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match="prompts.jsonl is not UTF-8 text"):
        load_prompts(str(path))


DIGITS = "9" * 5000  # Python converts at most 4300 digits to an int


@pytest.mark.parametrize("name,content,fragments", [
    ("big.jsonl", '{"text": "abc", "response_start": ' + DIGITS + '}\n', ["big.jsonl line 1:", "4300 digits"]),
    ("deep.jsonl", "[" * 100000 + "]" * 100000 + "\n", ["deep.jsonl line 1:", "nested too deeply"]),
    ("lone.jsonl", '{"text": "\\ud800 and more text"}\n', ["lone.jsonl line 1:", "lone surrogate"]),
    ("ok.jsonl", '{"text": "\\u00e9t\\u00e9 \\ud83d\\ude00"}\n' * 3, None),  # escapes of real text (a pair) are fine
])
@pytest.mark.parametrize("command", ["train", "eval", "distill"])
def test_jsonl_lines_that_json_parses_but_python_cannot_use(capsys, tmp_path, tiny_folder, good_heads, name,
                                                             content, fragments, command):
    path = tmp_path / name
    path.write_text(content)
    if command == "distill":
        content = content.replace('"text"', '"prompt"')
        path.write_text(content)
    argv = {"train": ["train", "--model", str(tiny_folder), "--data", str(path), "--out", str(tmp_path / "run")],
            "eval": ["eval", "--model", str(tiny_folder), "--heads", str(good_heads), "--data", str(path)],
            "distill": ["distill", "--model", str(tiny_folder), "--prompts", str(path), "--out",
                        str(tmp_path / "d.jsonl")]}[command]
    if fragments is None:
        from mtp.data import jsonl_records

        assert [r for _, r in jsonl_records(content, name)][0][command == "distill" and "prompt" or "text"] == "été 😀"
        return
    one_line_error(capsys, argv + ["--quiet"], *fragments)
    assert not (tmp_path / "run").exists() and not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("where", ["tree file", "tree inline", "compare", "heads config", "accuracy", "config"])
def test_json_files_with_a_number_too_long(capsys, tmp_path, tiny_folder, heads, where):
    path = tmp_path / "f.json"
    if where == "tree file":
        path.write_text(f"[[{DIGITS}]]")
        argv = generate(tiny_folder, heads, "--method", "tree", "--tree", str(path))
    elif where == "tree inline":
        argv = generate(tiny_folder, heads, "--method", "tree", "--tree", f"[[{DIGITS}]]")
    elif where == "compare":
        path.write_text(f'{{"a": {DIGITS}}}')
        argv = ["compare", f"a={path}", f"b={path}"]
    elif where == "heads config":
        meta = json.loads((heads / "config.json").read_text())
        (heads / "config.json").write_text(json.dumps(meta)[:-1] + f', "extra": {DIGITS}}}')
        argv = generate(tiny_folder, heads)
    elif where == "accuracy":
        (heads / "accuracy.json").write_text(f'{{"rank_accuracy": [[{DIGITS}]]}}')
        argv = generate(tiny_folder, heads, "--method", "tree")
    else:
        path.write_text(f'{{"max_steps": {DIGITS}}}')
        argv = ["train", "--config", str(path)]
    one_line_error(capsys, argv, "4300 digits")


@pytest.mark.parametrize("flag", ["--data", "--tree", "--config"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_pipes_and_devices_are_not_read(capsys, tmp_path, tiny_folder, good_heads, flag, kind):
    """A FIFO would block until a writer comes, /dev/zero would be read until memory runs out."""
    import os

    path = tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = pathlib.Path("/dev/zero")
    argv = {"--data": ["eval", "--model", str(tiny_folder), "--heads", str(good_heads), "--data", str(path)],
            "--tree": generate(tiny_folder, good_heads, "--method", "tree", "--tree", str(path)),
            "--config": ["eval", "--config", str(path)]}[flag]
    one_line_error(capsys, argv, str(path), "is not a regular file")

# ----------------------------------------------------------------------------- mtp train --resume: the checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_folder):
    """A 2-step frozen run with a checkpoint per step and a hidden-state cache; returns (run, the train argv)."""
    from tests.conftest import SAMPLE_TEXT

    root = tmp_path_factory.mktemp("finished")
    (root / "data.txt").write_text(SAMPLE_TEXT * 30)
    argv = ["train", "--model", str(tiny_folder), "--data", str(root / "data.txt"), "--heads", "2", "--seq-len", "24",
            "--batch-size", "2", "--save-every", "1", "--cache-hidden", "--quiet"]
    assert main([*argv, "--max-steps", "2", "--out", str(root / "run")]) == 0
    return root / "run", argv


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run, argv = finished_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", [*argv, "--max-steps", "3", "--resume", "--out", str(tmp_path / "run")]


def _trainer_json(run, change):
    path = run / "checkpoint" / "trainer.json"
    if isinstance(change, bytes):
        path.write_bytes(change)
        return
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(change(meta) if callable(change) else change))


def _trainer_tensors(run, change):
    path = run / "checkpoint" / "trainer.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("damage,fragments", [
    (lambda run: _trainer_json(run, [1, 2]), ["trainer.json is damaged (a JSON object was expected, got list)"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "step": "x"}), ["step must be an integer >= 0, got 'x'"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "step": -1}), ["step must be an integer >= 0, got -1"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "step": True}), ["step must be an integer >= 0, got True"]),
    (lambda run: _trainer_json(run, lambda m: {k: v for k, v in m.items() if k != "optimizer"}),
     ["trainer.json is damaged (no optimizer)"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "config": [1]}), ["config must be an object, got list"]),
    (lambda run: _trainer_json(run, b"\xff\xfe"), ["trainer.json is damaged (not UTF-8 text: byte 0xff at offset 0)"]),
    (lambda run: _trainer_json(run, b'{"step": 1'), ["trainer.json is corrupt: not valid JSON", "is damaged"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "keys": "x"}}),
     ["optimizer.keys must be a list of distinct parameter names"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "param_groups": [1]}}),
     ["optimizer.param_groups must be a list of objects"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "scalars": {"99": {}}}}),
     ["optimizer.scalars must map indices of optimizer.keys"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "keys": ["nope"]}}),
     ["optimizer.keys names 'nope', not a parameter this run optimizes"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "param_groups": [
        {**m["optimizer"]["param_groups"][0], "lr": "fast"}]}}), ["optimizer.param_groups[0].lr is 'fast'"]),
    (lambda run: _trainer_json(run, lambda m: {**m, "optimizer": {**m["optimizer"], "param_groups": [
        {**m["optimizer"]["param_groups"][0], "params": []}]}}),
     ["optimizer.param_groups do not hold this run's optimized parameters once each"]),
    (lambda run: _trainer_tensors(run, lambda t: t.pop("rng.torch")), ["trainer.safetensors is damaged (no rng.torch"]),
    (lambda run: _trainer_tensors(run, lambda t: t.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)})),
     ["rng.torch has shape (3,)"]),
    (lambda run: _trainer_tensors(run, lambda t: t.pop("optim.1.exp_avg_sq")),
     ["trainer.safetensors is damaged (no optim.1.exp_avg_sq"]),
    (lambda run: _trainer_tensors(run, lambda t: t.update({"optim.0.exp_avg": torch.zeros(3)})),
     ["optim.0.exp_avg (the optimizer state of heads.0", "has shape (3,)", "expected (32, 32)"]),
    (lambda run: _trainer_tensors(run, lambda t: t.update({"optim.0.step": torch.zeros(2)})),
     ["optim.0.step", "has shape (2,)", "expected ()"]),
    (lambda run: _trainer_tensors(run, lambda t: t.update({"optim.7.exp_avg": torch.zeros(3)})),
     ["unexpected tensor 'optim.7.exp_avg'"]),
    (lambda run: (run / "checkpoint" / "trainer.safetensors").write_bytes(b"\x08"),
     ["trainer.safetensors is damaged ("]),
])
def test_a_damaged_training_checkpoint_is_one_line(capsys, run_copy, damage, fragments):
    """--resume reads trainer.json and trainer.safetensors as untrusted: typed, every key it reads present, every
    tensor of the right shape; each fault one line naming the file and how to go on (issue 16)."""
    run, argv = run_copy
    damage(run)
    before = (run / "metrics.jsonl").read_bytes()
    line = one_line_error(capsys, argv, str(run / "checkpoint"), *fragments)
    assert "--overwrite" in line and "is damaged" in line
    assert (run / "metrics.jsonl").read_bytes() == before  # refused before the run touched anything


@pytest.mark.parametrize("damage", [
    lambda run: (run / "hidden-rank0.bin").write_bytes(b"\0" * 100),  # cut short
    lambda run: (run / "hidden-rank0.bin").write_bytes((run / "hidden-rank0.bin").read_bytes() + b"\0"),
    lambda run: (run / "hidden-rank0.json").write_text("{oops"),
    lambda run: (run / "hidden-rank0.json").write_bytes(b"\xff\xfe"),
    lambda run: (run / "hidden-rank0.json").write_text('{"shape": ' + "1" * 5000 + "}"),
    lambda run: (run / "hidden-rank0.json").unlink(),
])
def test_a_damaged_hidden_state_cache_is_rebuilt(capsys, run_copy, damage):
    """The cache is mtp's own and can be recomputed: one that does not match is rebuilt, not a crash."""
    run, argv = run_copy
    good_bin, good_json = (run / "hidden-rank0.bin").read_bytes(), (run / "hidden-rank0.json").read_text()
    damage(run)
    assert main(argv) == 0, capsys.readouterr().err
    assert (run / "hidden-rank0.bin").read_bytes() == good_bin
    assert (run / "hidden-rank0.json").read_text() == good_json


@pytest.mark.parametrize("name", ["hidden-rank0.bin", "hidden-rank0.json"])
def test_a_folder_in_the_way_of_the_hidden_state_cache(capsys, run_copy, name):
    run, argv = run_copy
    (run / name).unlink()
    (run / name).mkdir()
    one_line_error(capsys, argv, f"{run / name} is in the way of the hidden-state cache (it is not a file)")
