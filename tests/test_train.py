import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mtp.cli import main
from mtp.config import TrainConfig
from mtp.errors import UserError
from mtp.model.mtp import MTPModel
from mtp.training.train import train
from tests.conftest import crash_optimizer_at


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))


def config(tiny_folder, corpus_file, out, **kw):
    base = dict(model=str(tiny_folder), out=str(out), heads=2, data=[str(corpus_file)], seq_len=24, batch_size=4,
                max_steps=6, lr=1e-2, backbone_lr=1e-3, warmup_steps=2, save_every=3, log_every=1, autocast="off",
                lora_r=4)
    base.update(kw)
    return TrainConfig(**base)


def heads_state(folder):
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def test_training_lowers_every_head_loss(tiny_folder, corpus_file, tmp_path):
    train(config(tiny_folder, corpus_file, tmp_path / "run", max_steps=25, lr=3e-2), progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 25 and logs[-1]["step"] == 25
    first, last = logs[0]["losses"], logs[-1]["losses"]
    assert all(b < a for a, b in zip(first[1:], last[1:]))  # every MTP head improves
    assert logs[-1]["tokens_per_s"] > 0


@pytest.mark.parametrize("mode", ["frozen", "lora", "joint"])
def test_resume_after_crash_equals_uninterrupted(tiny_folder, corpus_file, tmp_path, monkeypatch, mode):
    train(config(tiny_folder, corpus_file, tmp_path / "full", mode=mode), progress=False)

    restore = crash_optimizer_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tiny_folder, corpus_file, tmp_path / "crash", mode=mode), progress=False)
    restore()
    meta = json.loads((tmp_path / "crash" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 3  # the checkpoint before the crash is intact
    train(config(tiny_folder, corpus_file, tmp_path / "crash", mode=mode, resume=True), progress=False)
    a, b = heads_state(tmp_path / "full" / "heads"), heads_state(tmp_path / "crash" / "heads")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [json.loads(line)["step"] for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert logs == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("extra", [dict(heads=3, cache_hidden=True, eagle_layers="auto"), dict(heads=2, draft_vocab=64),
                                   dict(heads=2, cache_hidden=True, draft_loss="soft", draft_init="target")])
def test_eagle3_resume_after_crash_equals_uninterrupted(tiny_folder, corpus_file, tmp_path, monkeypatch, extra):
    train(config(tiny_folder, corpus_file, tmp_path / "full", kind="eagle3", **extra), progress=False)
    restore = crash_optimizer_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tiny_folder, corpus_file, tmp_path / "crash", kind="eagle3", **extra), progress=False)
    restore()
    train(config(tiny_folder, corpus_file, tmp_path / "crash", kind="eagle3", resume=True, **extra), progress=False)
    a, b = heads_state(tmp_path / "full" / "heads"), heads_state(tmp_path / "crash" / "heads")
    assert a.keys() == b.keys() and "heads.0.d2t" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    meta = json.loads((tmp_path / "full" / "heads" / "config.json").read_text())
    assert meta["kind"] == "eagle3" and len(meta["eagle_layers"]) == 3
    assert meta["draft_vocab"] == a["heads.0.lm_head.weight"].shape[0] == extra.get("draft_vocab", 128)
    logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logs)  # no NaN in the log when head 0 is not computed


def test_eagle3_training_refuses_joint_modes(tiny_folder, corpus_file, tmp_path):
    for mode in ("joint", "lora"):
        with pytest.raises(UserError, match="frozen"):
            config(tiny_folder, corpus_file, tmp_path / "x", kind="eagle3", mode=mode)


def test_lora_heads_round_trip(tiny_folder, corpus_file, tmp_path):
    train(config(tiny_folder, corpus_file, tmp_path / "run", mode="lora", max_steps=3), progress=False)
    cfg = json.loads((tmp_path / "run" / "heads" / "config.json").read_text())
    assert cfg["trained_backbone"] == "lora" and cfg["lora"]["r"] == 4
    model = MTPModel.from_pretrained(tmp_path / "run" / "heads")
    again = MTPModel.from_pretrained(tmp_path / "run" / "heads")
    ids = torch.randint(4, 100, (1, 10))
    assert torch.equal(model(ids), again(ids))
    state = heads_state(tmp_path / "run" / "heads")
    assert any(k.startswith("lora.") for k in state) and not any(k.startswith("backbone.") for k in state)


@pytest.mark.parametrize("extra", [{}, dict(kind="eagle3", draft_loss="soft")])  # soft: the final state cached too
def test_hidden_cache_matches_live_backbone(tiny_folder, corpus_file, tmp_path, extra):
    train(config(tiny_folder, corpus_file, tmp_path / "live", **extra), progress=False)
    train(config(tiny_folder, corpus_file, tmp_path / "cached", cache_hidden=True, **extra), progress=False)
    a, b = heads_state(tmp_path / "live" / "heads"), heads_state(tmp_path / "cached" / "heads")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("mode", ["frozen", "lora", "joint"])  # joint shards the backbone with FSDP
def test_two_process_gloo_equals_single_process(tiny_folder, corpus_file, tmp_path, mode):
    args = ["train", "--model", str(tiny_folder), "--data", str(corpus_file), "--heads", "2", "--seq-len", "24",
            "--batch-size", "4", "--max-steps", "4", "--lr", "0.01", "--warmup-steps", "1", "--autocast", "off",
            "--mode", mode, "--lora-r", "4", "--save-every", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "mtp", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--standalone", "-m", "mtp", *args, "--out", str(tmp_path / "two")], env=env,
                           capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a, b = heads_state(tmp_path / "one" / "heads"), heads_state(tmp_path / "two" / "heads")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    # The checkpoint of the 2-process run resumes in one process (same optimizer layout).
    resumed = subprocess.run([sys.executable, "-m", "mtp", *args, "--out", str(tmp_path / "two"), "--resume",
                              "--max-steps", "5"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "checkpoint" / "trainer.json").read_text())["step"] == 5


@pytest.mark.parametrize("overrides,message", [
    (dict(heads=0), "--heads must be at least 1"),
    (dict(max_steps=0), "--max-steps must be at least 1"),
    (dict(lr=-1.0), "--lr must be positive"),
    (dict(backbone_lr=0.0), "--backbone-lr must be positive"),
    (dict(kind="lstm"), "unknown --kind"),
    (dict(mode="half"), "unknown --mode"),
    (dict(cache_hidden=True, mode="lora"), "--cache-hidden needs --mode frozen"),
])
def test_bad_training_configs(tiny_folder, corpus_file, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(config(tiny_folder, corpus_file, tmp_path / "run", **overrides), progress=False)


def test_bad_runs(tiny_folder, corpus_file, tmp_path, capsys):
    with pytest.raises(UserError, match="no run in"):
        train(config(tiny_folder, corpus_file, tmp_path / "run", resume=True), progress=False)
    with pytest.raises(UserError, match="unknown tap"):
        train(config(tiny_folder, corpus_file, tmp_path / "run0", tap="middle"), progress=False)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words")
    with pytest.raises(UserError, match="fewer than one sequence"):
        train(config(tiny_folder, tiny, tmp_path / "run1"), progress=False)
    train(config(tiny_folder, corpus_file, tmp_path / "run2", max_steps=3), progress=False)
    before = heads_state(tmp_path / "run2" / "checkpoint" / "heads")
    with pytest.raises(UserError, match="already holds a run .*pass --resume"):
        train(config(tiny_folder, corpus_file, tmp_path / "run2", max_steps=3, lr=0.5), progress=False)
    with pytest.raises(UserError, match="seq_len"):
        train(config(tiny_folder, corpus_file, tmp_path / "run2", max_steps=6, seq_len=20, resume=True),
              progress=False)
    after = heads_state(tmp_path / "run2" / "checkpoint" / "heads")
    assert all(torch.equal(before[k], after[k]) for k in before)  # never overwritten by a failed run
    capsys.readouterr()
    code = main(["train", "--model", str(tiny_folder), "--data", str(corpus_file), "--heads", "-1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("mtp: error:") and err.strip().count("\n") == 0


def test_bench_train_memory_runs_both_orders(tiny_folder, tmp_path, capsys):
    js = tmp_path / "mem.json"
    code = main(["bench", "train-memory", "--model", str(tiny_folder), "--heads", "2", "--batch-size", "2",
                 "--seq-len", "16", "--repeats", "3", "--json", str(js), "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(js.read_text())
    assert_train_memory_figures_consistent(r, repeats=3)
    assert "memory ratio" in capsys.readouterr().out


def assert_train_memory_figures_consistent(r, repeats):
    """The figures a train-memory report gives agree with one another (not just that they exist)."""
    import statistics
    for order in ("efficient", "naive"):
        v = r[order]
        assert v["order"] == order and v["peak_bytes"] > 0  # a step allocates: a measured peak is never 0
        assert len(v["times"]) == repeats and all(t > 0 for t in v["times"])
        assert v["median_step_seconds"] == statistics.median(v["times"])
    eff, naive = r["efficient"], r["naive"]
    assert r["memory_ratio"] == pytest.approx(eff["peak_bytes"] / naive["peak_bytes"], rel=1e-12)
    assert r["time_ratio"] == pytest.approx(eff["median_step_seconds"] / naive["median_step_seconds"], rel=1e-12)


def test_bf16_backbone_trains_float32_heads(tiny_folder, corpus_file, tmp_path):
    """Heads on a bf16 backbone keep float32 master weights (bf16 weights would drop small updates) and
    reload onto a bf16 backbone for inference."""
    train(config(tiny_folder, corpus_file, tmp_path / "run", dtype="bfloat16", max_steps=4, lr=1e-4,
                 autocast="on"), progress=False)
    state = heads_state(tmp_path / "run" / "heads")
    assert state.pop("token_counts").dtype == torch.int64
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("weight"))  # zero init moved
    model = MTPModel.from_pretrained(tmp_path / "run" / "heads", dtype="bfloat16")
    logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_save_dtype_halves_the_heads_file(tiny_folder, corpus_file, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_folder), "--data", str(corpus_file), "--heads", "2", "--seq-len", "24",
                 "--batch-size", "4", "--max-steps", "2", "--save-dtype", "bfloat16", "--autocast", "off",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    state = heads_state(tmp_path / "run" / "heads")
    counts = state.pop("token_counts")  # how often each token was a target: integers, kept exact
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert counts.dtype == torch.int64 and counts.sum() > 0
    model = MTPModel.from_pretrained(tmp_path / "run" / "heads")  # loads onto the float32 backbone
    assert next(model.heads.parameters()).dtype == torch.float32
    assert torch.equal(model.token_counts, counts)


def test_whs_weighting_has_its_own_learning_rate(tiny_folder, corpus_file, tmp_path):
    """The WHS softmax logits train at --whs-lr: a large one moves the weighting, a tiny one leaves it."""
    from mtp.model.heads import whs_init

    moved = {}
    for name, whs_lr in (("slow", 1e-6), ("fast", 0.1)):
        train(config(tiny_folder, corpus_file, tmp_path / name, tap="whs", whs_lr=whs_lr), progress=False)
        state = heads_state(tmp_path / name / "heads")
        whs = [v for k, v in state.items() if k.endswith(".whs")]
        assert whs
        moved[name] = max(float((w - whs_init(w.numel())).abs().max()) for w in whs)
    assert moved["slow"] < 1e-4 < 0.05 < moved["fast"]


def test_resume_accepts_a_checkpoint_from_before_whs_lr(tiny_folder, corpus_file, tmp_path):
    """Checkpoints written before --whs-lr existed resume, unless the run reads WHS (where it matters)."""
    for tap in ("last", "whs"):
        out = tmp_path / tap
        train(config(tiny_folder, corpus_file, out, tap=tap, max_steps=3), progress=False)
        meta_path = out / "checkpoint" / "trainer.json"
        meta = json.loads(meta_path.read_text())
        del meta["config"]["whs_lr"]
        meta_path.write_text(json.dumps(meta))
        resumed = config(tiny_folder, corpus_file, out, tap=tap, max_steps=6, resume=True)
        if tap == "last":
            train(resumed, progress=False)
            assert json.loads(meta_path.read_text())["step"] == 6
        else:
            with pytest.raises(UserError, match="whs_lr"):
                train(resumed, progress=False)


def test_resume_accepts_an_eagle3_checkpoint_from_before_draft_init_and_loss(tiny_folder, corpus_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_folder, corpus_file, out, kind="eagle3", max_steps=3), progress=False)
    meta_path = out / "checkpoint" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["draft_init"], meta["config"]["draft_loss"]
    meta_path.write_text(json.dumps(meta))
    train(config(tiny_folder, corpus_file, out, kind="eagle3", max_steps=6, resume=True), progress=False)
    assert json.loads(meta_path.read_text())["step"] == 6
    with pytest.raises(UserError, match="draft_loss"):
        train(config(tiny_folder, corpus_file, out, kind="eagle3", max_steps=8, resume=True, draft_loss="soft"),
              progress=False)


def test_heldout_evaluation_logs_a_learning_curve(tiny_folder, tmp_path):
    """--eval-data: held-out loss, top-1 and chain acceptance per draft step in metrics.jsonl, at every
    --eval-every steps, at powers of two from 16 and at the last step; the chain figures agree with mtp eval's."""
    import json

    from mtp.config import TrainConfig
    from tests.conftest import SAMPLE_TEXT

    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 20)
    held = tmp_path / "h.txt"
    held.write_text(SAMPLE_TEXT[::-1] * 5)
    train(TrainConfig(model=str(tiny_folder), out=str(tmp_path / "run"), heads=3, kind="eagle3", data=[str(text)],
                      seq_len=16, batch_size=2, max_steps=20, eval_data=[str(held)], eval_every=6, eval_blocks=4,
                      autocast="off", draft_init="target", lr=1e-2, warmup_steps=2), progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval" in e]
    assert [e["step"] for e in evals] == [6, 12, 16, 18, 20]
    for e in evals:
        s = e["eval"]
        assert len(s["loss"]) == len(s["top1"]) == len(s["accepted"]) == 3 and s["positions"] > 0
        assert s["accepted"] == sorted(s["accepted"], reverse=True)
        assert s["tau"] == pytest.approx(1 + sum(s["accepted"]), abs=1e-3)
    assert evals[-1]["eval"]["loss"][0] < evals[0]["eval"]["loss"][0]  # it learns, and the log shows it


def test_chain_acceptance_counts_prefixes():
    import torch

    from mtp.training.evaluate import chain_acceptance

    hits = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)  # (steps, positions)
    c = chain_acceptance(hits)
    assert c["accepted"] == [0.75, 0.5, 0.25] and c["tau"] == pytest.approx(2.5)
