"""mtp.io: atomic file and folder writes, permissions, the user cache path."""

import json
import os
import stat

import pytest
import torch

from mtp import io
from mtp.errors import UserError


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_json_text_bytes(tmp_path):
    io.write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})  # the parent is made
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "a" / "x.json").read_text().endswith("\n")
    io.write_json(tmp_path / "one.json", {"k": 1}, indent=None)
    assert (tmp_path / "one.json").read_text() == '{"k": 1}\n'
    io.write_text(tmp_path / "t.txt", "hello")
    io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert names(tmp_path) == ["a", "b.bin", "one.json", "t.txt"]  # no temporary files left


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    io.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_file(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            assert json.loads(path.read_text()) == {"v": 1}  # the old file stays until the new one is complete
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert names(tmp_path) == ["r.json"]
    with pytest.raises(TypeError):  # not serializable: fails before anything replaces the old file
        io.write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert names(tmp_path) == ["r.json"]


def test_atomic_file_keeps_the_suffix(tmp_path):
    with io.atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert names(tmp_path) == ["plot.png"]


def test_the_next_write_removes_what_a_killed_write_left(tmp_path):
    """A process killed mid-write (before its rename) leaves its temporary file; the next write of the same
    file removes it. Temporary files of live processes and of other files stay."""
    path = tmp_path / "r.json"
    io.write_json(path, {"v": 1})
    pid = os.fork()
    if pid == 0:  # the child: starts a write and dies as SIGKILL would, with no cleanup
        with io.atomic_file(path) as tmp:
            tmp.write_text('{"v": 2, "ha')
            os._exit(0)
    os.waitpid(pid, 0)
    left = [p.name for p in tmp_path.iterdir() if p.name != "r.json"]
    assert len(left) == 1 and left[0].startswith(f".r.json.tmp-{pid}-") and left[0].endswith(".json")
    live = tmp_path / f".r.json.tmp-{os.getppid()}-abc.json"  # a writer that is still running
    other = tmp_path / f".s.json.tmp-{pid}-abc.json"  # another file's: cleaned by that file's next write
    live.write_text("{")
    other.write_text("{")
    assert json.loads(path.read_text()) == {"v": 1}  # the kill left the old file whole
    io.write_json(path, {"v": 3})
    assert names(tmp_path) == sorted([live.name, other.name, "r.json"])
    assert json.loads(path.read_text()) == {"v": 3}


def test_written_files_are_shareable(tmp_path, umask_022):
    io.write_json(tmp_path / "x.json", {})
    io.write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})  # safetensors alone makes 0600
    for name in ("x.json", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    private = tmp_path / "p"
    private.write_text("")
    private.chmod(0o600)
    io.make_shareable(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o644


def test_write_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    io.write_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(3)}, metadata={"format": "pt"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.arange(3))
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_save_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    io.save_figure(fig, tmp_path / "sub" / "f.png")
    assert (tmp_path / "sub" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert names(tmp_path / "sub") == ["f.png"]
    assert not plt.fignum_exists(fig.number)


def test_append_line(tmp_path):
    io.append_line(tmp_path / "log.jsonl", '{"step": 1}')
    io.append_line(tmp_path / "log.jsonl", '{"step": 2}\n')
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_atomic_dir(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert names(tmp_path) == []  # nothing left behind
    with io.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert names(final) == ["a"]
    with pytest.raises(UserError, match="appeared while it was being written"):
        with io.atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
    assert names(final) == ["a"]
    with io.atomic_dir(final, keep_existing=True) as tmp:  # another process finished first: its copy stays
        (tmp / "b").write_text("2")
    assert names(final) == ["a"]
    with pytest.raises(RuntimeError):
        with io.atomic_dir(final, replace=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError
    assert names(final) == ["a"]  # replaced only by a complete folder
    with io.atomic_dir(final, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert names(final) == ["b"]
    assert names(tmp_path) == ["out"]
    (tmp_path / "empty").mkdir()  # an empty folder the user made for it
    with io.atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "c").write_text("3")
    assert names(tmp_path / "empty") == ["c"]


def test_scratch_dir(tmp_path):
    with io.scratch_dir(tmp_path / "work") as scratch:
        (scratch / "f").write_text("x")
        assert scratch.parent == tmp_path and scratch != tmp_path / "work"
    assert names(tmp_path) == []


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert io.cache_dir() == tmp_path / "c"
    assert io.cache_dir("models", "m") == tmp_path / "c" / "models" / "m"
    assert not (tmp_path / "c").exists()  # nothing is created
    monkeypatch.delenv("MTP_CACHE")
    assert io.cache_dir("verify") == tmp_path / "xdg" / "mtp" / "verify"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert io.cache_dir() == tmp_path / "home" / ".cache" / "mtp"
    monkeypatch.setenv("MTP_CACHE", "~/elsewhere")
    assert io.cache_dir() == tmp_path / "home" / "elsewhere"
