"""Fault injection: a training run killed (as by SIGKILL: no cleanup runs) before any rename or removal of its
checkpoint and heads saves resumes with --resume to heads bit-identical to an uninterrupted run; logs and
distillation files cut mid-line are repaired before they grow; leftovers are cleaned."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mtp import io
from mtp.training.train import train
from tests.conftest import crash_optimizer_at
from tests.test_train import config as train_config

KILLED = 137  # what a shell reports for SIGKILL


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))


def config(tiny_folder, corpus_file, out, **kw):
    """test_train's run, shorter: checkpoints at steps 2 and 4, then the heads."""
    return train_config(tiny_folder, corpus_file, out, **{"max_steps": 4, "warmup_steps": 1, "save_every": 2, **kw})


class Disk:
    """Counts the renames and removals mtp.io makes (the moments a save can be cut) and, from the ``kill_at``-th
    on, ends the process on the spot, as SIGKILL would: no ``finally``, no cleanup."""

    def __init__(self, monkeypatch, within, kill_at: int | None = None):
        self.count, self.kill_at, within = 0, kill_at, str(within)
        real_replace, real_rmtree = os.replace, shutil.rmtree

        def replace(src, dst, *a, **k):
            if str(dst).startswith(within):  # the run's folder (not the model cache)
                self.event()
            return real_replace(src, dst, *a, **k)

        def rmtree(path, *a, **k):
            if str(path).startswith(within) and os.path.exists(path):  # removing nothing is no moment of its own
                self.event()
            return real_rmtree(path, *a, **k)

        monkeypatch.setattr(io.os, "replace", replace)
        monkeypatch.setattr(io.shutil, "rmtree", rmtree)

    def event(self):
        self.count += 1
        if self.count == self.kill_at:
            os._exit(KILLED)


def run_killed(monkeypatch, cfg, kill_at: int) -> int:
    """Train in a forked child that dies at disk event ``kill_at``; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            torch.set_num_threads(1)
            Disk(monkeypatch, cfg.out, kill_at)
            train(cfg, progress=False)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the child must not unwind into pytest
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def heads_state(folder):
    return load_file(folder / "model.safetensors")


def test_a_kill_at_every_rename_and_removal_resumes_to_identical_heads(tiny_folder, corpus_file, tmp_path,
                                                                       monkeypatch):
    with monkeypatch.context() as m:
        disk = Disk(m, tmp_path / "full")
        train(config(tiny_folder, corpus_file, tmp_path / "full"), progress=False)
    reference, events = heads_state(tmp_path / "full" / "heads"), disk.count
    assert events >= 15  # 3 saves (2 checkpoints, the heads), each several renames and removals

    for k in range(1, events + 1):
        out = tmp_path / f"kill{k}"
        assert run_killed(monkeypatch, config(tiny_folder, corpus_file, out), k) == KILLED, k
        train(config(tiny_folder, corpus_file, out, resume=True), progress=False)
        got = heads_state(out / "heads")
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[n], reference[n]) for n in reference), f"kill at event {k}: heads differ"
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4], (k, steps)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "heads", "metrics.jsonl"], k  # no leftovers
        shutil.rmtree(out)


def test_recover_dir_finishes_or_undoes_a_replacement(tmp_path):
    final = tmp_path / "checkpoint"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    # killed between moving the old version aside and renaming the complete new one into place
    (tmp_path / f".checkpoint.old-{dead}").mkdir()
    (tmp_path / f".checkpoint.old-{dead}" / "v").write_text("old")
    (tmp_path / f".checkpoint.tmp-{dead}").mkdir()
    (tmp_path / f".checkpoint.tmp-{dead}" / "v").write_text("new")
    assert io.recover_dir(final) and (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # killed while filling a new version: it is dropped, the old one stays
    (tmp_path / f".checkpoint.tmp-{dead}").mkdir()
    assert io.recover_dir(final) and (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # a live process's temporary folder is its own business
    (tmp_path / f".checkpoint.tmp-{os.getppid()}").mkdir()
    io.recover_dir(final)
    assert (tmp_path / f".checkpoint.tmp-{os.getppid()}").exists()


def test_heads_caught_between_their_two_renames_say_how_to_finish(tmp_path):
    from mtp.errors import UserError
    from mtp.heads_format import read_heads_config

    dead = 2 ** 22 + 12345
    (tmp_path / f".heads.old-{dead}").mkdir()
    (tmp_path / f".heads.tmp-{dead}").mkdir()
    with pytest.raises(UserError, match=f"interrupted; `mtp train --resume --out {tmp_path}`"):
        read_heads_config(tmp_path / "heads")


def test_a_log_cut_mid_line_is_repaired_before_it_grows(tiny_folder, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = crash_optimizer_at(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tiny_folder, corpus_file, out), progress=False)
    restore()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')  # what a kill in the middle of a write leaves
    train(config(tiny_folder, corpus_file, out, resume=True), progress=False)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_complete_lines_cuts_a_partial_last_line(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert io.complete_lines(log) == ['{"a": 1}', '{"a": 2}']
    assert log.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    io.append_line(log, '{"a": 3}')
    assert log.read_text().splitlines() == ['{"a": 1}', '{"a": 2}', '{"a": 3}']
    assert io.complete_lines(tmp_path / "absent") == []


KILL_IN_THE_SWAP = """
import os, sys
from pathlib import Path

out = Path(sys.argv[sys.argv.index("--out") + 1])
if os.environ.get("MTP_TEST_KILL") and os.environ["RANK"] == "0":
    real, into = os.replace, []

    def replace(src, dst, *a, **k):  # the 2nd checkpoint save: the old one is aside, the new one complete
        if Path(dst) == out / "checkpoint":
            into.append(dst)
            if len(into) == 2:
                os._exit(137)
        return real(src, dst, *a, **k)
    os.replace = replace
from mtp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_killed_in_a_checkpoint_swap_resume_to_identical_heads(tiny_folder, corpus_file, tmp_path):
    """torchrun, 2 processes, FSDP over the backbone (--mode joint): rank 0 dies between moving the old checkpoint
    aside and renaming the new one into place, and torchrun ends rank 1. ``--resume`` (2 processes again) recovers
    the checkpoint on rank 0 behind a barrier, finishes the run (the kill came after its last step) and writes
    heads bit-identical to an uninterrupted 2-process run."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(KILL_IN_THE_SWAP)
    args = ["train", "--model", str(tiny_folder), "--data", str(corpus_file), "--heads", "2", "--seq-len", "24",
            "--batch-size", "4", "--max-steps", "4", "--lr", "0.01", "--warmup-steps", "1", "--autocast", "off",
            "--mode", "joint", "--save-every", "2", "--log-every", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}

    def torchrun(out, *extra, kill=False):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               str(script), *args, "--out", str(out), *extra],
                              env={**env, "MTP_TEST_KILL": "1"} if kill else env, capture_output=True, text=True,
                              timeout=600)

    full = torchrun(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    assert full.stdout.count("heads: ") == 1, full.stdout  # one result line, rank 0's
    out = tmp_path / "killed"
    assert torchrun(out, kill=True).returncode != 0
    left = sorted(p.name.rsplit("-", 1)[0] for p in out.iterdir())
    assert left == [".checkpoint.old", ".checkpoint.tmp", "metrics.jsonl"], left  # no checkpoint/ in place
    resumed = torchrun(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference, got = heads_state(tmp_path / "full" / "heads"), heads_state(out / "heads")
    assert got.keys() == reference.keys() and all(torch.equal(got[n], reference[n]) for n in reference)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "heads", "metrics.jsonl"]
