"""Nothing a user saved is lost: an output that exists is refused unless --overwrite, before any work; never
into the installed package; append-only files are repaired to their last complete record."""

import json
import shutil

import pytest

from mtp.cli import main
from mtp.config import AnalyzeConfig, BenchDecodeConfig, DistillConfig, PretrainConfig, TrainConfig
from mtp.errors import UserError
from mtp.heads_format import DEFAULT_HEADS_DIR
from mtp.io import check_new_output
from mtp.training.distill import distill
from mtp.training.pretrain import pretrain
from mtp.training.train import train
from tests.conftest import SAMPLE_TEXT, one_line_error


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))


def test_report_files_are_not_replaced_unasked(tmp_path):
    report = tmp_path / "result.json"
    report.write_text('{"mine": 1}')
    with pytest.raises(UserError, match="--json .* already exists: .* --overwrite"):
        BenchDecodeConfig(json=str(report)).check_files()
    BenchDecodeConfig(json=str(report), overwrite=True).check_files()
    (tmp_path / "plot.png").write_bytes(b"png")
    with pytest.raises(UserError, match="--plot .* already exists"):
        BenchDecodeConfig(plot=str(tmp_path / "plot.png")).check_files()
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "lens.png").write_bytes(b"png")
    with pytest.raises(UserError, match="--out .*lens.png already exists"):
        AnalyzeConfig(out=str(tmp_path / "plots")).check_files()
    AnalyzeConfig(out=str(tmp_path / "plots"), overwrite=True).check_files()
    assert report.read_text() == '{"mine": 1}'


def test_nothing_is_written_into_the_installed_package():
    with pytest.raises(UserError, match="inside the installed mtp package"):
        check_new_output(DEFAULT_HEADS_DIR / "smollm2-135m" / "accuracy.json", "--write-accuracy", overwrite=True)


def test_write_accuracy_keeps_an_existing_one_unless_overwrite(tiny_folder, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT * 5)
    train(TrainConfig(model=str(tiny_folder), out=str(tmp_path / "run"), heads=2, data=[str(text)], seq_len=24,
                      batch_size=2, max_steps=2, autocast="off"), progress=False)
    accuracy = tmp_path / "run" / "heads" / "accuracy.json"
    accuracy.write_text(json.dumps({"rank_accuracy": [[0.5], [0.25]], "data": "big", "positions": 3000,
                                    "command": ""}))
    args = ["eval", "--model", str(tiny_folder), "--heads", str(tmp_path / "run" / "heads"), "--text", str(text),
            "--context", "16", "--max-positions", "4", "--no-marginal", "--write-accuracy", "--quiet"]
    capsys.readouterr()
    one_line_error(capsys, args, "--write-accuracy", "already exists")
    assert json.loads(accuracy.read_text())["positions"] == 3000
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(accuracy.read_text())["positions"] == 4


def test_a_run_folder_is_not_replaced_unasked(tiny_folder, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "run"
    (out / "heads").mkdir(parents=True)
    (out / "heads" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    args = ["train", "--model", str(tiny_folder), "--data", str(text), "--out", str(out), "--heads", "1",
            "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--autocast", "off", "--quiet"]
    one_line_error(capsys, args, "already holds a run (heads, metrics.jsonl)")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert main(args + ["--overwrite"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    assert (out / "heads" / "model.safetensors").is_file()
    # an input as output, a file as --out
    capsys.readouterr()  # the run's summary
    one_line_error(capsys, args[:-1] + ["--out", str(text), "--quiet"], "is also an input")
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(PretrainConfig(preset="tiny", out=str(out), max_steps=1), progress=False)


def test_the_model_or_tokenizer_folder_is_not_a_run_folder(tiny_folder, tmp_path, capsys):
    """--out the --model folder (train) or the --tokenizer folder (pretrain), even with --overwrite: refused
    before anything is written into it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    before = sorted(p.name for p in model.iterdir())
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT * 20)
    one_line_error(capsys, ["train", "--model", str(model), "--data", str(text), "--out", str(model), "--overwrite",
                            "--heads", "1", "--seq-len", "16", "--max-steps", "1", "--quiet"],
                   f"--out {model} is also an input")
    one_line_error(capsys, ["pretrain", "--preset", "tiny", "--tokenizer", str(model), "--data", str(text),
                            "--out", str(model), "--overwrite", "--max-steps", "1", "--quiet"],
                   f"--out {model} is also an input")
    assert sorted(p.name for p in model.iterdir()) == before


def test_distill_repairs_a_cut_off_partial_file(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    words = ["one", "two", "three"]
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} please."}) + "\n" for w in words))
    out = tmp_path / "distilled.jsonl"
    partial = tmp_path / "distilled.jsonl.partial"
    first = {"prompt": "Say one please.", "response": "kept", "text": "Say one please.kept", "response_start": 15,
             "finished": True}
    partial.write_text(json.dumps(first) + "\n" + '{"prompt": "Say two please.", "resp')  # killed mid-write
    cfg = dict(model=str(tiny_folder), prompts=[str(prompts)], out=str(out), max_new_tokens=4, batch_size=2,
               quiet=True)
    distill(DistillConfig(**cfg))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(f"Say {w} please." for w in words) and rows[0] == first
    assert not partial.exists()
    # a partial file of other prompts is refused and left as it was
    partial2 = tmp_path / "distilled2.jsonl.partial"
    partial2.write_text(json.dumps({**first, "prompt": "Something else"}) + "\n")
    with pytest.raises(UserError, match="other prompts"):
        distill(DistillConfig(**{**cfg, "out": str(tmp_path / "distilled2.jsonl")}))
    assert json.loads(partial2.read_text())["prompt"] == "Something else"
    # a finished file is replaced only with --overwrite
    with pytest.raises(UserError, match="already exists"):
        distill(DistillConfig(**cfg))
    distill(DistillConfig(**cfg, overwrite=True))
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("argv,fragments", [
    (["eval", "--model", "MODEL", "--heads", "HEADS", "--data", "TEXT", "--json", "TEXT", "--overwrite"],
     ["--json", "is also an input"]),
    (["eval", "--model", "MODEL", "--heads", "HEADS", "--data", "TEXT", "--json", "HEADS/config.json", "--overwrite"],
     ["would replace a file of the input folder"]),
    (["eval", "--model", "MODEL", "--heads", "HEADS", "--data", "TEXT", "--json", "MODEL/model.safetensors",
      "--overwrite"], ["would replace a file of the input folder"]),
    (["bench", "analyze", "--model", "MODEL", "--data", "TEXT", "--json", "TEXT", "--overwrite"], ["is also an input"]),
    (["bench", "decode", "--model", "MODEL", "--prompts", "PROMPTS", "--json", "PROMPTS", "--overwrite"],
     ["is also an input"]),
    (["compare", "a=RESULT", "b=RESULT", "--plot", "RESULT", "--overwrite"], ["--plot", "is also an input"]),
    (["train", "--model", "MODEL", "--data", "TEXT", "--out", "MODEL", "--overwrite"], ["--out", "is also an input"]),
    (["analyze", "--model", "MODEL", "--text", "TEXT", "--json", "SAME", "--out", "SAME"],
     ["--json and --out name the same path"]),
    (["bench", "decode", "--model", "MODEL", "--json", "SAME", "--plot", "SAME"], ["--json and --plot name the same"]),
    (["bench", "decode", "--model", "MODEL", "--plot", "p.xyz"], ["--plot p.xyz: matplotlib cannot write '.xyz'"]),
    (["compare", "a=RESULT", "b=RESULT", "--plot", "p.docx"], ["matplotlib cannot write '.docx'", ".png"]),
    (["eval", "--model", "MODEL", "--heads", "HEADS", "--data", "TEXT", "--json", "x" * 300 + ".json"],
     ["--json", "File name too long"]),
    (["train", "--model", "MODEL", "--data", "TEXT", "--out", "/proc/mtp-run"], ["--out /proc/mtp-run: cannot write"]),
    (["eval", "--model", "MODEL", "--heads", "HEADS", "--data", "TEXT", "--json", "/proc/r.json"],
     ["--json /proc/r.json: cannot write"]),
])
def test_outputs_that_would_destroy_an_input_or_cannot_be_written(capsys, tmp_path, tiny_folder, argv, fragments,
                                                                     monkeypatch):
    """Refused before any work, even with --overwrite; nothing the user has is touched."""
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text("{}")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "result.json").write_text("{}")
    names = {"MODEL": str(tiny_folder), "HEADS": str(heads), "TEXT": str(tmp_path / "text.txt"),
             "PROMPTS": str(tmp_path / "prompts.jsonl"), "RESULT": str(tmp_path / "result.json"),
             "SAME": str(tmp_path / "same.json")}
    argv = [names.get(a, a) for a in argv]
    argv = [a.replace("HEADS/", str(heads) + "/").replace("MODEL/", str(tiny_folder) + "/") for a in argv]
    argv = [a.replace("=RESULT", "=" + names["RESULT"]) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *tiny_folder.iterdir()] if p.is_file()}
    one_line_error(capsys, argv, *fragments)
    assert {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *tiny_folder.iterdir()] if p.is_file()} == before


def test_building_a_config_reads_no_file(tmp_path, monkeypatch):
    """Values are checked when a config is built; the file system only in check_files (a config rebuilt from a
    saved run, or by dataclasses.replace, must not fail on outputs that now exist)."""
    import pathlib

    report = tmp_path / "result.json"
    report.write_text("{}")
    touched = []
    for name in ("exists", "is_file", "is_dir", "resolve", "read_text"):
        real = getattr(pathlib.Path, name)
        monkeypatch.setattr(pathlib.Path, name,
                            lambda self, *a, _real=real, **k: touched.append(self) or _real(self, *a, **k))
    cfg = BenchDecodeConfig(json=str(report), tree=str(tmp_path / "tree.json"))
    AnalyzeConfig(out=str(tmp_path), json=str(report))
    assert touched == []
    with pytest.raises(UserError, match="tree file .* does not exist"):
        cfg.check_files()
    assert touched
