import json

import pytest

from mtp.config import DistillConfig
from mtp.cli import main
from mtp.config import TrainConfig
from mtp.data import load_corpus, packed_blocks
from mtp.training.distill import distill
from mtp.errors import UserError
from mtp.prompts import load_prompts
from mtp.training.train import train
from tests.conftest import SAMPLE_TEXT, char_tokenizer


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))


def test_builtin_prompt_sets_keep_splits_apart():
    train_code, eval_code = load_prompts("code", "train"), load_prompts("code", "eval")
    assert len(train_code) > 100 and len(eval_code) > 10
    assert not set(train_code) & set(eval_code)
    assert all(p.startswith("Write a Python function `") for p in train_code[:20])
    chat = load_prompts("chat", "train", limit=10, seed=1)
    assert len(chat) == 10 and chat == load_prompts("chat", "train", limit=10, seed=1)


def test_code_prefix_prompts_are_raw_code_from_held_out_files():
    train, held_out = load_prompts("code-prefix", "train"), load_prompts("code-prefix", "eval")
    assert len(held_out) > 50 and not set(train) & set(held_out)
    for p in held_out[:30]:
        assert p.startswith(("def ", "class ")) and p.endswith("\n") and len(p) >= 200
        assert len(p) <= 400 or p.count("\n") == 1  # a first line longer than the budget is kept whole


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match="line 2"):
        load_prompts(str(bad))
    with pytest.raises(UserError, match="unknown prompt set"):
        load_prompts("poems")


def test_distill_then_train_on_responses_only(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} please."}) + "\n" for w in ["one", "two", "three"]))
    out = tmp_path / "distilled.jsonl"
    summary = distill(DistillConfig(model=str(tiny_folder), prompts=[str(prompts)], out=str(out), max_new_tokens=12,
                                   batch_size=2, quiet=True))
    assert summary["prompts"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["text"][: row["response_start"]].endswith(row["prompt"])  # no chat template: the prompt as is
        assert row["text"][row["response_start"]:] == row["response"]
    with pytest.raises(UserError, match="already exists"):
        distill(DistillConfig(model=str(tiny_folder), prompts=[str(prompts)], out=str(out), quiet=True))
    # Only response tokens are targets.
    tok = char_tokenizer()
    blocks, mask = packed_blocks([str(out)], tok, 8)
    doc = load_corpus(str(out)).documents[0]
    assert doc.spans == [(rows[0]["response_start"], len(rows[0]["text"]))]
    assert 0 < mask.float().mean() < 1
    train(TrainConfig(model=str(tiny_folder), out=str(tmp_path / "run"), heads=1, data=[str(out)], seq_len=8,
                      batch_size=2, max_steps=2, autocast="off"), progress=False)
    assert (tmp_path / "run" / "heads" / "model.safetensors").is_file()


def test_eval_command(tiny_folder, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT * 5)
    train(TrainConfig(model=str(tiny_folder), out=str(tmp_path / "run"), heads=3, data=[str(text)], seq_len=24,
                      batch_size=2, max_steps=2, autocast="off"), progress=False)
    js = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_folder), "--heads", str(tmp_path / "run" / "heads"), "--text",
                 str(text), "--context", "16", "--max-positions", "10", "--max-candidates", "4", "--json", str(js),
                 "--write-accuracy", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "| 1 | x_(t+2) |" in out
    result = json.loads(js.read_text())
    rows = result["heads"]
    assert [r["head"] for r in rows] == [0, 1, 2, 3] and result["positions"] == 10
    assert "marginal_top1" in rows[1] and "marginal_top1" in rows[2] and "marginal_top1" not in rows[3]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in rows)
    acc = json.loads((tmp_path / "run" / "heads" / "accuracy.json").read_text())["rank_accuracy"]
    assert len(acc) == 3 and all(len(a) == 10 for a in acc)
    assert [round(a[0], 5) for a in acc] == [round(r["top1"], 5) for r in rows[1:]]


def test_eval_bad_heads(tiny_folder, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_folder), "--heads", str(tmp_path / "none"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err
    code = main(["eval", "--model", str(tiny_folder), "--heads", "default", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no default heads" in err


def test_compare_eval_results(tmp_path, capsys):
    def result(acc, marginal=False):
        heads = [{"head": k, "predicts": f"x_(t+{k + 1})", "top1": a, "top5": min(1, a + 0.2)} for k, a in
                 enumerate(acc)]
        if marginal:
            heads[1].update(marginal_top1=0.4, marginal_top5=0.6)
        return {"data": "code", "positions": 10, "heads": heads}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result([0.6, 0.3, 0.2], marginal=True)))
    b.write_text(json.dumps(result([0.6, 0.35, 0.25])))
    code = main(["compare", f"mlp={a}", f"transformer={b}", "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code == 0 and "| mlp | 0.600 / 0.800" in out and "marginalization" in out
    assert (tmp_path / "p.png").stat().st_size > 0
    code = main(["compare", f"x={tmp_path / 'missing.json'}"])
    assert code == 2 and "missing.json does not exist" in capsys.readouterr().err


def test_eval_windows_fit_a_short_model_context(tiny_folder, monkeypatch):
    """eval's windows reach back up to 1024 tokens, never past the model's context (the tiny model's is 512)."""
    from transformers import AutoModelForCausalLM

    import mtp.training.evaluate as ev
    from mtp.data import Corpus, Document
    from mtp.model.mtp import HeadsConfig, MTPModel

    backbone = AutoModelForCausalLM.from_pretrained(tiny_folder, local_files_only=True)
    model = MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2))
    lengths, real = [], ev.head_predictions

    def spy(m, ids, pos, top):
        lengths.append(len(ids))
        return real(m, ids, pos, top)
    monkeypatch.setattr(ev, "head_predictions", spy)
    corpus = Corpus("long", [Document("d", SAMPLE_TEXT * 30)])
    result = ev.evaluate_heads(model, char_tokenizer(), corpus, context=16, max_positions=160, per_window=16, seed=0,
                               marginal=False, max_candidates=4, progress=False)
    assert result["positions"] == 160 and len(lengths) == 10
    assert max(lengths) <= 512 and max(lengths) > 400  # as far back as the context allows
