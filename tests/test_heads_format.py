"""mtp.heads_format: the one writer and reader of heads folders."""

import json
import os
import stat

import pytest
import torch

from mtp import heads_format as hf
from mtp.errors import UserError
from mtp.model.mtp import HeadsConfig, MTPModel
from tests.conftest import tiny_model


def write_sample(folder, **kw):
    weights = hf.HeadsWeights(heads={"0.w": torch.randn(3, 4), "0.b": torch.zeros(4)},
                              token_counts=torch.arange(8), **kw)
    hf.write_heads_folder(folder, {"backbone": "tiny", "n_heads": 1}, weights,
                          accuracy=hf.accuracy_record([[0.5, 0.25]], "code", 100, "mtp eval"))
    return weights


def test_write_then_read_is_equal(tmp_path):
    folder = tmp_path / "heads"
    weights = write_sample(folder, backbone={"lm_head.weight": torch.ones(2, 2)}, lora={"a.lora_A": torch.ones(1)})
    assert sorted(p.name for p in folder.iterdir()) == [hf.ACCURACY, hf.CONFIG, hf.WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads"]  # no temporary folder left
    assert hf.read_heads_config(folder) == {"mtp_format": hf.FORMAT_VERSION, "backbone": "tiny", "n_heads": 1}
    back = hf.load_heads_weights(folder)
    for part in ("heads", "backbone", "lora"):
        a, b = getattr(weights, part), getattr(back, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.token_counts, weights.token_counts) and back.token_counts.dtype == torch.int64
    assert hf.read_accuracy(folder) == [[0.5, 0.25]]
    assert json.loads((folder / hf.ACCURACY).read_text())["data"] == "code"


def test_dtype_casts_floats_only(tmp_path):
    hf.write_heads_folder(tmp_path / "h", {}, hf.HeadsWeights(heads={"w": torch.randn(2)},
                                                              token_counts=torch.arange(3)), dtype=torch.bfloat16)
    back = hf.load_heads_weights(tmp_path / "h")
    assert back.heads["w"].dtype == torch.bfloat16 and back.token_counts.dtype == torch.int64


def test_a_new_folder_replaces_the_old_one_only_when_complete(tmp_path):
    folder = tmp_path / "heads"
    write_sample(folder)
    bad = hf.HeadsWeights(heads={"w": object()})  # not a tensor: fails while writing
    with pytest.raises(Exception):
        hf.write_heads_folder(folder, {"backbone": "other"}, bad)
    assert hf.read_heads_config(folder)["backbone"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads"]
    hf.write_heads_folder(folder, {"backbone": "new"}, hf.HeadsWeights(heads={"w": torch.ones(1)}))
    assert hf.read_heads_config(folder)["backbone"] == "new"
    assert hf.read_accuracy(folder) is None and hf.load_heads_weights(folder).token_counts is None


def test_write_accuracy_keeps_the_rest(tmp_path, monkeypatch):
    folder = tmp_path / "heads"
    write_sample(folder)
    weights = (folder / hf.WEIGHTS).read_bytes()
    path = hf.write_accuracy(folder, [[0.9], [0.3]], "prose", 50, "mtp pretrain")
    assert path == folder / hf.ACCURACY
    assert hf.read_accuracy(folder) == [[0.9], [0.3]]
    assert (folder / hf.WEIGHTS).read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == [hf.ACCURACY, hf.CONFIG, hf.WEIGHTS]


def test_missing_accuracy_is_none(tmp_path):
    """No accuracy.json: decoding falls back to its prior (a present but invalid one: tests/test_bad_files.py)."""
    from mtp.decode.methods import rank_accuracy

    folder = tmp_path / "heads"
    write_sample(folder)
    (folder / hf.ACCURACY).unlink()
    assert hf.read_accuracy(folder) is None and hf.read_accuracy(None) is None
    prior = rank_accuracy(folder, 2)
    assert len(prior) == 2 and prior[0][0] == pytest.approx(0.6) and prior[1][0] == pytest.approx(0.3)


def test_rank_accuracy_of_fewer_heads_is_kept(tmp_path):
    from mtp.decode.methods import rank_accuracy

    hf.write_accuracy(tmp_path, [[0.5], [0.4]], "code", 10, "")
    assert rank_accuracy(tmp_path, 3) == [[0.5], [0.4]]
    with pytest.raises(UserError, match="has 2 heads but the heads folder has 1"):
        rank_accuracy(tmp_path, 1)


def test_bad_folders_are_clean_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.read_heads_config(tmp_path / "nope")
    folder = tmp_path / "heads"
    write_sample(folder)
    (folder / hf.WEIGHTS).write_bytes((folder / hf.WEIGHTS).read_bytes()[:40])
    with pytest.raises(UserError, match="truncated or corrupt"):
        hf.load_heads_weights(folder)
    (folder / hf.CONFIG).write_text('{"mtp_format": 99}')
    with pytest.raises(UserError, match="not an mtp heads config"):
        hf.read_heads_config(folder)
    (folder / hf.CONFIG).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        hf.read_heads_config(folder)
    (folder / hf.WEIGHTS).unlink()
    with pytest.raises(UserError, match=f"no {hf.WEIGHTS}"):
        hf.read_heads_config(folder)


def test_model_round_trip_through_the_format(tmp_path):
    backbone = tiny_model("llama", vocab=64)
    model = MTPModel(backbone, HeadsConfig(backbone="tiny", n_heads=2))
    model.token_counts = torch.arange(64)
    model.save_pretrained(tmp_path / "heads")
    meta = hf.read_heads_config(tmp_path / "heads")
    assert meta["n_heads"] == 2 and meta["kind"] == "mlp" and "backbone_fingerprint" in meta
    weights = hf.load_heads_weights(tmp_path / "heads")
    assert weights.heads.keys() == model.heads.state_dict().keys()
    assert weights.backbone == {} and weights.lora == {}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "heads" / hf.WEIGHTS).stat().st_mode) == 0o666 & ~umask  # shareable
    again = MTPModel.from_pretrained(tmp_path / "heads", backbone=backbone)
    assert torch.equal(again.token_counts, torch.arange(64))


def test_shipped_heads_read():
    for spec in hf.SHIPPED:
        folder = hf.resolve_heads(spec, "smollm2-135m")
        assert folder.parent == hf.DEFAULT_HEADS_DIR
        assert hf.read_heads_config(folder)["backbone"] == "smollm2-135m"
        acc = hf.read_accuracy(folder)
        assert acc and all(0 <= x <= 1 for row in acc for x in row)
    with pytest.raises(UserError, match="no default heads ship"):
        hf.resolve_heads("default", "not-a-model")
