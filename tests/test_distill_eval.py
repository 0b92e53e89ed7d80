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


@pytest.mark.parametrize("name", ["varied", "code-tasks", "prose-tasks"])
def test_wide_prompt_sets_keep_splits_apart(name):
    from mtp.prompts import builtin_prompts

    train_set, eval_set = builtin_prompts(name, "train"), builtin_prompts(name, "eval")
    assert len(train_set) > 500 and len(eval_set) > 100
    assert not set(train_set) & set(eval_set)
    assert train_set == builtin_prompts(name, "train")  # the same on every call (and machine: seeded by content)
    if name == "code-tasks":
        code = [p.split("```python\n", 1)[1] for p in train_set[:200] if "```python\n" in p]
        assert code and all(c.startswith("def ") for c in code)
        assert all("\n        return" not in c.split("\n", 1)[1][:9] for c in code)  # methods are dedented


def test_gather_prompts_drops_duplicates_and_interleaves(tmp_path):
    from mtp.training.distill import gather_prompts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    b.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Question  0", "other 1", "other 2", "other 2"]))
    pairs = gather_prompts([str(a), str(b)], "train", None, 0)
    assert [p for _, p in pairs].count("other 2") == 1 and "Question  0" not in [p for _, p in pairs]
    assert len(pairs) == 10
    sources = [s for s, _ in pairs]
    assert str(b) in sources[:5] and str(b) in sources[5:]  # both halves hold both sources


def test_distill_follow_ups_are_second_turns_and_resume(tiny_folder, tmp_path, monkeypatch):
    import mtp.training.distill as distill_module

    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0):
        calls.append(prompts)
        texts = [distill_module.chat_format(tokenizer, p) for p in prompts]
        return [(t, f"answer {len(calls)}.{i}" + (tokenizer.eos_token or ""), True) for i, t in enumerate(texts)]

    monkeypatch.setattr(distill_module, "generate_batch", fake_generate)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} please."}) + "\n" for w in ["one", "two", "three"]))
    out = tmp_path / "d.jsonl"
    cfg = dict(model=str(tiny_folder), prompts=[str(prompts)], out=str(out), max_new_tokens=8, batch_size=3,
               follow_ups=1.0, quiet=True)
    summary = distill(DistillConfig(**cfg))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == 3 and summary["records"] == 6 and len(rows) == 6
    for first, second in zip(rows[::2], rows[1::2]):
        assert "follow_up" not in first and second["prompt"] == first["prompt"]
        context = second["text"][: second["response_start"]]
        # the second answer is the only target; the first prompt, answer and the follow-up are its context
        assert first["prompt"] in context and second["follow_up"] in context
        assert first["response"].removesuffix("<eos>") in context or first["response"][:8] in context
        assert second["text"][second["response_start"]:] == second["response"]
        assert second["source"] == first["source"] == str(prompts)
    # resume: two first turns and one follow-up survived, the rest was cut mid-line
    partial = tmp_path / "d2.jsonl.partial"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + rows[3:4][0].__repr__()[:20])
    calls.clear()
    distill(DistillConfig(**{**cfg, "out": str(tmp_path / "d2.jsonl")}))
    resumed = [json.loads(line) for line in (tmp_path / "d2.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in resumed if "follow_up" not in r] == [r["prompt"] for r in rows[::2]]
    assert len(calls[0]) == 1  # only the third prompt was generated again


def test_interrupted_streaming_distillation_resumes_to_the_uninterrupted_result(tiny_folder, tmp_path, monkeypatch):
    """The llama.cpp path (one worker per slot, records in prompt order): killed mid-run, rerun with the same
    command, the file equals an uninterrupted run's, and no prompt is answered twice."""
    import threading

    import mtp.training.distill as distill_module

    sent, lock, fail_after = [], threading.Lock(), [None]

    class FakeServer:
        def __init__(self, model_name, tokenizer, slots, threads=None, target="packaged"):
            self.tokenizer = tokenizer

        def __call__(self, prompts, max_new_tokens, temperature=0.0):
            with lock:
                if fail_after[0] is not None and len(sent) >= fail_after[0]:
                    raise KeyboardInterrupt
                sent.extend(str(p) for p in prompts)
            out = []
            for p in prompts:
                text = distill_module.chat_format(self.tokenizer, p)
                last = p if isinstance(p, str) else p[-1]["content"]
                out.append((text, f"re: {last[:12]}" + self.tokenizer.eos_token, True))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(distill_module, "LlamaCppGenerator", FakeServer)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(40)))
    cfg = dict(model=str(tiny_folder), prompts=[str(prompts)], engine="llama.cpp", batch_size=4, follow_ups=0.5,
               max_new_tokens=8, quiet=True)
    distill(DistillConfig(**cfg, out=str(tmp_path / "full.jsonl")))
    fail_after[0] = 25
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(**cfg, out=str(tmp_path / "cut.jsonl")))
    assert (tmp_path / "cut.jsonl.partial").is_file() and not (tmp_path / "cut.jsonl").exists()
    fail_after[0], kept = None, len([line for line in (tmp_path / "cut.jsonl.partial").read_text().splitlines()
                                      if "follow_up" not in line])
    sent.clear()
    distill(DistillConfig(**cfg, out=str(tmp_path / "cut.jsonl")))
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert len([s for s in sent if s.startswith("question")]) == 40 - kept  # the rerun asks only what the file lacks
