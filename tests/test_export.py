"""mtp export: round trips, and an independent reading of the exported EAGLE-3 folder written from vLLM's
``llama_eagle3.py`` / ``v1/spec_decode/eagle.py`` semantics that must draft exactly what mtp's head drafts."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mtp.cli import main
from mtp.export.eagle3 import read_eagle3, write_eagle3
from tests.conftest import tiny_model
from tests.test_eagle3 import chain_reference, eagle_heads


# ----------------------------------------------------------------------------- vLLM's EAGLE-3 forward, re-read


class VllmEagle3:
    """vLLM's Eagle3LlamaForCausalLM from the exported files only: RMSNorm with fused residual
    (``norm(x, residual)`` returns ``(norm(x + residual), x + residual)``), neox RoPE, GQA causal attention
    over its own KV cache, SiLU-gated MLP, logits scattered to target ids through d2t."""

    def __init__(self, folder, embed_weight):
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = {k: v.double() if v.is_floating_point() else v for k, v in load_file(folder / "model.safetensors").items()}
        self.embed = embed_weight.double()
        c = self.cfg
        self.h, self.nh, self.nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.d = c.get("head_dim") or self.h // self.nh
        theta = (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        self.eps = c["rms_norm_eps"]
        self.keys, self.values = [], []  # the draft model's KV cache, one entry per position

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def rope(self, x, pos):  # x (n_heads, d); neox style: rotate the two halves
        ang = pos * self.inv_freq
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def layer(self, token, hidden, pos):
        """One position: returns (hidden_states for logits, pre-norm hidden for the next step)."""
        w = self.w
        e = self.rms(self.embed[token], "midlayer.input_layernorm.weight")
        residual = hidden  # norm_before_residual = false
        x = torch.cat([e, self.rms(hidden, "midlayer.hidden_norm.weight")])
        q = self.rope((w["midlayer.self_attn.q_proj.weight"] @ x).view(self.nh, self.d), pos)
        k = self.rope((w["midlayer.self_attn.k_proj.weight"] @ x).view(self.nkv, self.d), pos)
        v = (w["midlayer.self_attn.v_proj.weight"] @ x).view(self.nkv, self.d)
        self.keys.append(k)
        self.values.append(v)
        ks, vs = torch.stack(self.keys, 1), torch.stack(self.values, 1)  # (kv, n, d)
        rep = self.nh // self.nkv
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        att = torch.softmax((ks @ q[:, :, None])[..., 0] / math.sqrt(self.d), -1)  # (nh, n)
        o = w["midlayer.self_attn.o_proj.weight"] @ (att[..., None] * vs).sum(1).reshape(-1)
        residual = o + residual  # post_attention_layernorm(o, residual)
        h = self.rms(residual, "midlayer.post_attention_layernorm.weight")
        m = w["midlayer.mlp.down_proj.weight"] @ (torch.nn.functional.silu(w["midlayer.mlp.gate_proj.weight"] @ h)
                                                 * (w["midlayer.mlp.up_proj.weight"] @ h))
        prenorm = m + residual  # model.norm(m, residual)
        return self.rms(prenorm, "norm.weight"), prenorm

    def logits(self, hidden):
        small = self.w["lm_head.weight"] @ hidden
        vd = small.shape[0]
        full = torch.full((self.cfg["vocab_size"],), float("-inf"), dtype=small.dtype)
        full[torch.arange(vd) + self.w["d2t"]] = small
        return full

    def propose(self, target_ids, aux, k):
        """eagle.py's propose: input ids shifted by one (the last is the next token), hidden = fc(aux), the
        positions of the target; then k - 1 steps feeding the draft token and the pre-norm hidden."""
        g = aux.double() @ self.w["fc.weight"].T  # combine_hidden_states
        ids = target_ids[1:]  # the token after each position; the last one is the sampled next token
        for p in range(len(ids)):
            out, pre = self.layer(ids[p], g[p], p)
        all_logits = [self.logits(out)]
        pos = len(ids) - 1
        for _ in range(k - 1):
            token = int(all_logits[-1].argmax())
            pos += 1
            out, pre = self.layer(token, pre, pos)
            all_logits.append(self.logits(out))
        return all_logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_semantics_reading_the_export_drafts_what_mtp_drafts(arch, tmp_path):
    model = tiny_model(arch, vocab=64)
    heads = eagle_heads(model, draft_ids=list(range(4, 60)))
    write_eagle3(heads, tmp_path / "e3")
    ref = VllmEagle3(tmp_path / "e3", model.get_input_embeddings().weight.detach())
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    _, states = heads.trunk(ids)
    aux = torch.cat(states, -1)[0]  # (T, 3H), the layers the config names
    assert json.loads((tmp_path / "e3" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == heads.tapped
    start = 6  # positions 0..6 committed; ids[7] is the next (root) token
    vllm_logits = ref.propose(ids[0, : start + 2].tolist(), aux[: start + 1], 3)
    # mtp: the same chain, each step feeding the greedy draft token
    ext = ids[:, : start + 2]
    for j in range(3):
        a = chain_reference(heads, ext, start, j + 1)[j]
        mine = heads.eagle.full_logits(a)[0]
        torch.testing.assert_close(mine, vllm_logits[j], rtol=1e-6, atol=1e-6)  # RMSNorm: float32 inside HF
        ext = torch.cat([ext, mine.argmax()[None, None]], 1)


def test_eagle3_export_round_trip_and_layout(tmp_path):
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model, draft_ids=list(range(10, 42)))
    write_eagle3(heads, tmp_path / "e3", torch.float32)
    config, tensors = read_eagle3(tmp_path / "e3")
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == 32 and config["target_hidden_size"] == 32 and not config["norm_before_residual"]
    assert tensors["fc.weight"].shape == (32, 96) and tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 64
    assert tensors["d2t"].dtype == torch.int64 and torch.equal(tensors["d2t"] + torch.arange(32), torch.arange(10, 42))
    assert tensors["t2d"].sum() == 32 and bool(tensors["t2d"][10]) and not bool(tensors["t2d"][9])
    state = heads.eagle.state_dict()
    for name, t in tensors.items():
        if name not in ("d2t", "t2d"):
            assert torch.equal(t, state[name].float()), name


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def saved_heads(tiny_folder, tmp_path):
    from mtp.backbones import load_backbone

    backbone, _ = load_backbone(str(tiny_folder))
    out = {}
    for kind in ("eagle3", "hydra"):
        from mtp.model.mtp import HeadsConfig, MTPModel

        MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind=kind)).save_pretrained(
            tmp_path / kind)
        out[kind] = tmp_path / kind
    return out


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_cli_writes_and_prints_the_serving_commands(saved_heads, tmp_path, capsys):
    code, out, err = run(["export", "--heads", str(saved_heads["eagle3"]), "--format", "eagle3",
                          "--out", str(tmp_path / "x")], capsys)
    assert code == 0, err
    assert (tmp_path / "x" / "config.json").is_file() and "vllm.entrypoints.openai.api_server" in out
    assert '"method": "eagle3"' in out and "sglang" in out.lower()
    # never over an existing output without --overwrite; with it, replaced whole
    code, _, err = run(["export", "--heads", str(saved_heads["eagle3"]), "--format", "eagle3",
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, _, err = run(["export", "--heads", str(saved_heads["eagle3"]), "--format", "eagle3",
                        "--out", str(tmp_path / "x"), "--overwrite"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("case, message", [
    ("hydra-to-eagle3", "no serving engine loads"),
    ("eagle3-to-medusa", "export them as eagle3 or gguf"),
    ("out-is-input", "is also an input"),
    ("bad-format", "unknown --format"),
    ("foreign-backbone", "trained for"),
    ("no-llama.cpp", "mtp engines setup llama.cpp"),
    ("corrupt", "corrupt"),
])
def test_export_bad_input_is_one_line(saved_heads, tmp_path, capsys, monkeypatch, case, message):
    e3 = str(saved_heads["eagle3"])
    args = {"hydra-to-eagle3": ["--heads", str(saved_heads["hydra"]), "--format", "eagle3", "--out", str(tmp_path / "o")],
            "eagle3-to-medusa": ["--heads", e3, "--format", "medusa", "--out", str(tmp_path / "o")],
            "out-is-input": ["--heads", e3, "--format", "eagle3", "--out", e3, "--overwrite"],
            "bad-format": ["--heads", e3, "--format", "onnx", "--out", str(tmp_path / "o")],
            "foreign-backbone": ["--heads", e3, "--format", "eagle3", "--out", str(tmp_path / "o")],
            "no-llama.cpp": ["--heads", e3, "--format", "gguf", "--out", str(tmp_path / "o")],
            "corrupt": ["--heads", e3, "--format", "eagle3", "--out", str(tmp_path / "o")]}[case]
    if case == "foreign-backbone":
        other = tmp_path / "other"
        tiny_model("llama", vocab=128, seed=7, dtype=torch.float32).save_pretrained(other)
        from tests.conftest import char_tokenizer

        char_tokenizer().save_pretrained(other)
        args += ["--model", str(other)]
    if case == "no-llama.cpp":
        monkeypatch.setenv("MTP_LLAMA_CPP_DIR", str(tmp_path / "nothing"))
    if case == "corrupt":
        (saved_heads["eagle3"] / "model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run(["export", *args], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _snapshot(root):
    """Every file under ``root`` (links not followed) with its bytes: what must not change."""
    import os
    import stat

    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p, st = os.path.join(dirpath, name), os.lstat(os.path.join(dirpath, name))
            out[p] = (os.readlink(p) if os.path.islink(p) else open(p, "rb").read() if stat.S_ISREG(st.st_mode)
                      else (st.st_mode, st.st_rdev))  # a FIFO or device: its kind, never opened
    return out


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["parent-of-input", "inside-input", "dev-null", "fifo", "symlink-to-input",
                                   "foreign-folder"])
def test_export_never_replaces_what_it_did_not_write(tmp_path, capsys, saved_heads, where, overwrite):
    """An --out that holds the input, lies inside it, is a device, a FIFO, a link to the input or a folder of
    someone's files is refused in one line (exit 2), with or without --overwrite, and every byte stays."""
    import os
    import shutil

    run_dir = tmp_path / "RUN"
    heads = run_dir / "e3"
    shutil.copytree(saved_heads["eagle3"], heads)
    (run_dir / "notes.txt").write_text("my notes")
    (run_dir / "other-run").mkdir()
    (run_dir / "other-run" / "log.jsonl").write_text("{}\n")
    out = {"parent-of-input": run_dir, "inside-input": heads / "sub", "dev-null": tmp_path / "null",
           "fifo": tmp_path / "pipe", "symlink-to-input": tmp_path / "link", "foreign-folder": run_dir}[where]
    if where == "dev-null":  # a device node like /dev/null, of our own (a regression must not break the machine's)
        try:
            os.mknod(out, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    if where == "fifo":
        os.mkfifo(out)
    if where == "symlink-to-input":
        os.symlink(heads, out)
    before, dev = _snapshot(tmp_path), os.stat("/dev/null")
    code, _, err = run(["export", "--heads", str(heads), "--format", "eagle3", "--out", str(out)]
                       + (["--overwrite"] if overwrite else []), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before
    assert os.stat("/dev/null").st_rdev == dev.st_rdev and not os.path.isdir("/dev/null")
    if where == "dev-null":
        assert os.stat(out).st_rdev == dev.st_rdev and not os.path.isdir(out)
    if where == "fifo":
        import stat

        assert stat.S_ISFIFO(os.lstat(out).st_mode) and not list(tmp_path.glob(".pipe.*"))


def test_export_overwrite_replaces_an_export_of_its_own_but_not_a_folder_with_other_files(tmp_path, capsys,
                                                                                            saved_heads):
    e3 = str(saved_heads["eagle3"])
    out = tmp_path / "x"
    assert run(["export", "--heads", e3, "--format", "eagle3", "--out", str(out)], capsys)[0] == 0
    assert run(["export", "--heads", e3, "--format", "eagle3", "--out", str(out), "--overwrite"], capsys)[0] == 0
    (out / "mine.txt").write_text("keep")
    code, _, err = run(["export", "--heads", e3, "--format", "eagle3", "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "mine.txt" in err and (out / "mine.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- vLLM's Medusa, re-read


def final_tap_heads(model, n=3, token_counts=None):
    from mtp.model.mtp import HeadsConfig, MTPModel

    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=n, kind="mlp", tap="final", mlp_layers=2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    heads.token_counts = token_counts
    return heads.eval()


def test_vllm_medusa_semantics_reading_the_export_match_mtp_heads(tmp_path):
    """vLLM's Medusa: head i = lm_head(x + SiLU(W x + b) ...) on the target's final (normed) hidden state."""
    from mtp.export.medusa import write_medusa

    model = tiny_model("llama", vocab=64)
    counts = torch.zeros(64, dtype=torch.long)
    counts[5:40] = 3
    heads = final_tap_heads(model, token_counts=counts)
    write_medusa(heads, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    w = load_file(tmp_path / "m" / "model.safetensors")
    assert cfg["num_heads"] == 3 and cfg["num_hidden_layers"] == 2 and cfg["original_lm_head"]
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1][0]  # vLLM's target hidden states: normed
        _, states = heads.trunk(ids)
        mine = [to_logits(x)[0] for x, to_logits in heads.head_outputs(states, ids)]
    token_map = w.get("token_map", torch.arange(64))  # the shortlist, when there is one
    assert cfg["truncated_vocab_size"] == token_map.numel()
    for i in range(cfg["num_heads"]):
        x = h.clone()
        for j in range(cfg["num_hidden_layers"]):
            x = x + torch.nn.functional.silu(x @ w[f"blocks.{i}.layers.{j}.weight"].T + w[f"blocks.{i}.layers.{j}.bias"])
        small = x @ w["lm_heads.0.weight"].T
        full = torch.full((x.shape[0], cfg["vocab_size"]), float("-inf"), dtype=small.dtype)
        full[:, token_map] = small
        # the argmax over the shortlist is what vLLM drafts; on the shortlist the logits are mtp's own
        torch.testing.assert_close(full[:, token_map], mine[i][:, token_map])


def test_final_tap_heads_decode_token_identical():
    from mtp.decode.engine import SpeculativeDecoder
    from mtp.decode.proposers import TreeProposer, blockwise
    from mtp.decode.tree import compile_tree
    from tests.test_decode import PROMPTS, Tok, reference_greedy

    model = tiny_model("llama", vocab=64)
    heads = final_tap_heads(model)
    refs = [reference_greedy(model, p, 16) for p in PROMPTS]
    for proposer in (blockwise(3), TreeProposer(compile_tree([(0,), (1,), (0, 0), (0, 0, 0)]))):
        out = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer).generate(PROMPTS, 16, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == refs


def test_medusa_export_cli_and_refusals(tiny_folder, tmp_path, capsys):
    from mtp.backbones import load_backbone
    from mtp.model.mtp import HeadsConfig, MTPModel

    backbone, _ = load_backbone(str(tiny_folder))
    MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind="mlp", tap="final")).save_pretrained(
        tmp_path / "final")
    MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind="mlp")).save_pretrained(tmp_path / "last")
    code, out, err = run(["export", "--heads", str(tmp_path / "final"), "--format", "medusa",
                          "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and '"method": "medusa"' in out, err
    code, _, err = run(["export", "--heads", str(tmp_path / "final"), "--format", "eagle3",
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "export them as medusa" in err
    code, _, err = run(["export", "--heads", str(tmp_path / "last"), "--format", "medusa",
                        "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "--tap final" in err


def test_full_vocabulary_export_has_no_d2t(tmp_path):
    """vLLM has no d2t parameter when the draft vocabulary is the target's: the export must omit it."""
    model = tiny_model("llama", vocab=64)
    write_eagle3(eagle_heads(model), tmp_path / "e3")
    config, tensors = read_eagle3(tmp_path / "e3")
    assert config["draft_vocab_size"] == 64 and "d2t" not in tensors and "t2d" not in tensors


# ----------------------------------------------------------------------------- a draft vocabulary sized for an engine


def test_shrinking_the_draft_vocabulary_keeps_the_most_frequent_rows_as_trained(tmp_path):
    """--draft-vocab N keeps the N draft tokens most frequent as training targets, each with its trained
    lm_head row: the kept tokens' draft logits are unchanged, the others are gone (-inf)."""
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model, draft_ids=list(range(4, 60)))
    counts = torch.zeros(64, dtype=torch.long)
    counts[4:60] = torch.randperm(56, generator=torch.Generator().manual_seed(3)) + 1
    counts[0] = 10_000  # frequent, but outside the draft vocabulary: never added
    heads.token_counts = counts
    a = torch.randn(5, 32, dtype=torch.float64)
    before = heads.eagle.full_logits(a)
    heads.shrink_draft_vocab(16)
    keep = torch.sort(counts[4:60], descending=True).indices[:16] + 4
    assert torch.equal(heads.eagle.draft_ids, keep.sort().values) and heads.config.draft_vocab == 16
    after = heads.eagle.full_logits(a)
    torch.testing.assert_close(after[:, keep], before[:, keep], rtol=1e-12, atol=1e-12)  # a smaller matmul
    gone = torch.ones(64, dtype=torch.bool)
    gone[keep] = False
    assert torch.isinf(after[:, gone]).all()
    write_eagle3(heads, tmp_path / "e3")
    config, tensors = read_eagle3(tmp_path / "e3")
    assert config["draft_vocab_size"] == 16 and torch.equal(tensors["d2t"] + torch.arange(16), keep.sort().values)
    heads.shrink_draft_vocab(32)  # never grows
    assert heads.config.draft_vocab == 16


def test_export_draft_vocab_cli(tiny_folder, tmp_path, capsys):
    from mtp.backbones import load_backbone
    from mtp.model.mtp import HeadsConfig, MTPModel

    backbone, _ = load_backbone(str(tiny_folder))
    heads = MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind="eagle3"))
    heads.save_pretrained(tmp_path / "no-counts")
    heads.token_counts = torch.arange(128, dtype=torch.long)
    heads.save_pretrained(tmp_path / "heads")
    code, out, err = run(["export", "--heads", str(tmp_path / "heads"), "--format", "eagle3", "--draft-vocab", "64",
                          "--out", str(tmp_path / "x")], capsys)
    assert code == 0, err
    config, tensors = read_eagle3(tmp_path / "x")
    assert config["draft_vocab_size"] == 64 and torch.equal(tensors["d2t"] + torch.arange(64), torch.arange(64, 128))
    for args, message in [(["--heads", str(tmp_path / "no-counts"), "--format", "eagle3", "--draft-vocab", "64"],
                           "training-target counts"),
                          (["--heads", str(tmp_path / "heads"), "--format", "eagle3", "--draft-vocab", "8"],
                           "at least 64"),
                          (["--heads", str(tmp_path / "heads"), "--format", "medusa", "--draft-vocab", "64"],
                           "sizes an EAGLE-3 draft")]:
        code, _, err = run(["export", *args, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
