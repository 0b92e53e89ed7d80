"""Pretraining from scratch and Meta's multi-token checkpoint layout, on tiny models."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mtp.cli import main
from mtp.convert import convert_meta, unpermute_rotary
from mtp.errors import UserError
from mtp.model.mtp import MTPModel
from mtp.training.pretrain import PRESETS, Preset, PretrainConfig, byte_tokenizer, pretrain, train_bpe, trunk_config
from tests.conftest import SAMPLE_TEXT, crash_optimizer_at

MICRO = Preset(hidden=32, layers=5, attention_heads=4, kv_heads=2, intermediate=64, seq_len=32, batch_size=4,
               lr=3e-3, max_steps=30, warmup_steps=3, bpe_vocab=300, context=256)


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text(SAMPLE_TEXT * 60)
    return path


def cfg(corpus, out, **kw):
    base = dict(preset="micro", heads=3, tokenizer="bytes", data=(str(corpus),), out=str(out), max_steps=30,
                eval_tokens=512, save_every=10, log_every=1, autocast="off")
    base.update(kw)
    return PretrainConfig(**base)


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "déjà vu — 東京 \t\n def f(x): return x**2 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 258 and len(tok) == 259


def test_bpe_tokenizer_learns_merges():
    tok = train_bpe(iter([SAMPLE_TEXT * 20]), 300)
    ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(SAMPLE_TEXT.encode()) and tok.decode(ids) == SAMPLE_TEXT


@pytest.mark.parametrize("n", [1, 2, 4])
def test_parameter_matched_presets(n):
    from transformers import LlamaForCausalLM

    from mtp.model.mtp import HeadsConfig
    tok = byte_tokenizer()
    counts = {}
    for heads in (1, n):
        config = trunk_config(MICRO, heads, len(tok), 32, tok)
        model = MTPModel(LlamaForCausalLM(config), HeadsConfig(backbone="x", n_heads=heads - 1, kind="transformer",
                                                               tap=f"layer:{config.num_hidden_layers - 1}",
                                                               init_from_last=False))
        counts[heads] = sum(p.numel() for p in model.parameters())
    assert abs(counts[n] - counts[1]) / counts[1] < 0.01


def test_tiny_pretraining_lowers_every_head_loss(corpus, tmp_path):
    result = pretrain(cfg(corpus, tmp_path / "run"), progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" in r for r in logs) and len(logs) == 30
    first, last = logs[0]["losses"], logs[-1]["losses"]
    assert len(first) == 3 and all(b < a - 0.3 for a, b in zip(first, last))
    assert [h["head"] for h in result["heads"]] == [0, 1, 2]
    assert result["heads"][0]["loss"] < 4.0  # far below ln(259) = 5.56 of a uniform guess
    # per-rank accuracies of the extra heads beside them: decoding sizes its drafts from them
    acc = json.loads((tmp_path / "run" / "heads" / "accuracy.json").read_text())["rank_accuracy"]
    assert len(acc) == 2 and all(len(r) == 10 for r in acc)
    assert [r[0] for r in acc] == pytest.approx([h["top1"] for h in result["heads"][1:]], abs=1e-4)
    # the trained model decodes with its own heads, identically to plain greedy
    from mtp.decode.engine import SpeculativeDecoder
    from mtp.decode.proposers import PlainProposer, blockwise
    model = MTPModel.from_pretrained(tmp_path / "run" / "heads")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "init")
    prompt = [tok("def mean(values):\n", add_special_tokens=False)["input_ids"]]
    plain = SpeculativeDecoder(model.backbone, tok, proposer=PlainProposer()).generate(prompt, 24, [])
    spec = SpeculativeDecoder(model.backbone, tok, mtp_model=model, proposer=blockwise(2)).generate(prompt, 24, [])
    assert spec.rows[0].tokens == plain.rows[0].tokens


def test_pretrain_resume_equals_uninterrupted(corpus, tmp_path, monkeypatch):
    pretrain(cfg(corpus, tmp_path / "full", max_steps=12, save_every=6), progress=False)
    restore = crash_optimizer_at(monkeypatch, 9)
    with pytest.raises(RuntimeError):
        pretrain(cfg(corpus, tmp_path / "crash", max_steps=12, save_every=6), progress=False)
    restore()
    pretrain(cfg(corpus, tmp_path / "crash", max_steps=12, save_every=6, resume=True), progress=False)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "full" / "heads" / "model.safetensors")
    b = load_file(tmp_path / "crash" / "heads" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_equals_single_process(corpus, tmp_path):
    """torchrun-style 2 CPU processes (gloo, FSDP over the trunk's layers) end where 1 process ends."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from mtp.training.pretrain import PRESETS, Preset, PretrainConfig, pretrain\n"
        f"PRESETS['micro'] = Preset(**{MICRO.__dict__!r})\n"
        f"pretrain(PretrainConfig(preset='micro', heads=3, tokenizer='bytes', data=({str(corpus)!r},), out=sys.argv[1],"
        " max_steps=4, eval_tokens=256, save_every=4, log_every=1, autocast='off'), progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "one" / "heads" / "model.safetensors")
    b = load_file(tmp_path / "two" / "heads" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_pretrain_bad_input(corpus, tmp_path, capsys):
    def err(args):
        code = main(args)
        e = capsys.readouterr().err
        assert code == 2 and e.count("\n") == 1 and "Traceback" not in e, e
        return e
    base = ["pretrain", "--data", str(corpus), "--quiet"]
    assert "unknown preset" in err(base + ["--preset", "huge", "--out", str(tmp_path / "a")])
    assert "--heads" in err(base + ["--preset", "micro", "--heads", "0", "--out", str(tmp_path / "b")])
    assert "context" in err(base + ["--preset", "micro", "--seq-len", "100000", "--out", str(tmp_path / "c")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert err(["pretrain", "--preset", "micro", "--data", str(empty), "--out", str(tmp_path / "d"), "--quiet"])
    assert not (tmp_path / "d").exists()  # a failed fresh run leaves nothing behind
    assert "resume" in err(base + ["--preset", "micro", "--resume", "--out", str(tmp_path / "e")])


# ----------------------------------------------------------------------------- Meta's layout


def meta_reference_logits(state, params, tokens):
    """Meta's multi-token Llama forward, written out: interleaved (complex) rotary embeddings, trunk =
    layers[:-1], prediction heads = [layers[-1]] + extra_heads on the trunk output, shared norm + output."""
    dim, nh, nkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd = dim // nh
    eps, theta = params["norm_eps"], params["rope_theta"]
    t = tokens.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[: hd // 2] / hd))
    cis = torch.polar(torch.ones(t, hd // 2, dtype=torch.float64), torch.outer(torch.arange(t, dtype=torch.float64),
                                                                             freqs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    def block(x, p):
        h = norm(x, p["attention_norm.weight"])
        q = (h @ p["attention.wq.weight"].T).view(1, t, nh, hd)
        k = (h @ p["attention.wk.weight"].T).view(1, t, nkv, hd)
        v = (h @ p["attention.wv.weight"].T).view(1, t, nkv, hd)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 2), v.repeat_interleave(nh // nkv, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5
        scores = scores + torch.full((t, t), float("-inf"), dtype=scores.dtype).triu(1)
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, t, dim)
        x = x + att @ p["attention.wo.weight"].T
        h = norm(x, p["ffn_norm.weight"])
        ff = torch.nn.functional.silu(h @ p["feed_forward.w1.weight"].T) * (h @ p["feed_forward.w3.weight"].T)
        return x + ff @ p["feed_forward.w2.weight"].T

    def layer(prefix, i):
        return {k[len(f"{prefix}.{i}."):]: v for k, v in state.items() if k.startswith(f"{prefix}.{i}.")}

    n_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    n_extra = len({k.split(".")[1] for k in state if k.startswith("extra_heads.")})
    x = state["tok_embeddings.weight"][tokens]
    for i in range(n_layers - 1):
        x = block(x, layer("layers", i))
    heads = [layer("layers", n_layers - 1)] + [layer("extra_heads", j) for j in range(n_extra)]
    return [norm(block(x, p), state["norm.weight"]) @ state["output.weight"].T for p in heads]


def write_meta_checkpoint(folder, n_future=3, dim=32, n_heads=4, n_kv=2, layers=3, vocab=50, inter=48, seed=0,
                          fmt="pth"):
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def layer_state():
        return {"attention.wq.weight": w(n_heads * hd, dim), "attention.wk.weight": w(n_kv * hd, dim),
                "attention.wv.weight": w(n_kv * hd, dim), "attention.wo.weight": w(dim, n_heads * hd),
                "feed_forward.w1.weight": w(inter, dim), "feed_forward.w3.weight": w(inter, dim),
                "feed_forward.w2.weight": w(dim, inter), "attention_norm.weight": 1 + w(dim, scale=0.1),
                "ffn_norm.weight": 1 + w(dim, scale=0.1)}

    state = {"tok_embeddings.weight": w(vocab, dim, scale=1.0), "norm.weight": 1 + w(dim, scale=0.1),
             "output.weight": w(vocab, dim)}
    for i in range(layers):
        state.update({f"layers.{i}.{k}": v for k, v in layer_state().items()})
    for j in range(n_future - 1):
        state.update({f"extra_heads.{j}.{k}": v for k, v in layer_state().items()})
    params = {"dim": dim, "n_layers": layers + n_future - 1, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": vocab, "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 10000.0,
              "n_future_tokens": n_future}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    if fmt == "pth":
        torch.save(state, folder / "consolidated.00.pth")
    else:
        from safetensors.torch import save_file
        save_file(state, folder / "consolidated.safetensors")
    return state, params


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_meta_layout_gives_identical_logits_per_head(tmp_path, fmt):
    state, params = write_meta_checkpoint(tmp_path / "meta", fmt=fmt)
    heads_dir = convert_meta(tmp_path / "meta", tmp_path / "out", dtype="float64")
    with pytest.raises(UserError, match="already holds a conversion.*--overwrite"):
        convert_meta(tmp_path / "meta", tmp_path / "out", dtype="float64")
    heads_dir = convert_meta(tmp_path / "meta", tmp_path / "out", dtype="float64", overwrite=True)
    model = MTPModel.from_pretrained(heads_dir, dtype="float64")
    tokens = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7]])
    ours = model(tokens)  # (K, B, T, V)
    ref = meta_reference_logits(state, params, tokens)
    assert ours.shape[0] == 3
    for k in range(3):  # transformers' RMSNorm and rotary tables work in float32: ~1e-7 apart, not 1e-15
        assert torch.allclose(ours[k], ref[k], atol=1e-5), k
        assert (ours[k].argmax(-1) == ref[k].argmax(-1)).all()
    # and the engine decodes with the converted heads, identically to plain greedy
    from mtp.decode.engine import SpeculativeDecoder
    from mtp.decode.proposers import PlainProposer, blockwise

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=False):
            return ""
    plain = SpeculativeDecoder(model.backbone, Tok(), proposer=PlainProposer()).generate([[3, 14, 15]], 16, [])
    spec = SpeculativeDecoder(model.backbone, Tok(), mtp_model=model, proposer=blockwise(2)).generate([[3, 14, 15]], 16, [])
    assert spec.rows[0].tokens == plain.rows[0].tokens


def test_a_conversion_that_fails_leaves_no_backbone(tmp_path, monkeypatch):
    """The heads' save fails (disk full): a fresh conversion leaves nothing; an --overwrite keeps the old one."""
    write_meta_checkpoint(tmp_path / "meta")

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(MTPModel, "save_pretrained", full)
        with pytest.raises(OSError):
            convert_meta(tmp_path / "meta", tmp_path / "out")
    assert not (tmp_path / "out" / "backbone").exists() and not (tmp_path / "out" / "heads").exists()
    convert_meta(tmp_path / "meta", tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with monkeypatch.context() as m:
        m.setattr(MTPModel, "save_pretrained", full)
        with pytest.raises(OSError):
            convert_meta(tmp_path / "meta", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before == ["backbone", "heads"]
    MTPModel.from_pretrained(tmp_path / "out" / "heads")


def test_meta_export_round_trip_is_exact(tmp_path):
    from mtp.convert import export_meta
    state, params = write_meta_checkpoint(tmp_path / "meta")
    model = MTPModel.from_pretrained(convert_meta(tmp_path / "meta", tmp_path / "a", dtype="float64"), dtype="float64")
    export_meta(model, tmp_path / "meta2")
    again = MTPModel.from_pretrained(convert_meta(tmp_path / "meta2", tmp_path / "b", dtype="float64"),
                                     dtype="float64")
    tokens = torch.tensor([[3, 14, 15, 9, 26, 5]])
    assert torch.equal(model(tokens), again(tokens))
    back = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_rotary_permutation_round_trips():
    w = torch.randn(16, 8)
    from mtp.convert import permute_rotary
    assert torch.equal(unpermute_rotary(permute_rotary(w, 2), 2), w)


def test_meta_layout_bad_input(tmp_path, capsys):
    state, params = write_meta_checkpoint(tmp_path / "ok")
    no_heads = tmp_path / "noheads"
    no_heads.mkdir()
    (no_heads / "params.json").write_text(json.dumps(params))
    torch.save({k: v for k, v in state.items() if not k.startswith("extra_heads")}, no_heads / "consolidated.00.pth")
    with pytest.raises(UserError, match="no extra_heads"):
        convert_meta(no_heads, tmp_path / "o1")
    bad_shape = tmp_path / "badshape"
    bad_shape.mkdir()
    (bad_shape / "params.json").write_text(json.dumps(params))
    broken = dict(state)
    broken["extra_heads.0.attention.wq.weight"] = torch.zeros(5, 5, dtype=torch.float64)
    torch.save(broken, bad_shape / "consolidated.00.pth")
    with pytest.raises(UserError, match="shape"):
        convert_meta(bad_shape, tmp_path / "o2")
    code = main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "params.json").write_text(json.dumps(params))
    (garbage / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        convert_meta(garbage, tmp_path / "o4")
    code = main(["convert", str(tmp_path / "ok"), "--out", str(tmp_path / "o5")])
    assert code == 0
    code = main(["convert", str(tmp_path / "ok"), "--out", str(tmp_path / "o5")])  # never overwrites
    assert code == 2 and "already" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training cost benchmark


def test_bench_pretrain_step_compares_n_with_next_token_training(tmp_path, capsys):
    out = tmp_path / "step.json"
    code = main(["bench", "pretrain-step", "--preset", "micro", "--heads", "3", "--batch-size", "1", "--seq-len", "16",
                 "--repeats", "3", "--rounds", "1", "--json", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    v = r["variants"]
    assert (v["n"]["layers"], v["n1_matched"]["layers"], v["n1_same_trunk"]["layers"]) == (5, 5, 3)
    assert v["n_naive"]["order"] == "naive" and v["n"]["order"] == "efficient"
    # the reported figures agree with one another: medians of the listed times, rates from them, ratios of them
    import statistics
    for name, x in v.items():
        assert len(x["times"]) == 3 and all(t > 0 for t in x["times"]), name
        assert x["median_step_seconds"] == statistics.median(x["times"]), name
        assert x["tokens_per_s"] == pytest.approx(1 * 16 / x["median_step_seconds"], rel=1e-12), name
        assert x["peak_bytes"] > 0, name
    t = {name: x["median_step_seconds"] for name, x in v.items()}
    assert r["time_ratio_same_trunk"] == pytest.approx(t["n"] / t["n1_same_trunk"], rel=1e-12)
    assert r["time_ratio_matched"] == pytest.approx(t["n"] / t["n1_matched"], rel=1e-12)
    assert r["time_ratio_naive"] == pytest.approx(t["n"] / t["n_naive"], rel=1e-12)
    assert r["memory_ratio_naive"] == pytest.approx(v["n"]["peak_bytes"] / v["n_naive"]["peak_bytes"], rel=1e-12)
    assert "parameter-matched" in capsys.readouterr().out


def test_bench_pretrain_step_bad_input(capsys):
    for args in (["--heads", "1"], ["--heads", "5"], ["--preset", "huge"], ["--seq-len", "100000"], ["--vocab", "10"]):
        code = main(["bench", "pretrain-step", "--preset", "micro", *args, "--quiet"] if "--preset" not in args
                    else ["bench", "pretrain-step", *args, "--quiet"])
        e = capsys.readouterr().err
        assert code == 2 and e.count("\n") == 1 and "Traceback" not in e, (args, e)
