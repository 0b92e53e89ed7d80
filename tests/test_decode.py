"""Self-speculative decoding on tiny random float64 models: every method says what plain greedy says."""

import pytest
import torch

from mtp.config import DraftOptions
from mtp.decode.accept import Sampling, accept_greedy, accept_sample
from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.proposers import (DraftContext, DynamicTreeProposer, EarlyExitProposer, LookupProposer, PlainProposer,
                                  Proposer, TreeProposer, UnionProposer, blockwise)
from mtp.decode.tree import Draft, chain_tree, compile_tree, tree_from_accuracy
from mtp.errors import UserError
from mtp.model.mtp import HeadsConfig, MTPModel
from tests.conftest import char_tokenizer, tiny_model

PROMPTS = [[1, 5, 9, 13, 5, 9], [1, 7, 7, 7, 20, 21, 22, 7, 7, 7, 20], [1, 30]]


class Tok:
    """Just what the decoder asks of a tokenizer."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def reference_greedy(model, prompt, n, eos=None):
    """Plain greedy with a full forward per token: obviously right."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if eos is not None and t == eos:
                break
    return out


def with_heads(model, kind="mlp", n=3, seed=1):
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=n, kind=kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return heads.eval()


def methods(heads):
    return {
        "plain": PlainProposer(),
        "blockwise": blockwise(3),
        "tree": TreeProposer(compile_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])),
        "dynamic": DynamicTreeProposer(nodes=10, top_k=3),
        "lookup": LookupProposer(draft_len=4),
        "hybrid": UnionProposer([TreeProposer(compile_tree([(0,), (1,), (0, 0)])), LookupProposer(draft_len=3)]),
        "early-exit": EarlyExitProposer(layers=1, draft_len=2),
    }


@pytest.mark.parametrize("kind", ["mlp", "transformer", "hydra", "eagle3"])
def test_every_method_reproduces_plain_greedy_in_a_batch(arch, kind):
    model = tiny_model(arch, vocab=64)
    heads = with_heads(model, kind)
    refs = [reference_greedy(model, p, 24) for p in PROMPTS]
    for name, proposer in methods(heads).items():
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer)
        out = dec.generate(PROMPTS, max_new_tokens=24, eos_token_ids=[])
        for row, ref in zip(out.rows, refs):
            assert row.tokens == ref, (arch, kind, name)
        # one row alone gives the same as in the batch
        alone = dec.generate(PROMPTS[1:2], max_new_tokens=24, eos_token_ids=[])
        assert alone.rows[0].tokens == refs[1]


def test_stops_at_eos_per_row():
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model)
    refs = [reference_greedy(model, p, 24) for p in PROMPTS]
    eos = refs[0][5]  # a token the first row emits: it must stop there, the others when they emit it
    for proposer in (PlainProposer(), blockwise(3), DynamicTreeProposer(nodes=8, top_k=3)):
        out = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer).generate(PROMPTS, 24, eos_token_ids=[eos])
        for row, prompt in zip(out.rows, PROMPTS):
            expect = reference_greedy(model, prompt, 24, eos=eos)
            assert row.tokens == expect
            assert row.finish == ("eos" if expect[-1] == eos else "length")


def test_stop_strings_and_streaming():
    model = tiny_model("llama", vocab=64)
    ref = reference_greedy(model, PROMPTS[0], 20)
    stop = Tok().decode(ref[6:8])
    streamed = []
    out = SpeculativeDecoder(model, Tok(), mtp_model=with_heads(model), proposer=blockwise(3)).generate(
        PROMPTS[:1], 20, eos_token_ids=[], stop_strings=[stop], callback=lambda row, toks: streamed.extend(toks))
    row = out.rows[0]
    assert row.finish == "stop" and stop in Tok().decode(row.tokens)
    assert row.tokens == ref[: len(row.tokens)] and len(row.tokens) <= 8
    assert streamed == row.tokens


class Oracle(Proposer):
    """Drafts the true continuation (always accepted), a wrong one (never) or a half-right one."""

    def __init__(self, ref, mode, depth=4, prompt=PROMPTS[0]):
        self.ref, self.mode, self.depth, self.prompt = ref, mode, depth, prompt

    def propose(self, state):
        seq = state.sequences()[0]
        done = len(seq) - len(self.prompt)
        nxt = self.ref[done: done + self.depth] + [0] * self.depth
        nxt = nxt[: self.depth]
        if self.mode == "never":
            nxt = [(t + 1) % 64 for t in nxt]
        elif self.mode == "partial":
            nxt = nxt[:2] + [(t + 1) % 64 for t in nxt[2:]]
        return Draft.chain(torch.tensor([nxt]))


@pytest.mark.parametrize("mode,tau_range", [("always", (4.0, 5.01)), ("never", (1.0, 1.0)), ("partial", (2.5, 3.01))])
def test_stub_acceptance(mode, tau_range):
    model = tiny_model("llama", vocab=64)
    ref = reference_greedy(model, PROMPTS[0], 60)
    out = SpeculativeDecoder(model, Tok(), proposer=Oracle(ref, mode)).generate(PROMPTS[:1], 40, eos_token_ids=[])
    row = out.rows[0]
    assert row.tokens == ref[:40]
    per_step = row.accepted[:-1]  # the last step may be cut by max new tokens
    expect = {"always": 5, "never": 1, "partial": 3}[mode]
    assert all(a == expect for a in per_step)
    tau = row.acceptance_length
    assert tau_range[0] <= tau <= tau_range[1] or mode == "never" and tau == 1.0


def test_cache_after_commit_equals_recomputed_cache():
    model = tiny_model("qwen2", vocab=64)
    heads = with_heads(model)
    dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=DynamicTreeProposer(nodes=8, top_k=3))
    out = dec.generate(PROMPTS, 16, eos_token_ids=[])
    for i, (prompt, row) in enumerate(zip(PROMPTS, out.rows)):
        committed = prompt + row.tokens[:-1]  # the last root is not in the cache yet
        from mtp.hf_compat import forward_with_cache, new_cache
        fresh = new_cache()
        with torch.no_grad():
            forward_with_cache(model, fresh, torch.tensor([committed]), use_cache=True)
        slots = dec.state.slots.valid[i, :dec.state.slots.end].nonzero()[:, 0]
        assert len(slots) == len(committed)
        assert dec.state.slots.pos[i, slots].tolist() == list(range(len(committed)))
        for mine, ref in zip(dec.state.cache.layers, fresh.layers):
            assert torch.allclose(mine.keys[i][:, slots], ref.keys[0], atol=1e-10)
            assert torch.allclose(mine.values[i][:, slots], ref.values[0], atol=1e-10)


def test_tree_buffers_golden():
    tree = compile_tree([[0], [1], [0, 0], [0, 1]])
    assert tree.parents.tolist() == [-1, -1, 0, 0]
    assert tree.depth.tolist() == [1, 1, 2, 2]
    assert tree.rank.tolist() == [0, 1, 0, 1]
    top = torch.tensor([[[10, 11], [20, 21]]])  # (B=1, heads=2, ranks=2)
    draft = tree.draft(top)
    assert draft.tokens.tolist() == [[10, 11, 20, 21]]
    assert draft.depth().tolist() == [[1, 1, 2, 2]]
    mask = draft.ancestor_mask()[0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],   # root
                    [1, 1, 0, 0, 0],   # (0)
                    [1, 0, 1, 0, 0],   # (1)
                    [1, 1, 0, 1, 0],   # (0, 0)
                    [1, 1, 0, 0, 1]]   # (0, 1)
    assert chain_tree(3).paths == ((0,), (0, 0), (0, 0, 0))


@pytest.mark.parametrize("spec,message", [
    ([[0], [0, 0, 1]], "gap"), ([[0], [0]], "twice"), ([], "no paths"), ([[0], [-1]], "non-negative"),
    ("[[0], oops", "JSON"), ([[0], [0, 0], [0, 0, 0]], "only 2 heads")])
def test_bad_tree_specs(spec, message):
    with pytest.raises(UserError, match=message):
        compile_tree(spec, max_depth=2)


def test_tree_from_accuracy_is_prefix_closed_and_greedy():
    tree = tree_from_accuracy([[0.6, 0.2, 0.1], [0.5, 0.2], [0.4]], nodes=5)
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))


def test_greedy_acceptance_picks_deepest_right_path():
    v = 8
    draft = Draft(torch.tensor([[3, 4, 5, 6]]), torch.tensor([[-1, -1, 0, 1]]), torch.ones(1, 4, dtype=torch.bool))
    logits = torch.zeros(1, 5, v)
    logits[0, 0, 4] = 5  # root -> 4: node 1 right
    logits[0, 2, 6] = 5  # node 1 (token 4) -> 6: node 3 right
    logits[0, 4, 1] = 5  # after node 3 -> 1
    acc = accept_greedy(logits, draft)
    assert acc.path[0].tolist() == [0, 2, 4] and int(acc.length[0]) == 3 and int(acc.next_root[0]) == 1


def test_speculative_sampling_matches_target_distribution():
    """Chi-square: the first two emitted tokens follow the backbone's own sampling distribution."""
    torch.manual_seed(0)
    v = 6
    logits = torch.randn(1, 4, v) * 1.5
    # root with children tokens 0 and 1 (nodes 1, 2); node 1 has child token 2 (node 3)
    draft = Draft(torch.tensor([[0, 1, 2]]), torch.tensor([[-1, -1, 0]]), torch.ones(1, 3, dtype=torch.bool))
    sampling = Sampling(temperature=1.0)
    p = sampling.probs(logits[0])
    g = torch.Generator().manual_seed(123)
    n = 20000
    first, pair = torch.zeros(v), torch.zeros(v)
    lg = logits.expand(n, -1, -1)
    dr = Draft(draft.tokens.expand(n, -1), draft.parents.expand(n, -1), draft.valid.expand(n, -1))
    acc = accept_sample(lg, dr, sampling, g)
    tokens = dr.tokens
    for i in range(n):
        length = int(acc.length[i])
        emitted = [int(tokens[i, q - 1]) for q in acc.path[i, 1:length].tolist()] + [int(acc.next_root[i])]
        first[emitted[0]] += 1
        if emitted[0] == 0:
            pair[emitted[1]] += 1
    # chi-square statistics against the 0.999 quantile of chi2 with v - 1 = 5 degrees of freedom (20.52)
    def chi2(observed, expected):
        return float(((observed - expected) ** 2 / expected).sum())
    assert chi2(first, p[0] * n) < 20.52
    # given the first token is 0 (node 1), the second follows p at node 1
    assert chi2(pair, p[1] * pair.sum()) < 20.52


def test_sampling_is_reproducible_under_a_fixed_seed():
    """The same seed gives the same tokens (twice from one decoder too); another seed other tokens. That the
    samples follow the backbone's own distribution is tests/test_sampling_dist.py's chi-square test."""
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model)
    s = Sampling(temperature=0.8, top_k=20, top_p=0.95)
    dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=blockwise(3), sampling=s, seed=5)
    a = dec.generate(PROMPTS, 16, [])
    b = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=blockwise(3), sampling=s, seed=5).generate(PROMPTS, 16, [])
    again = dec.generate(PROMPTS, 16, [])
    other = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=blockwise(3), sampling=s, seed=6).generate(PROMPTS, 16, [])
    assert [r.tokens for r in a.rows] == [r.tokens for r in b.rows] == [r.tokens for r in again.rows]
    assert [r.tokens for r in a.rows] != [r.tokens for r in other.rows]


def test_bad_generation_input():
    model = tiny_model("llama", vocab=64)
    dec = SpeculativeDecoder(model, Tok())
    with pytest.raises(UserError, match="empty prompt"):
        dec.generate([[]], 4)
    with pytest.raises(UserError, match=">= 1"):
        dec.generate(PROMPTS, 0)
    with pytest.raises(UserError, match="context"):
        dec.generate([[1] * 510], 8)
    with pytest.raises(UserError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(UserError, match="heads"):
        SpeculativeDecoder(model, Tok(), proposer=blockwise(2))


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def tiny_heads(tiny_folder, tmp_path):
    from mtp.backbones import load_backbone
    backbone, _ = load_backbone(str(tiny_folder))
    folder = tmp_path / "heads"
    with_heads(backbone, n=2).save_pretrained(folder)
    return folder


def run_cli(args, capsys):
    from mtp.cli import main
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cli_methods(tiny_folder, tiny_heads, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    base = ["generate", "--model", str(tiny_folder), "--max-new-tokens", "12", "the quick brown"]
    code, out, err = run_cli(base + ["--method", "lookup"], capsys)
    assert code == 0 and "tokens/s" in err and "identical output" in err
    for method in ("blockwise", "tree", "dynamic"):
        code, out, err = run_cli(base + ["--heads", str(tiny_heads), "--method", method], capsys)
        assert code == 0 and "identical output" in err, err
    code, out, err = run_cli(base + ["--heads", str(tiny_heads), "--tree", "[[0], [1], [0, 0]]"], capsys)
    assert code == 0 and "nodes 3" in err
    code, out, err = run_cli(base + ["--method", "early-exit", "--exit-layer", "1", "--temperature", "0.7",
                                     "--top-p", "0.9"], capsys)
    assert code == 0 and "tokens/s" in err


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--method", "tree"], "heads"),
    (["--method", "warp"], "unknown --method 'warp'"),
    (["--heads", "HEADS", "--tree", "[[0], [0, 0, 0]]"], "gap"),
    (["--heads", "HEADS", "--tree", "[[0], [0], [1]]"], "twice"),
    (["--method", "lookup", "--draft-len", "0"], "--draft-len must be"),
    (["--heads", "HEADS", "--method", "hybrid", "--draft-len", "0"], "--draft-len must be"),
    (["--heads", "HEADS", "--method", "blockwise", "--draft-len", "-2"], "--draft-len must be"),
])
def test_generate_cli_bad_input(tiny_folder, tiny_heads, capsys, extra, message):
    extra = [str(tiny_heads) if a == "HEADS" else a for a in extra]
    code, out, err = run_cli(["generate", "--model", str(tiny_folder), "abc"] + extra, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_cli_empty_and_too_long_prompt_and_foreign_heads(tiny_folder, tiny_heads, capsys, tmp_path):
    code, _, err = run_cli(["generate", "--model", str(tiny_folder), "   "], capsys)
    assert code == 2 and "empty prompt" in err
    code, _, err = run_cli(["generate", "--model", str(tiny_folder), "x" * 600], capsys)
    assert code == 2 and "context" in err
    other = tmp_path / "other"
    tiny_model("llama", vocab=128, seed=7, dtype=torch.float32).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    code, _, err = run_cli(["generate", "--model", str(other), "--heads", str(tiny_heads), "--method", "tree",
                            "abc"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_bench_context_cli(tiny_folder, tiny_heads, capsys, tmp_path):
    """The context sweep: every method at every length, the same output length, figures consistent."""
    import json
    doc = tmp_path / "long.txt"
    doc.write_text("def mean(values):\n    return sum(values) / len(values)\n" * 12)
    out_json, plot = tmp_path / "c.json", tmp_path / "c.png"
    code, out, err = run_cli(["bench", "context", "--model", str(tiny_folder), "--heads", str(tiny_heads),
                              "--data", str(doc), "--contexts", "64", "--contexts", "16", "--methods",
                              "transformers,plain,tree", "--nodes", "3", "--max-new-tokens", "6", "--rounds", "3",
                              "--json", str(out_json), "--plot", str(plot), "--quiet"], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["contexts"] == [16, 64] and list(r["methods"]) == ["transformers", "plain", "tree"]
    for name, m in r["methods"].items():
        assert [row["context"] for row in m["rows"]] == [16, 64]
        for row in m["rows"]:
            assert row["new_tokens"] == 6 and len(row["all_seconds"]) == 3
            assert row["seconds"] == sorted(row["all_seconds"])[1]  # the median of the rounds
            assert row["ms_per_token"] == pytest.approx(1000 * row["seconds"] / row["new_tokens"])
            assert row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["seconds"])
            assert row["tau"] == pytest.approx(row["new_tokens"] / row["steps"]) and row["tau"] >= 1.0
            assert row["prefill_seconds"] == sorted(row["all_prefill_seconds"])[1]
            assert row["decode_ms_per_token"] == pytest.approx(1000 * (row["seconds"] - row["prefill_seconds"]) / 5)
        assert m["growth"] == pytest.approx(m["rows"][1]["decode_ms_per_token"] / m["rows"][0]["decode_ms_per_token"])
        assert m["growth_with_prefill"] == pytest.approx(m["rows"][1]["ms_per_token"] / m["rows"][0]["ms_per_token"])
    assert "growth 64 / 16" in out and plot.stat().st_size > 0
    code, _, err = run_cli(["bench", "context", "--model", str(tiny_folder), "--data", str(doc), "--contexts",
                            "100000", "--methods", "plain"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--contexts" in err


def test_bench_decode_cli(tiny_folder, tiny_heads, capsys, tmp_path):
    import json
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the quick brown fox"}\n{"prompt": "def mean(values):"}\n'
                       '{"prompt": "hello there"}\n')
    out_json, plot = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run_cli(["bench", "decode", "--model", str(tiny_folder), "--heads", str(tiny_heads),
                              "--prompts", str(prompts), "--methods", "blockwise,tree,hybrid,lookup",
                              "--batch-size", "2", "--draft-len", "3",
                              "--max-new-tokens", "10", "--nodes", "4", "--json", str(out_json), "--plot", str(plot),
                              "--compare-guarded", "--quiet"], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    drafting = ("blockwise", "tree", "hybrid", "lookup")
    assert set(r["methods"]) == {"transformers", "plain", *drafting, *(f"{m}-guarded" for m in drafting)}
    for m in drafting:  # the guarded rows say how many steps they drafted; the others have no guard
        guard = r["methods"][f"{m}-guarded"]["guard"]
        assert sum(g["drafted_steps"] for g in guard.values()) > 0 and "guard" not in r["methods"][m]
    assert "drafted batch" in out
    for m in r["methods"].values():
        assert m["identical_share"] == 1.0 and m["tau"] >= 1.0 and m["speedup"] > 0
    width = {name: m["verify_tokens_per_forward"] for name, m in r["methods"].items()}
    assert width["plain"] == 1.0 and width["tree"] == 5.0  # the root and the 4 nodes, every step
    assert all(m["identical_to_plain_loop_share"] == 1.0 for m in r["methods"].values())
    assert 5.0 <= width["hybrid"] <= 5.0 + 8  # the tree plus, when it adds new paths, the lookup chain
    assert r["methods"]["hybrid"]["config"]["lookup_draft_len"] == 3  # --draft-len reaches every method
    assert r["methods"]["blockwise"]["config"]["draft_len"] == 2  # capped at the heads (2 here)
    assert plot.stat().st_size > 0
    # the figures agree with one another: rates from tokens and seconds, speedups as ratios of the reported
    # rates, the baseline the faster plain one, tau = tokens / backbone forwards (a row's prefill emits one
    # token, then every verify step as many as the acceptance histogram says)
    base = max(r["methods"][b]["tokens_per_s"] for b in ("transformers", "plain"))
    assert r["baseline_tokens_per_s"] == pytest.approx(base, rel=1e-12)
    rows = r["n_prompts"]
    for name, m in r["methods"].items():
        assert m["tokens_per_s"] == pytest.approx(m["new_tokens"] / m["seconds"], rel=1e-12), name
        assert m["speedup"] == pytest.approx(m["tokens_per_s"] / r["baseline_tokens_per_s"], rel=1e-12), name
        if name == "transformers":
            continue
        hist = {int(k): n for k, n in m["acceptance_histogram"].items()}
        assert m["new_tokens"] == rows + sum(k * n for k, n in hist.items()), name
        assert m["tau"] == pytest.approx(m["new_tokens"] / (rows + sum(hist.values())), rel=1e-12), name
    assert r["methods"]["plain"]["tau"] == 1.0 and set(r["methods"]["plain"]["acceptance_histogram"]) == {"1"}
    assert max(m["speedup"] for m in (r["methods"]["transformers"], r["methods"]["plain"])) == pytest.approx(1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    code, _, err = run_cli(["bench", "decode", "--model", str(tiny_folder), "--heads", str(tiny_heads),
                            "--prompts", str(bad), "--quiet"], capsys)
    assert code == 2 and "line 2" in err


def test_bench_verify_cli(tiny_folder, capsys, tmp_path):
    import json
    code, out, err = run_cli(["bench", "verify", "--model", str(tiny_folder), "--context", "16", "--repeats", "1",
                              "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "v.json").read_text())
    assert set(r["curves"]) == {"float32", "bfloat16"} and r["curves"]["float32"]["ratio"]["1"] == 1.0
    for curve in r["curves"].values():  # every ratio is t(k) / t(1) of the reported times
        assert set(curve["ratio"]) == set(curve["seconds"]) and all(t > 0 for t in curve["seconds"].values())
        for k, t in curve["seconds"].items():
            assert curve["ratio"][k] == pytest.approx(t / curve["seconds"]["1"], rel=1e-12), k


def test_tree_size_follows_the_verify_cost_curve():
    from mtp.decode.methods import choose_tree
    acc = [[0.7, 0.2, 0.05], [0.5, 0.2], [0.4, 0.1], [0.3]]
    flat_then_steep = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 8: 1.0, 10: 3.0, 12: 3.5, 16: 4.0}
    nodes, gain = choose_tree(acc, flat_then_steep)
    assert nodes == 7 and gain > 2  # the largest tree that still verifies at the cost of one token
    steep = {k: float(k) for k in flat_then_steep}
    nodes, gain = choose_tree(acc, steep)
    assert nodes == 1  # every extra token costs a full forward: one node
    nodes, gain = choose_tree(acc, flat_then_steep, extra=4)
    assert nodes == 3  # a hybrid's lookup chain takes 4 of the 8 cheap slots: 1 + 3 + 4 = 8


def test_typical_acceptance_runs_and_accepts_confident_drafts():
    """Medusa's typical acceptance (lossy) in the engine. The argmax always passes the rule (delta e^-H <=
    0.3 max p < max p), so at temperature 0 drafts of the greedy continuation are accepted whole, every step,
    and the output is plain greedy's. (Wrong drafts may pass too: the rule is lossy. The rule itself is tested
    below on hand-made distributions.)"""
    model = tiny_model("llama", vocab=64)
    ref = reference_greedy(model, PROMPTS[0], 60)
    out = SpeculativeDecoder(model, Tok(), proposer=Oracle(ref, "always"), acceptance="typical").generate(
        PROMPTS[:1], 40, eos_token_ids=[])
    row = out.rows[0]
    assert row.tokens == ref[:40]
    assert row.accepted[:-1] == [5] * (len(row.accepted) - 1)  # 4 drafted + the next root, every step

    class GreedyOracle(Proposer):
        """Drafts the backbone's greedy continuation of the row as it stands (full forwards)."""

        def propose(self, state):
            return Draft.chain(torch.tensor([reference_greedy(model, state.sequences()[0], 4)]))

    # Sampled: drafts of the argmax continuation of the row as sampled so far (the argmax always passes the
    # rule) are accepted whole at every step: 1 token from the prefill, then 5 per step (the last step cut to
    # 4 by max_new_tokens), so tau = 30 tokens / 7 backbone forwards exactly.
    out = SpeculativeDecoder(model, Tok(), proposer=GreedyOracle(), sampling=Sampling(temperature=0.7),
                  acceptance="typical", seed=3).generate(PROMPTS[:1], 30, eos_token_ids=[])
    row = out.rows[0]
    assert len(row.tokens) == 30 and row.accepted == [5, 5, 5, 5, 5, 4]
    assert row.tokens != ref[:30]  # the roots were sampled, not the greedy continuation
    assert row.acceptance_length == len(row.tokens) / (1 + len(row.accepted)) == 30 / 7
    with pytest.raises(UserError, match="acceptance"):
        SpeculativeDecoder(model, Tok(), acceptance="fast")


def _typical_threshold(probs, epsilon=0.09, delta=None):
    """Medusa's typical-acceptance threshold (arXiv 2401.10774 §2.3.1), in plain Python:
    min(epsilon, delta * exp(-H(p))), delta = sqrt(epsilon) by default (Medusa's 0.09 and 0.3)."""
    import math
    delta = math.sqrt(epsilon) if delta is None else delta
    entropy = -sum(q * math.log(q) for q in probs if q > 0)
    return min(epsilon, delta * math.exp(-entropy))


# (distribution, temperature, epsilon, drafted token, accepted?) -- the answers worked out by hand
TYPICAL_CASES = [
    ([0.5, 0.3, 0.15, 0.05], 1.0, 0.09, 2, True),  # H = 1.14: threshold min(0.09, 0.3 e^-H = 0.096) = 0.09
    ([0.5, 0.3, 0.15, 0.05], 1.0, 0.09, 3, False),  # 0.05 < 0.09
    ([0.06] + [0.94 / 15] * 15, 1.0, 0.09, 0, True),  # flat, H = 2.77: threshold 0.3 e^-H = 0.019 < 0.06
    ([0.01] + [0.99 / 15] * 15, 1.0, 0.09, 0, False),  # flat too: 0.01 < 0.019
    ([0.88, 0.06, 0.06], 1.0, 0.09, 1, False),  # the same 0.06, but H = 0.45: threshold 0.09
    ([0.85, 0.15], 1.0, 0.09, 1, True),  # H = 0.42: threshold min(0.09, 0.197) = 0.09 < 0.15
    ([0.85, 0.15], 1.0, 0.2, 1, False),  # epsilon 0.2 (delta sqrt(0.2)): min(0.2, 0.293) = 0.2 > 0.15
    ([0.6, 0.3, 0.1], 1.0, 0.09, 2, True),  # 0.1 > 0.09
    ([0.6, 0.3, 0.1], 0.5, 0.09, 2, False),  # at T = 0.5 p becomes (0.78, 0.20, 0.022): 0.022 < 0.09
    ([0.6, 0.3, 0.1], 2.0, 0.09, 2, True),  # at T = 2 p becomes (0.47, 0.33, 0.19)
]


@pytest.mark.parametrize("probs,temperature,epsilon,token,accepted", TYPICAL_CASES)
def test_typical_acceptance_rule_on_hand_made_distributions(probs, temperature, epsilon, token, accepted):
    """A node is accepted iff p_parent(token) > min(epsilon, delta exp(-H(p_parent))), p at the temperature."""
    from mtp.decode.accept import accept_typical
    logits = torch.log(torch.tensor(probs, dtype=torch.float64))
    p = (logits / temperature).softmax(-1).tolist()
    assert (p[token] > _typical_threshold(p, epsilon)) == accepted  # the hand-worked answer, checked
    full = torch.stack([logits, torch.zeros_like(logits)])[None]  # (1, root + 1 node, V)
    draft = Draft(torch.tensor([[token]]), torch.tensor([[-1]]), torch.ones(1, 1, dtype=torch.bool))
    acc = accept_typical(full, draft, Sampling(temperature=temperature), epsilon=epsilon,
                         generator=torch.Generator().manual_seed(0))
    assert int(acc.length[0]) == (2 if accepted else 1)
    assert acc.path[0].tolist() == ([0, 1] if accepted else [0])


def test_typical_acceptance_rule_on_random_distributions():
    """Every token of many random distributions (sharp and flat): accepted iff above its threshold."""
    from mtp.decode.accept import accept_typical
    g = torch.Generator().manual_seed(0)
    v, rows = 12, 40
    scale = torch.linspace(0.2, 4.0, rows, dtype=torch.float64)[:, None]  # from flat to sharp
    base = torch.randn(rows, v, generator=g, dtype=torch.float64) * scale
    for temperature in (1.0, 0.7):
        for epsilon in (0.09, 0.3):
            # row r, token t: a one-node draft carrying t below a root whose logits are base[r]
            logits = torch.zeros(rows * v, 2, v, dtype=torch.float64)
            logits[:, 0] = base.repeat_interleave(v, 0)
            tokens = torch.arange(v).repeat(rows)[:, None]
            draft = Draft(tokens, torch.full_like(tokens, -1), torch.ones_like(tokens, dtype=torch.bool))
            acc = accept_typical(logits, draft, Sampling(temperature=temperature), epsilon=epsilon, generator=g)
            expect = []
            for r in range(rows):
                p = (base[r] / temperature).softmax(-1).tolist()
                thr = _typical_threshold(p, epsilon)
                expect += [q > thr for q in p]
            got = (acc.length == 2).tolist()
            assert got == expect
            assert 0 < sum(expect) < len(expect)  # both outcomes occur


def test_typical_acceptance_stops_at_the_first_rejection_and_takes_the_deepest_accepted_path():
    from mtp.decode.accept import accept_typical
    sharp = torch.log(torch.tensor([0.9, 0.02, 0.02, 0.02, 0.02, 0.02]))  # threshold 0.09: only token 0 passes
    logits = sharp.repeat(1, 8, 1).clone()  # (1, root + 7 nodes, V)
    logits[0, 4] = torch.log(torch.tensor([0.02, 0.9, 0.02, 0.02, 0.02, 0.02]))  # at node 4 only token 1
    # nodes: 1: 0 (root's child, passes)   2: 3 (root's child, fails)
    #        3: 3 under 1 (fails)          4: 0 under 1 (passes)          5: 0 under 2 (passes, parent failed)
    #        6: 0 under 5 (passes, grandparent failed)                    7: 1 under 4 (passes at node 4)
    draft = Draft(torch.tensor([[0, 3, 3, 0, 0, 0, 1]]), torch.tensor([[-1, -1, 0, 0, 1, 4, 3]]),
                  torch.ones(1, 7, dtype=torch.bool))
    acc = accept_typical(logits, draft, Sampling(temperature=0.0))
    assert acc.path[0].tolist() == [0, 1, 4, 7] and int(acc.length[0]) == 4
    assert int(acc.next_root[0]) == 0  # temperature 0: the argmax at the last accepted node (7)
    # the same with node 7's token rejected: the path stops at node 4 and the next root is node 4's argmax
    draft.tokens[0, 6] = 2
    acc = accept_typical(logits, Draft(draft.tokens, draft.parents, draft.valid), Sampling(temperature=0.0))
    assert acc.path[0].tolist() == [0, 1, 4] and int(acc.length[0]) == 3 and int(acc.next_root[0]) == 1
    # a chain whose first node fails accepts nothing, whatever follows
    chain = Draft.chain(torch.tensor([[3, 0, 0]]))
    acc = accept_typical(sharp.repeat(1, 4, 1), chain, Sampling(temperature=0.0))
    assert int(acc.length[0]) == 1 and int(acc.next_root[0]) == 0


def test_union_merges_shared_prefixes_and_keeps_parents_first():
    from mtp.decode.tree import union

    tree = Draft(torch.tensor([[5, 6, 7, 0], [1, 2, 3, 0]]), torch.tensor([[-1, -1, 0, -1], [-1, 0, 1, -1]]),
                 torch.tensor([[True, True, True, False], [True, True, True, False]]))
    chain = Draft.chain(torch.tensor([[5, 7, 9], [4, 4, 4]]), torch.tensor([[True, True, True], [True, False, True]]))
    u = union([tree, chain])
    # row 0: 5, 6, 5>7 from the tree; the chain 5>7>9 shares 5>7 and adds 9 below it
    assert u.tokens[0].tolist() == [5, 6, 7, 9] and u.parents[0].tolist() == [-1, -1, 0, 2]
    assert u.valid[0].all()
    # row 1: the chain stops at its first invalid node, so only 4 is new
    assert u.tokens[1, :4].tolist() == [1, 2, 3, 4] and u.parents[1, :4].tolist() == [-1, 0, 1, -1]
    assert u.depth()[0].tolist() == [1, 1, 2, 3]
    empty = Draft.empty(2, "cpu")
    assert union([empty, empty]).size == 0 and union([empty, chain]) is chain


def test_hybrid_is_sized_from_the_verify_cost(monkeypatch):
    """hybrid's tree is sized like tree's, with the lookup chain's tokens counted in every forward."""
    import mtp.decode.run as run

    flat_then_steep = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 8: 1.0, 10: 3.0, 12: 3.5, 16: 4.0}
    asked = []
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: asked.append(name) or flat_then_steep)
    model = tiny_model("llama", vocab=64)
    dec, info = run.build_decoder(model, Tok(), with_heads(model, n=4), None, "tiny", "hybrid")
    assert asked == ["tiny"] and info.nodes + 1 + info.lookup_draft_len <= 8
    assert "lookup chain included" in info.as_dict()["nodes_from"]



def test_batch_cost_reads_the_curve_at_batch_times_k_tokens():
    from mtp.decode.methods import batch_cost
    cost = {1: 1.0, 2: 1.0, 4: 1.5, 8: 2.5}
    assert batch_cost(cost, 1) is cost
    two = batch_cost(cost, 2)
    assert two == {1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}  # 16 tokens: the last segment (0.25 per token) extended
    assert batch_cost(cost, 3)[1] == pytest.approx(1.25)  # interpolated between 2 and 4



def test_context_cost_grows_draft_tokens_more_than_a_plain_step():
    from mtp.decode.methods import choose_tree, context_bucket, context_cost
    cost = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.2, 32: 2.0}
    growth = {"context": 2048, "g1": 0.1, "g16": 1.0}
    assert context_cost(cost, growth, 256) is cost
    at = context_cost(cost, growth, 2048)
    assert at[1] == pytest.approx(1.1) and at[16] == pytest.approx(2.4) and at[32] == pytest.approx(4.0)
    assert context_cost(cost, growth, 1152)[1] == pytest.approx(1.05)  # half-way: half the growth
    acc = [[0.7, 0.2, 0.05], [0.5, 0.2], [0.4, 0.1], [0.3]]
    steep_with_context = context_cost(cost, {"context": 2048, "g1": 0.1, "g16": 5.0}, 2048)
    assert choose_tree(acc, steep_with_context)[0] < choose_tree(acc, cost)[0]
    assert [context_bucket(n) for n in (300, 767, 768, 1024, 1025, 2080)] == [0, 0, 1024, 1024, 1536, 2560]

def test_drafts_are_resized_for_the_batch_a_call_brings(monkeypatch):
    """Sized from a flat-then-steep curve, a batch of 4 rows gets a smaller tree than one row (4 x its
    tokens per forward), and the output is still plain greedy's for every row."""
    import mtp.decode.run as run

    from mtp.decode.methods import batch_cost

    flat_then_steep = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 8: 1.0, 10: 3.0, 12: 3.5, 16: 4.0}
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: flat_then_steep)
    monkeypatch.setattr(run, "cached_batch_cost", lambda name, backbone, b, cost=None: batch_cost(flat_then_steep, b))
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, n=4)
    dec, info = run.build_decoder(model, Tok(), heads, None, "tiny", "tree")
    one = dec.proposer.tree.size
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    out = dec.generate(prompts, 12, eos_token_ids=[])
    assert dec.proposer.tree.size < one == info.nodes
    plain = SpeculativeDecoder(model, Tok()).generate(prompts, 12, eos_token_ids=[])
    assert [r.tokens for r in out.rows] == [r.tokens for r in plain.rows]
    dec.generate([PROMPTS[0]], 4, eos_token_ids=[])
    assert dec.proposer.tree.size == one  # batch 1 again: its own size
    monkeypatch.setattr(run, "cached_context_growth", lambda name, backbone: {"context": 2048, "g1": 0.0, "g16": 5.0})
    dec.max_context = None  # the tiny model's 512 positions are not a limit of its rotary embedding
    dec.generate([list(range(3, 60)) * 16], 2, eos_token_ids=[])  # a 912-token prompt: sized for 1024
    assert dec.proposer.tree.size < one


def test_prepare_measures_the_context_growth_before_a_long_prompt_comes(monkeypatch):
    """A server's prepare() sizes drafts for the first long-prompt bucket too, so the context-growth curve is
    measured at start-up, never mid-serve when a first long prompt arrives (stalling every running row)."""
    import mtp.decode.run as run

    from mtp.decode.methods import batch_cost

    curve = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 4.0}
    calls = []
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: curve)
    monkeypatch.setattr(run, "cached_batch_cost", lambda name, backbone, b, cost=None: batch_cost(curve, b))
    monkeypatch.setattr(run, "cached_context_growth",
                        lambda name, backbone: calls.append(1) or {"context": 2048, "g1": 0.0, "g16": 5.0})
    model = tiny_model("llama", vocab=64)
    dec, _ = run.build_decoder(model, Tok(), with_heads(model, n=4), None, "tiny", "tree")
    dec.max_context = None  # the tiny model's 512 positions are not a limit of its rotary embedding
    dec.prepare(2)
    assert calls == [1]
    calls.clear()
    dec.generate([list(range(3, 60)) * 16], 2, eos_token_ids=[])  # a 912-token prompt: its bucket is ready
    assert calls == []


def test_a_batch_where_no_draft_pays_is_decoded_plainly(monkeypatch):
    """Sized from a curve where verifying twice the tokens costs more than the best draft saves, a batch of 8
    decodes plainly (a serving batch on a compute-bound device); one row still drafts."""
    import mtp.decode.run as run
    from mtp.decode.proposers import PlainProposer

    from mtp.decode.methods import batch_cost

    steep = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15, 5: 1.2, 6: 1.25, 8: 1.3, 10: 1.4, 12: 1.5, 16: 1.6, 32: 4.0}
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: steep)
    monkeypatch.setattr(run, "cached_batch_cost", lambda name, backbone, b, cost=None: batch_cost(steep, b))
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, n=4)
    dec, _ = run.build_decoder(model, Tok(), heads, None, "tiny", "hybrid")
    assert not isinstance(dec.proposer, PlainProposer)
    prompts = [PROMPTS[i % 3] for i in range(8)]
    out = dec.generate(prompts, 8, eos_token_ids=[])
    assert isinstance(dec.proposer, PlainProposer)
    assert [r.tokens for r in out.rows] == [reference_greedy(model, p, 8) for p in prompts]


def _State(head_logits):
    from mtp.decode.proposers import DraftContext

    b = head_logits.shape[0]
    return DraftContext(batch=b, device=head_logits.device, root=torch.zeros(b, dtype=torch.long),
                        sequences=lambda: [[0]] * b, head_logits=head_logits, draft_depth=head_logits.shape[1])


def test_adaptive_tree_learns_conditional_acceptance_and_resizes():
    """Observed acceptance moves the estimates off the prior, and the tree is rebuilt every `every` steps."""
    from mtp.decode.methods import choose_tree
    from mtp.decode.proposers import AdaptiveTreeProposer
    from mtp.decode.tree import tree_from_accuracy

    cost = {k: 1.0 for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)}
    cost.update({k: 1.0 + 0.5 * k for k in (20, 24, 32, 40, 48, 64)})

    def size(acc):
        return tree_from_accuracy(acc, choose_tree(acc, cost)[0])

    prior = [[0.05] * 10, [0.02] * 10, [0.01] * 10]  # pessimistic: a small tree
    p = AdaptiveTreeProposer(prior, size, every=4, prior_weight=4)
    first = p.tree.size
    vocab = 20
    logits = torch.zeros(2, 3, vocab)
    for d in range(3):
        logits[:, d, 5 + d] = 3.0  # every head's top-1: token 5 + d
    for _ in range(8):
        draft = p.propose(_State(logits))
        assert draft.tokens.shape == (2, p.tree.size)
        p.observe([[5, 6, 7, 9], None])  # row 0: all three heads right at rank 0; row 1 finished
    est = p.estimates()
    assert est[0][0] == pytest.approx((8 + 4 * 0.05) / (8 + 4)) and est[0][1] == pytest.approx(4 * 0.05 / 12)
    assert est[2][0] > 0.6 and p.seen.tolist() == [8, 8, 8]
    assert len(p.sizes) == 3 and p.tree.max_depth == 3  # re-sized twice; now reaches the deepest head
    assert first < p.tree.size or p.tree.paths != size(prior).paths
    # a row that stops short (EOS after one token) is observed only as deep as it got
    p.propose(_State(logits))
    p.observe([[5], [9, 9]])
    assert p.seen.tolist() == [10, 9, 8]


def test_adaptive_methods_reproduce_plain_greedy(monkeypatch):
    """Sizes chosen from the verify cost adapt while decoding, and every output stays plain greedy's."""
    import mtp.decode.run as run
    from mtp.decode.proposers import AdaptiveTreeProposer

    flat = {k: 1.0 for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)}
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: flat)
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, n=3)
    refs = [reference_greedy(model, p, 40) for p in PROMPTS]
    for method in ("blockwise", "tree", "hybrid"):
        dec, info = run.build_decoder(model, Tok(), heads, None, "tiny", method, DraftOptions(adapt=True))
        assert info.adaptive
        out = dec.generate(PROMPTS, max_new_tokens=40, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == refs, method
        sizes = run.adaptive_sizes(dec)
        assert sizes["resizings"] >= 1 and sizes["observed_steps"] > 0
        static, info = run.build_decoder(model, Tok(), heads, None, "tiny", method)
        assert info.adaptive is None and run.adaptive_sizes(static) is None
        assert not isinstance(static.proposer, AdaptiveTreeProposer)


def test_only_the_heads_a_draft_reads_run():
    """A transformer head costs a layer per committed token: heads deeper than the draft are skipped."""
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, "transformer", n=3)
    refs = [reference_greedy(model, p, 20) for p in PROMPTS]
    for proposer, runs in ((blockwise(2), 2), (TreeProposer(compile_tree([(0,), (1,)])), 1),
                           (UnionProposer([blockwise(1), LookupProposer(3)]), 1), (LookupProposer(3), 0),
                           (DynamicTreeProposer(nodes=6, top_k=2), 3)):
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer)
        assert dec.n_run == runs
        out = dec.generate(PROMPTS, max_new_tokens=20, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == refs
        if runs:
            assert dec.head_logits.shape[1] == runs and len(dec.state.head_caches) == runs


def test_sequential_tree_draft_reads_each_nodes_path():
    """With sequential heads a node's token is rank r of head d given the root and its ancestors' tokens."""
    tree = compile_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    calls = []

    def head_top(d, prev, r):  # token = 10 * d + sum of the path + rank (a function of the path, per rank)
        calls.append((d, prev.shape[1], r))
        return 10 * d + prev.sum(-1, keepdim=True) + torch.arange(r)

    root = torch.tensor([1, 2])
    draft = tree.draft_sequential(root, head_top)
    assert calls == [(1, 1, 2), (2, 2, 2), (3, 1, 1)]  # one call per depth, over the distinct parents
    for row, r0 in enumerate(root.tolist()):
        tok = {}
        for path in tree.paths:
            prefix = [r0] + [tok[path[:i]] for i in range(1, len(path))]
            tok[path] = 10 * len(path) + sum(prefix) + path[-1]
        assert draft.tokens[row].tolist() == [tok[p] for p in tree.paths]
    assert draft.parents[0].tolist() == tree.parents.tolist()


def _path_logprobs(d, path, vocab=12):
    """A path-dependent distribution of head d given the tokens before its target (root first)."""
    seed = 1000 * d + sum(int(t) * 31 ** i for i, t in enumerate(path)) % 100003
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log_softmax(-1)


def _draft_paths(draft, row):
    """Each node's token path below the root, in node order."""
    paths = []
    for tok, par in zip(draft.tokens[row].tolist(), draft.parents[row].tolist()):
        paths.append((paths[par] if par >= 0 else ()) + (tok,))
    return paths


def test_sequential_dynamic_tree_is_prefix_closed_and_best_first():
    """EAGLE-2's expand-and-rerank, recomputed by brute force: per depth the top_k best nodes of the previous
    depth are expanded by their top_k children; the draft is the `nodes` best-scoring nodes of the whole pool."""
    top_k, n_nodes, depth = 3, 9, 3

    def head_logprobs(d, prev):  # (B, F, d) -> (B, F, 12), each path's own distribution
        return torch.stack([torch.stack([_path_logprobs(d, p.tolist()) for p in row]) for row in prev])

    ctx = DraftContext(batch=2, device=torch.device("cpu"), root=torch.tensor([3, 4]), sequences=lambda: [[3], [4]],
                       draft_depth=depth, sequential_heads=True, head_logprobs=head_logprobs)
    draft = DynamicTreeProposer(nodes=n_nodes, top_k=top_k).propose(ctx)
    assert draft.tokens.shape == (2, n_nodes)
    for row in range(2):
        parents = draft.parents[row].tolist()
        assert all(p < i for i, p in enumerate(parents))  # parents first, every parent inside the draft
        assert parents.count(-1) >= 1
        root = int(ctx.root[row])
        pool, front = {}, [((), 0.0)]
        for d in range(1, depth + 1):
            cands = []
            for path, score in front:
                val, tok = _path_logprobs(d, (root,) + path).topk(top_k)
                cands += [(path + (t,), score + v) for v, t in zip(val.tolist(), tok.tolist())]
            pool.update(cands)
            front = sorted(cands, key=lambda c: -c[1])[:top_k]
        ranked = sorted(pool, key=lambda path: (-pool[path], len(path)))
        paths = _draft_paths(draft, row)
        assert set(paths) == set(ranked[:n_nodes])  # the best nodes of the pool, no others
        assert min(pool[p] for p in paths) > pool[ranked[n_nodes]]
        assert all(pool[p] <= pool[p[:-1]] for p in paths if len(p) > 1)  # a child never outscores its parent


def test_dynamic_tree_is_best_first():
    """Parallel heads: nodes come out in order of their path's log-probability (highest first), and they are the
    `nodes` best paths over every head's top_k tokens (brute force)."""
    import itertools

    class S:
        head_logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0)) * 2

    top_k, n_nodes = 3, 10
    draft = DynamicTreeProposer(nodes=n_nodes, top_k=top_k).propose(_State(S.head_logits))
    logp = S.head_logits.double().log_softmax(-1)
    for row in range(2):
        top = [logp[row, d].topk(top_k).indices.tolist() for d in range(3)]
        every = [p for n in (1, 2, 3) for p in itertools.product(*top[:n])]

        def score(path, row=row):
            return sum(float(logp[row, d, t]) for d, t in enumerate(path))

        paths = _draft_paths(draft, row)
        scores = [score(p) for p in paths]
        assert scores == sorted(scores, reverse=True)  # best first
        best = sorted(every, key=lambda p: (-score(p), len(p)))[:n_nodes]
        assert set(paths) == set(best)
        assert all(p < i for i, p in enumerate(draft.parents[row].tolist()))


@pytest.mark.parametrize("method", ["blockwise", "tree", "dynamic", "hybrid"])
def test_sequential_heads_through_build_decoder(method, monkeypatch):
    import mtp.decode.run as run

    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: {k: 1.0 for k in (1, 2, 4, 8, 16)})
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, "hydra", n=3)
    refs = [reference_greedy(model, p, 20) for p in PROMPTS]
    dec, _ = run.build_decoder(model, Tok(), heads, None, "tiny", method)
    assert [r.tokens for r in dec.generate(PROMPTS, 20, []).rows] == refs
    with pytest.raises(UserError, match="sequential"):
        run.build_decoder(model, Tok(), heads, None, "tiny", method, DraftOptions(adapt=True))


def test_hybrid_chain_is_longer_on_a_flat_verify_curve():
    from mtp.decode.methods import hybrid_chain_len, make_proposer
    flat = {k: 1.0 + 0.01 * k for k in (1, 2, 4, 8, 16, 32)}
    steep = {k: float(k) for k in (1, 2, 4, 8, 16, 32)}
    assert hybrid_chain_len(flat) == 8 and hybrid_chain_len(steep) == 4 and hybrid_chain_len(None) == 4
    _, info = make_proposer("hybrid", DraftOptions(nodes=3), depth=2, cost=flat)
    assert info.lookup_draft_len == 8
    _, info = make_proposer("hybrid", DraftOptions(nodes=3, draft_len=5), depth=2, cost=flat)  # asked for: kept
    assert info.lookup_draft_len == 5


def test_compare_adaptive_refuses_sequential_heads(tiny_folder, capsys, tmp_path):
    from mtp.backbones import load_backbone
    backbone, _ = load_backbone(str(tiny_folder))
    with_heads(backbone, kind="hydra", n=2).save_pretrained(tmp_path / "hydra")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the quick brown fox"}\n')
    code, _, err = run_cli(["bench", "decode", "--model", str(tiny_folder), "--heads", str(tmp_path / "hydra"),
                            "--prompts", str(prompts), "--methods", "tree", "--compare-adaptive", "--quiet"], capsys)
    # (transformers' own weight-loading bar comes first on stderr; then one error line)
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("mtp: error:")
    assert "sequential" in err.strip().splitlines()[-1]


def test_lookup_continuation_equals_a_plain_scan():
    """The vectorized n-gram match gives what a scan for the latest earlier occurrence gives."""
    import random

    def scan(seq, max_ngram, draft_len):
        for n in range(min(max_ngram, len(seq) - 1), 0, -1):
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start:start + n] == seq[-n:]:
                    return seq[start + n: start + n + draft_len]
        return []

    rng = random.Random(0)
    for trial in range(300):
        seq = [rng.randrange(1 + trial % 7) for _ in range(rng.randrange(1, 40))]
        for max_ngram, draft_len in ((3, 4), (1, 2), (5, 8)):
            assert LookupProposer(draft_len, max_ngram)._continuation(seq) == scan(seq, max_ngram, draft_len), seq


def test_streamer_prints_exactly_the_answer_in_any_chunking():
    """Streamed pieces (decoded a line at a time, not the whole answer per step) join to the decoded answer."""
    import io
    import random

    from mtp.decode.run import Streamer
    from tests.conftest import char_tokenizer

    tok = char_tokenizer(add_bos=False)
    text = "def f(x):\n    return x\n\n  two spaces\n\tand a tab\nend"
    ids = tok(text)["input_ids"]
    rng = random.Random(0)
    for _ in range(20):
        out = io.StringIO()
        streamer, i = Streamer(tok, out), 0
        while i < len(ids):
            n = rng.randrange(1, 5)
            streamer(0, ids[i:i + n])
            streamer(1, [5, 6])  # other rows are not printed
            i += n
        assert out.getvalue() == tok.decode(ids) == text
        assert len(streamer.tokens) <= 1 + len(text.rsplit("\n", 1)[-1])  # only the open line is kept


def test_measurements_are_cached_once_and_a_malformed_entry_is_measured_again(monkeypatch, tmp_path):
    import mtp.decode.methods as methods

    monkeypatch.setenv("MTP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(methods, "verify_cost", lambda backbone, context: calls.append(context) or {1: 1.0, 2: 1.5})
    monkeypatch.setattr(methods, "context_growth", lambda backbone: calls.append("g") or
                        {"context": 2048, "g1": 0.1, "g16": 0.5})
    model = tiny_model("llama")
    assert methods.cached_verify_cost("tiny", model) == {1: 1.0, 2: 1.5}
    assert methods.cached_verify_cost("tiny", model) == {1: 1.0, 2: 1.5}
    assert methods.cached_context_growth("tiny", model)["g16"] == 0.5
    assert methods.cached_context_growth("tiny", model)["g16"] == 0.5
    assert calls == [256, "g"]
    for path in (tmp_path / "verify").iterdir():
        path.write_text('{"context": "x"}' if "context" in path.name else '[1, 2]')
    methods.cached_verify_cost("tiny", model)
    methods.cached_context_growth("tiny", model)
    assert calls == [256, "g", 256, "g"]



def test_in_bfloat16_every_method_is_identical_to_the_plain_loop_bit_for_bit():
    """bfloat16 (the demo's dtype on AMX CPUs): transformers attends one query token in another layout than
    several (grouped queries packed), the two round differently, and a tree verify then picks another token than a
    one-token decode at near-ties (outside prompts, smollm2: hybrid identical to plain for 20-30 %). With each
    query attended alone in float32 over exactly its visible keys (hf_compat.float32_attention, on by default)
    every method's logits at a position are the plain loop's, bit for bit, so every answer is identical."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # smollm2's attention shape (9 query heads of 64 over 3 key-value heads), 2 layers
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))
    model = model.to(torch.bfloat16).eval()
    heads = with_heads(model, "mlp")
    prompts = [PROMPTS[0], PROMPTS[1], [1, 3, 3, 9, 27, 17, 51, 25, 11, 33, 35, 41], [1, 44, 12]]
    plain = SpeculativeDecoder(model, Tok(), proposer=PlainProposer())
    want = [plain.generate([p], max_new_tokens=24, eos_token_ids=[]).rows[0].tokens for p in prompts]
    for name in ("tree", "dynamic", "hybrid"):
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=methods(heads)[name])
        got = [r.tokens for r in dec.generate(prompts, max_new_tokens=24, eos_token_ids=[]).rows]
        assert got == want, name
    # the mechanism: a 4-token causal forward's logits equal four one-token decodes' (bf16, bit for bit)
    from mtp.hf_compat import float32_attention, forward_with_cache, new_cache
    from mtp.model.attention import attention_masks

    ids, extra = torch.tensor([prompts[2]]), torch.tensor([[5, 6, 7, 8]])
    n = ids.shape[1]
    with torch.no_grad(), float32_attention(model):
        def cache():
            c = new_cache()
            forward_with_cache(model, c, ids, use_cache=True)
            return c

        c1, singles = cache(), []
        for j in range(4):
            pos = torch.tensor([[n + j]])
            allowed = torch.ones(1, 1, n + j + 1, dtype=torch.bool)
            mask = attention_masks(model.config, allowed, pos, torch.arange(n + j + 1)[None], model.dtype)
            singles.append(forward_with_cache(model, c1, extra[:, j:j + 1], position_ids=pos, attention_mask=mask,
                                              use_cache=True).logits[0, -1])
        pos = torch.arange(n, n + 4)[None]
        allowed = torch.ones(1, 4, n + 4, dtype=torch.bool).tril(n)
        mask = attention_masks(model.config, allowed, pos, torch.arange(n + 4)[None], model.dtype)
        chunk = forward_with_cache(model, cache(), extra, position_ids=pos, attention_mask=mask,
                                   use_cache=True).logits[0]
    assert torch.equal(torch.stack(singles), chunk)


def test_independent_heads_run_only_when_read_and_their_logits_can_be_read_after_generate():
    """mlp heads keep their inputs after a step and run on the first read of head_logits (a step the speed guard
    decodes plainly costs no head); reading them outside the decoder's inference mode works too."""
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, "mlp")
    dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=blockwise(3))
    dec.generate(PROMPTS[:2], 6, eos_token_ids=[])
    assert dec.state.head_logits is None and dec.state.head_inputs is not None  # not run since the last step
    logits = dec.head_logits
    assert logits.shape[:2] == (2, heads.draft_depth) and dec.state.head_logits is logits
