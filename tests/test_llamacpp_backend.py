"""llama.cpp in-process (mtp.engines.llamacpp_lib): a draft tree verified in one decode, each root-to-leaf path a
sequence. On a tiny random Llama converted by llama.cpp's own converter (smollm2's tokenizer, 2 layers, width
64): the tree's logits are each branch's decoded alone, the accepted path's cache is a fresh prefill's, rows
join and leave. Where llama.cpp is not built these skip, except in CI (MTP_REQUIRE_LLAMA_CPP=1), which builds it."""

import os
import shutil

import numpy as np
import pytest
import torch

from mtp.engines import llamacpp
from mtp.engines.llamacpp_lib import TreeLayout

needs_lib = pytest.mark.skipif(os.environ.get("MTP_REQUIRE_LLAMA_CPP") != "1"
                               and not (llamacpp.library_dir() / "libllama.so").is_file(),
                               reason="llama.cpp's library is not built here (mtp engines setup llama.cpp)")


def test_tree_layout_puts_each_path_in_a_sequence_in_level_order():
    # root 0; nodes 1..5 with draft parents (-1 = root): 1<-root, 2<-root, 3<-1, 4<-1, 5<-3; node 5 listed first
    lay = TreeLayout(parents=[2, -1, -1, 0, 0], valid=[True, True, True, True, True])
    # query indices: q1 (parent q3), q2 (root), q3 (root), q4 (q1), q5 (q1)
    assert lay.depth == [0, 2, 1, 1, 3, 3]
    assert sorted(lay.leaves) == [2, 4, 5] and lay.n_paths == 3
    assert lay.order[0] == 0 and [lay.depth[j] for j in lay.order] == sorted(lay.depth)
    assert sorted(lay.paths[0]) == [0, 1, 2] and len(lay.paths[3]) == 2 and len(lay.paths[2]) == 1  # q3 above q4, q5
    parent_q = [0, 3, 0, 0, 1, 1]
    for j in range(6):  # the path chosen for a node runs through it: its leaf lies below it
        k = lay.leaves[lay.path_through(j)]
        while k != j and k != 0:
            k = parent_q[k]
        assert k == j
    # padding left out, and a node whose only child is padding becomes a leaf
    lay = TreeLayout(parents=[-1, 0, 0], valid=[True, True, False])
    assert lay.order == [0, 1, 2] and lay.leaves == [2] and lay.n_paths == 1


def _tiny_llama(folder, embedding_scale: float = 1.0):
    """A 2-layer random Llama with smollm2's vocabulary and tokenizer files, saved to ``folder`` (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtp.backbones import local_model_folder

    src = local_model_folder("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embedding_scale)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer random Llama with smollm2's vocabulary and tokenizer, converted to f32 GGUF by llama.cpp."""
    from mtp.engines.targets import convert_target

    # embeddings x20: sharper logits than a random init's near-uniform ones
    folder = _tiny_llama(tmp_path_factory.mktemp("tiny-smol"), embedding_scale=20.0)
    return convert_target(folder, folder / "model.gguf", "f32")


def _ctx(gguf, **kw):
    from mtp.engines.llamacpp_lib import LlamaContext

    return LlamaContext(gguf, n_ctx=512, n_seq=16, n_batch=128, threads=2, **kw)


PREFIX = [1, 504, 3326, 28, 253, 1789, 30, 216, 1116, 1093, 11, 314, 17023]


@needs_lib
def test_a_tree_verified_in_one_decode_gives_each_branch_its_own_logits(tiny_gguf):
    from mtp.engines.llamacpp_lib import RowCache

    # a tree below root token 88: two branches from the root, one of them forked
    tokens = [88, 400, 401, 402, 403, 404]
    parents = [-1, -1, 0, 0, 2]  # q1, q2 <- root; q3, q4 <- q1; q5 <- q3
    with _ctx(tiny_gguf) as ctx:
        rows = RowCache(ctx)
        rows.add_rows([PREFIX])
        tree, _ = rows.verify([tokens], [parents], [[True] * 5])
    for branch in ([0, 1, 3, 5], [0, 1, 4], [0, 2]):
        with _ctx(tiny_gguf) as ctx:
            alone = RowCache(ctx)
            alone.add_rows([PREFIX])
            chain, _ = alone.verify([[tokens[j] for j in branch]], [list(range(-1, len(branch) - 2))],
                                    [[True] * (len(branch) - 1)])
        np.testing.assert_allclose(tree[0, branch], chain[0], rtol=1e-3, atol=2e-3)


@needs_lib
def test_the_accepted_path_leaves_the_cache_of_a_fresh_prefill(tiny_gguf):
    from mtp.engines.llamacpp_lib import RowCache

    tokens = [88, 400, 401, 402, 403, 404]
    parents = [-1, -1, 0, 0, 2]
    for accepted in ([0, 2], [0, 1, 3, 5], [0, 1, 4], [0]):
        with _ctx(tiny_gguf) as ctx:
            rows = RowCache(ctx)
            rows.add_rows([PREFIX])
            rows.verify([tokens], [parents], [[True] * 5])
            rows.commit({0: accepted})
            assert rows.past == [len(PREFIX) + len(accepted)]
            assert ctx.seq_pos_max(rows.base[0]) == len(PREFIX) + len(accepted) - 1
            assert all(ctx.seq_pos_max(s) == -1 for s in range(16) if s not in (rows.base[0], rows.trash))  # spares freed
            after, _ = rows.verify([[77, 78]], [[-1]], [[True]])
        with _ctx(tiny_gguf) as ctx:
            fresh = RowCache(ctx)
            fresh.add_rows([PREFIX + [tokens[j] for j in accepted]])
            want, _ = fresh.verify([[77, 78]], [[-1]], [[True]])
        np.testing.assert_allclose(after, want, rtol=1e-3, atol=2e-3)


@needs_lib
def test_a_prompt_is_decoded_as_llamacpps_own_prompt_processing_decodes_it(tiny_gguf):
    """The whole prompt in one decode, its last token the only output, as llama-server and llama-cli decode it; the
    states heads read come from a second decode of the last token in a spare sequence, whose cell is kept (dropped)
    and never seen by the row. Decoding the last prompt token on its own instead rounded its keys and values
    through the one-token kernels: with qwen2.5-coder-0.5b's Q4_K_M weights the next logits were off by 0.24 and
    6 of 12 greedy answers differed from llama-server's."""
    from mtp.engines.llamacpp_lib import RowCache

    prompts = [PREFIX, PREFIX[:5] + [900, 901]]
    with _ctx(tiny_gguf) as ctx:  # llama.cpp's own: the prompts in one decode, then one token each
        want_first, _ = ctx.decode([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
                                   [s for s, p in enumerate(prompts) for _ in p],
                                   [i == len(p) - 1 for p in prompts for i in range(len(p))])
        want_next, _ = ctx.decode([77, 77], [len(p) for p in prompts], [0, 1])
    with _ctx(tiny_gguf) as ctx:
        for p in prompts:  # states of every position, for comparison: the last one is what the heads read
            ctx.capture((1, ctx.n_layer))
            _, every = ctx.decode(p, list(range(len(p))), [15] * len(p))
            ctx.seq_rm(15)
        ctx.capture(())
        calls = []
        decode = ctx.decode

        def recording(tokens, positions, seqs, outputs=None):
            calls.append((len(tokens), outputs, ctx.captured))
            return decode(tokens, positions, seqs, outputs)

        ctx.decode = recording
        rows = RowCache(ctx)
        first, states = rows.add_rows(prompts, layers=(1, ctx.n_layer))
        prompt_call = calls[0]
        assert prompt_call[0] == sum(map(len, prompts)) and prompt_call[2] == ()
        assert [i for i, o in enumerate(prompt_call[1]) if o] == [len(prompts[0]) - 1, sum(map(len, prompts)) - 1]
        assert calls[1] == (2, None, (1, ctx.n_layer)) and len(calls) == 2  # the states: the last tokens again
        assert rows.dropped == 2 and ctx.seq_pos_max(rows.trash) == max(map(len, prompts)) - 1
        assert all(ctx.seq_pos_max(s) == len(p) - 1 for s, p in zip(rows.base, prompts))
        nxt, _ = rows.verify([[77], [77]], [[], []], [[], []])
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(nxt[:, 0], want_next)
    np.testing.assert_allclose(states[1][1], every[1][-1], rtol=1e-4, atol=1e-4)


@needs_lib
def test_rows_of_a_batch_verify_together_join_and_leave(tiny_gguf):
    from mtp.engines.llamacpp_lib import RowCache

    prompts = [PREFIX, PREFIX[:5] + [900, 901], PREFIX[3:]]
    # each row alone: prefill, a two-branch tree, accept a path, one more step
    trees = [([88, 400, 401], [-1, -1], [0, 2]), ([5, 6, 7], [-1, 0], [0, 1, 2]), ([9, 10, 11], [-1, -1], [0])]
    alone = []
    for p, (tok, par, acc) in zip(prompts, trees):
        with _ctx(tiny_gguf) as ctx:
            rows = RowCache(ctx)
            first, _ = rows.add_rows([p])
            rows.verify([tok], [par], [[True] * len(par)])
            rows.commit({0: acc})
            nxt, _ = rows.verify([[42, 43]], [[-1]], [[True]])
            alone.append((first[0], nxt[0]))
    with _ctx(tiny_gguf) as ctx:
        rows = RowCache(ctx)
        first01, _ = rows.add_rows(prompts[:2])
        width = max(len(t[0]) for t in trees)
        tok = [t[0] + [0] * (width - len(t[0])) for t in trees[:2]]
        par = [t[1] + [-1] * (width - 1 - len(t[1])) for t in trees[:2]]
        rows.verify(tok, par, [[True] * len(t[1]) for t in trees[:2]])
        rows.commit({0: trees[0][2], 1: trees[1][2]})
        first2, _ = rows.add_rows([prompts[2]])  # a row joins between steps
        rows.verify([tok[0], tok[1], trees[2][0]], [par[0], par[1], trees[2][1]], [[True, True]] * 3, rows=[2])
        rows.commit({2: trees[2][2]})
        rows.keep_rows([2, 0])  # row 1 leaves; the others go on in a new order
        nxt, _ = rows.verify([[42, 43], [42, 43]], [[-1], [-1]], [[True], [True]])
    np.testing.assert_allclose(first01, np.stack([alone[0][0], alone[1][0]]), rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(first2[0], alone[2][0], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(nxt[0], alone[2][1], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(nxt[1], alone[0][1], rtol=1e-3, atol=2e-3)


@needs_lib
def test_a_joining_prompt_reads_the_cells_of_the_prefix_it_shares_with_a_running_row(tiny_gguf):
    """--prompt-cache: the shared prefix is not computed again (only the rest is decoded), the row's logits are
    those of its own whole prefill, and it decodes on after the row it shared with has left."""
    from mtp.engines.llamacpp_lib import RowCache

    a, b, c = PREFIX + [900, 901], PREFIX + [902, 903, 904], PREFIX[:3] + [905]
    alone = {}
    for name, p in (("b", b), ("c", c)):
        with _ctx(tiny_gguf) as ctx:
            rows = RowCache(ctx)
            first, _ = rows.add_rows([p])
            nxt, _ = rows.verify([[42, 43]], [[-1]], [[True]])
            alone[name] = (first[0], nxt[0])
    with _ctx(tiny_gguf) as ctx:
        rows = RowCache(ctx)
        rows.share_prefix = 4
        rows.add_rows([a])
        decoded = []
        decode = ctx.decode
        ctx.decode = lambda tokens, *args, **kw: decoded.append(len(tokens)) or decode(tokens, *args, **kw)
        first_b, _ = rows.add_rows([b])
        assert decoded == [3] and rows.shared_tokens == len(PREFIX)  # only b's own three tokens
        first_c, _ = rows.add_rows([c])  # 3 tokens in common: shorter than share_prefix, computed whole
        assert decoded == [3, 4] and rows.shared_tokens == len(PREFIX)
        rows.keep_rows([1])  # a leaves: b keeps the cells it reads
        nxt, _ = rows.verify([[42, 43]], [[-1]], [[True]])
    np.testing.assert_allclose(first_b[0], alone["b"][0], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(first_c[0], alone["c"][0], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(nxt[0], alone["b"][1], rtol=1e-3, atol=2e-3)
    with _ctx(tiny_gguf) as ctx:  # a sliding-window model may have overwritten a running row's first cells
        ctx.shares_prefixes = False
        rows = RowCache(ctx)
        rows.share_prefix = 4
        rows.add_rows([a])
        rows.add_rows([b])
        assert rows.shared_tokens == 0


def _greedy_alone(gguf, prompt, n):
    """llama.cpp's own plain greedy decoding: one token per decode, argmax of its logits."""
    from mtp.engines.llamacpp_lib import RowCache

    with _ctx(gguf) as ctx:
        rows = RowCache(ctx)
        logits, _ = rows.add_rows([prompt])
        out = [int(logits[0].argmax())]
        while len(out) < n:
            step, _ = rows.verify([[out[-1]]], [[]], [[]])
            rows.commit({0: [0]})
            out.append(int(step[0, 0].argmax()))
    return out


@needs_lib
@pytest.mark.parametrize("method", ["plain", "lookup"])
def test_the_decoder_on_llamacpp_is_llamacpps_plain_greedy(tiny_gguf, method):
    """SpeculativeDecoder with llama.cpp as its backbone: every row's greedy output is llama.cpp's own one-token
    greedy decoding, for a batch of rows and rows that join a running batch and leave it."""
    from mtp.backbones import load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.engine import Request
    from mtp.decode.executors.llamacpp import LlamaCppBackbone
    from mtp.decode.run import build_llama_decoder
    from transformers import AutoConfig

    folder = tiny_gguf.parent
    target = LlamaCppBackbone(tiny_gguf, AutoConfig.from_pretrained(folder), n_ctx=1024, threads=2)
    try:
        decoder, _ = build_llama_decoder(target, load_tokenizer(folder), method, DraftOptions(draft_len=4))
        prompts = [PREFIX, PREFIX[:5] + [900, 901, 902, 900, 901], PREFIX[3:] * 2]
        want = [_greedy_alone(tiny_gguf, p, 24) for p in prompts]
        out = decoder.generate(prompts, 24, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == want
        if method == "lookup":  # drafts were verified, and some accepted (random models repeat themselves)
            assert out.verify_tokens > out.verify_forwards and any(max(r.accepted) > 1 for r in out.rows)
        # continuous batching: two rows, a step, a third joins, the first leaves
        with decoder.session():
            decoder.reset()
            decoder.add([Request(list(prompts[0]), 24), Request(list(prompts[1]), 24)])
            decoder.step()
            decoder.add([Request(list(prompts[2]), 24)])
            decoder.drop([0])
            while not all(decoder.done):
                decoder.step()
            got = [r.tokens for r in decoder.results]
        assert got == want[1:]
        if method == "lookup":  # a decoder built after another decoded (its rows left): its length from the curve,
            # which is measured now, with the context to itself; the guard on; the same output
            sized, info = build_llama_decoder(target, load_tokenizer(folder), "lookup",
                                              DraftOptions(guard=True, bit_exact=False))
            assert info.as_dict().get("draft_len_from", "").startswith("verify cost") and sized.guard is not None
            assert [r.tokens for r in sized.generate(prompts, 24, eos_token_ids=[]).rows] == want
    finally:
        target.close()


@needs_lib
def test_a_batchs_verify_curve_is_measured_with_the_context_to_itself_and_resumed_rows_decode_on(tiny_gguf):
    """verify_curve for B rows at once (what drafts for a batch are sized from) leaves no row and no cell behind;
    with rows running it is not measured (cached_batch_curve: None, the decoder keeps one row's sizes). A row
    resumed from the tokens it already produced (Request.generated, what the server does after a failed step)
    goes on exactly as the row would have."""
    from mtp.backbones import load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.engine import Request
    from mtp.decode.executors.llamacpp import LlamaCppBackbone, cached_batch_curve, verify_curve
    from mtp.decode.run import build_llama_decoder
    from transformers import AutoConfig

    folder = tiny_gguf.parent
    target = LlamaCppBackbone(tiny_gguf, AutoConfig.from_pretrained(folder), n_ctx=2048, threads=2)
    try:
        curve = verify_curve(target, points=(1, 2, 4), repeats=1, warmup=0, batch=2)
        assert set(curve) == {1, 2, 4} and all(t > 0 for t in curve.values())
        assert target.rows.rows == 0 and target.rows.dropped == 0
        decoder, _ = build_llama_decoder(target, load_tokenizer(folder), "plain", DraftOptions())
        want = _greedy_alone(tiny_gguf, PREFIX, 20)
        with decoder.session():
            decoder.reset()
            decoder.add([Request(list(PREFIX), 20)])
            assert cached_batch_curve(target, 4, {1: 1.0}) is None  # rows running, nothing cached: not measured
            decoder.reset()
            decoder.add([Request(list(PREFIX), 20, generated=tuple(want[:7]))])
            while not all(decoder.done):
                decoder.step()
            assert decoder.results[0].tokens == want
    finally:
        target.close()


@pytest.mark.parametrize("flags, message", [
    (["--method", "early-exit"], "needs --backend torch"),
    (["--target", "q5_k"], "--target"),
])
def test_what_the_llamacpp_backend_does_not_run_is_refused_in_one_line(capsys, monkeypatch, flags, message):
    from tests.conftest import one_line_error
    import mtp.decode.run as run

    # refused before llama.cpp or the model loads (a stub stands for them where the check comes after)
    monkeypatch.setattr(run, "load_llama_target", lambda *a, **k: (None, None))
    one_line_error(capsys, ["generate", "--model", "smollm2-135m", "--backend", "llama.cpp", *flags, "hi"], message)


@needs_lib
@pytest.mark.parametrize("kind, method", [("hydra", "tree"), ("mlp", "blockwise"), ("hydra", "hybrid"),
                                          ("transformer", "tree"), ("eagle3", "tree"), ("eagle3", "hybrid")])
def test_heads_draft_on_llamacpps_states_and_the_output_is_its_plain_greedy(tiny_gguf, tmp_path, kind, method):
    """Heads in PyTorch on the states llama.cpp returns (the last layer's output before the final norm, recorded
    by mtp's source fix; EAGLE-3's three layers' inputs; every prompt position for transformer heads and EAGLE-3):
    trees verified in one decode, output llama.cpp's own greedy, rows in a batch."""
    from mtp.backbones import load_backbone, load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.executors.llamacpp import LlamaCppBackbone
    from mtp.decode.run import build_llama_decoder
    from mtp.model.mtp import HeadsConfig, MTPModel

    folder = tiny_gguf.parent
    backbone, _ = load_backbone(str(folder))
    torch.manual_seed(1)
    extra = {"eagle_layers": [0, 1, 2]} if kind == "eagle3" else {}
    mtp_model = MTPModel(backbone, HeadsConfig(backbone=str(folder), n_heads=3, kind=kind, **extra)).eval()
    with torch.no_grad():  # heads that draft something other than the identity's guess
        for p in mtp_model.heads.parameters():
            p.normal_(0, 0.02)
    target = LlamaCppBackbone(tiny_gguf, backbone.config, n_ctx=1024, threads=2)
    try:
        opts = DraftOptions(nodes=6, draft_len=3, draft_vocab=0)
        decoder, _ = build_llama_decoder(target, load_tokenizer(folder), method, opts, mtp_model, None)
        prompts = [PREFIX, PREFIX[3:] * 2]
        out = decoder.generate(prompts, 20, eos_token_ids=[])
        assert [r.tokens for r in out.rows] == [_greedy_alone(tiny_gguf, p, 20) for p in prompts]
        assert out.verify_tokens > out.verify_forwards  # drafts were verified
        # the states the heads read are the PyTorch model's at the same layer (f32 GGUF: equal up to rounding)
        with decoder.session():
            decoder.reset()
            from mtp.decode.engine import Request
            decoder.add([Request(list(PREFIX), 4)])
            got = decoder.state.seq_states[0][0] if decoder.state.seq_states is not None else None
        from mtp.model.trunk import capture_hidden
        with torch.no_grad(), capture_hidden(backbone, mtp_model.tapped) as taps:
            backbone(torch.tensor([PREFIX]))
        want = taps[mtp_model.tapped[0]][0, -1]
        if got is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=2e-3)
    finally:
        target.close()


@pytest.mark.real
@needs_lib
def test_accepting_a_later_branch_keeps_the_cache_exact_on_a_real_model():
    """smollm2-135m's packaged Q4_1 file: root + two siblings, the second accepted, then the next step. Freeing the
    rejected sibling let the next token land in its cell, before the accepted one, and llama.cpp's CPU attention
    then gave logits off by 0.67 (RowCache keeps dropped cells taken). Exact equality: the kernels here are
    batch-invariant (a chain and one-token decodes agree bit for bit)."""
    from mtp.engines.llamacpp_lib import LlamaContext, RowCache
    from mtp.engines.targets import target_gguf

    gguf = target_gguf("smollm2-135m")
    base = PREFIX * 4
    with LlamaContext(gguf, n_ctx=512, n_seq=16, n_batch=128, threads=2) as ctx:
        rows = RowCache(ctx)
        rows.add_rows([base])
        rows.verify([[359, 28, 253, 5356]], [[-1, -1, 1]], [[True] * 3])
        rows.commit({0: [0, 2]})
        got, _ = rows.verify([[1502, 5]], [[-1]], [[True]])
    with LlamaContext(gguf, n_ctx=512, n_seq=16, n_batch=128, threads=2) as ctx:
        fresh = RowCache(ctx)
        fresh.add_rows([base + [359, 253]])
        want, _ = fresh.verify([[1502, 5]], [[-1]], [[True]])
    np.testing.assert_array_equal(got, want)


@needs_lib
def test_a_server_on_llamacpp_queues_rows_its_cells_cannot_hold_yet_and_refuses_what_never_fits(tiny_gguf):
    """``mtp serve --backend llama.cpp``: a request holds its prompt + max tokens of llama.cpp's cells while it runs;
    more requests than the cells hold wait in the queue (no 400) and finish with llama.cpp's own greedy tokens;
    a request larger than the whole context is a 400 at once. Dropped tree cells are freed as they pass
    ``max_dropped`` while rows keep running."""
    import asyncio

    from mtp.backbones import load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.engine import Request
    from mtp.decode.executors.llamacpp import LlamaCppBackbone
    from mtp.decode.run import build_llama_decoder
    from mtp.serve.scheduler import Job, Scheduler
    from transformers import AutoConfig

    folder = tiny_gguf.parent
    target = LlamaCppBackbone(tiny_gguf, AutoConfig.from_pretrained(folder), n_ctx=512, threads=2)
    target.rows.max_dropped = 8
    decoder, _ = build_llama_decoder(target, load_tokenizer(folder), "lookup", DraftOptions(draft_len=4))
    sched = Scheduler(decoder, max_batch=4, max_queue=8)
    prompts = [PREFIX, PREFIX[5:] + [900, 901, 902, 900, 901], PREFIX[3:] * 2]
    widest, step = [], decoder.step
    decoder.step = lambda *a, **k: (widest.append(len(decoder.requests)), step(*a, **k))[1]
    ns = [60, 120, 120]  # each row holds its prompt + n + 64 cells: two fit in 512, the third waits

    async def events(job):
        out = []
        while True:
            kind, value = await asyncio.wait_for(job.queue.get(), 120)
            out.append((kind, value))
            if kind != "tokens":
                return out

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(Request(list(p), n, frozenset()), loop, 120.0) for p, n in zip(prompts, ns)]
        too_big = Job(Request(list(PREFIX), 600, frozenset()), loop, 120.0)
        sched.start()
        for j in jobs + [too_big]:
            sched.submit(j)
        return [await events(j) for j in jobs], await events(too_big)

    try:
        results, refused = asyncio.run(main())
        compactions = target.rows.compactions
    finally:
        sched.stop()
        target.close()
    assert max(widest) == 2 and compactions >= 1  # the third waited for a row; dropped cells were freed
    for p, n, evs in zip(prompts, ns, results):
        assert evs[-1] == ("done", "length"), evs[-1]
        assert [t for kind, v in evs if kind == "tokens" for t in v] == _greedy_alone(tiny_gguf, p, n)
    kind, error = refused[-1]
    assert kind == "error" and error.status == 400 and "context holds 512" in error.message, error.message


@needs_lib
def test_bench_decode_and_bench_context_run_on_llamacpp(tiny_gguf, tmp_path):
    """``--backend llama.cpp`` in the benchmarks: our plain loop on llama.cpp is the baseline and the reference of
    identity (no transformers model there); a method's rows decode with it; context growth is measured on it."""
    import json

    from mtp.io import cache_dir

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in
                               ["def add(a, b): return a + b\n" * 3, "the cat sat on the mat. " * 4, "1, 2, 3, 4, 5,"]))
    folder = str(tiny_gguf.parent)
    targets = cache_dir("engines", "targets")
    before = set(targets.glob(f"{tiny_gguf.parent.name}-*"))
    try:
        _bench_decode_and_context_on_llamacpp(folder, prompts, tmp_path)
    finally:  # the f32 conversion the benchmarks made of this temporary folder in the user cache goes with it
        for made in set(targets.glob(f"{tiny_gguf.parent.name}-*")) - before:
            shutil.rmtree(made, ignore_errors=True)


def _bench_decode_and_context_on_llamacpp(folder, prompts, tmp_path):
    from mtp.bench.context import bench_context, format_bench_context
    from mtp.bench.decode import bench_decode, format_bench_decode
    from mtp.config import BenchContextConfig, BenchDecodeConfig

    r = bench_decode(BenchDecodeConfig(model=folder, backend="llama.cpp", target="f32", methods=["lookup"],
                                       prompts=str(prompts), limit=3, max_new_tokens=12, batch_size=2, chat=False))
    assert r["backend"] == "llama.cpp" and list(r["methods"]) == ["plain", "lookup"]
    assert r["methods"]["lookup"]["identical_share"] == 1.0 and r["methods"]["plain"]["speedup"] == 1.0
    assert "llama.cpp threads" in format_bench_decode(r) and "GGUF f32" in format_bench_decode(r)
    doc = tmp_path / "long.txt"
    doc.write_text("def mean(values):\n    return sum(values) / len(values)\n" * 12)
    c = bench_context(BenchContextConfig(model=folder, backend="llama.cpp", target="f32", data=str(doc),
                                         methods=["plain", "lookup"], contexts=[16, 64], max_new_tokens=6, rounds=1))
    assert list(c["methods"]) == ["plain", "lookup"] and [row["context"] for row in c["methods"]["plain"]["rows"]] \
        == [16, 64]
    assert "llama.cpp threads" in format_bench_context(c)


def test_backend_auto_picks_the_backend_measured_faster_and_torch_where_llamacpp_cannot_run(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import mtp.decode.run as run
    from mtp.engines import llamacpp

    built = tmp_path / "bin"
    built.mkdir()
    (built / "libllama.so").write_bytes(b"")
    monkeypatch.setattr(llamacpp, "library_dir", lambda: built)
    times = {"torch": 0.020, "llama.cpp": 0.008, "torch_dtype": "float32"}
    monkeypatch.setattr(run, "cached_backend_times", lambda model, target, dtype: dict(times))

    def opts(**kw):
        return SimpleNamespace(**{"backend": "auto", "device": "cpu", "dtype": "float32", "target": "packaged", **kw})

    said = []
    assert run.resolve_backend(opts(), "smollm2-135m", ["tree"], said.append) == "llama.cpp"
    assert "8.0 ms on llama.cpp" in said[0] and "20.0 ms on PyTorch float32" in said[0]
    times.update(torch=0.005)
    assert run.resolve_backend(opts(), "smollm2-135m", ["tree"]) == "torch"  # measured slower: torch
    times.update(torch=0.020)
    assert run.resolve_backend(opts(backend="torch"), "smollm2-135m", ["tree"]) == "torch"  # as given
    assert run.resolve_backend(opts(backend="llama.cpp"), str(tmp_path), ["tree"]) == "llama.cpp"
    for reason in (dict(dtype="bfloat16"), dict(device="cuda")):  # a PyTorch precision, a GPU
        assert run.resolve_backend(opts(**reason), "smollm2-135m", ["tree"]) == "torch", reason
    assert run.resolve_backend(opts(), str(tmp_path), ["tree"]) == "torch"  # not built in: no GGUF of it
    assert run.resolve_backend(opts(), "smollm2-135m", ["early-exit"]) == "torch"
    assert run.resolve_backend(opts(max_batch=64), "smollm2-135m", ["tree"]) == "torch"  # more rows than a context
    # the command line resolves --backend auto before --dtype auto (which would then read as bfloat16 asked for)
    import mtp.backbones as backbones
    from mtp.cli import _resolve_auto
    from mtp.config import GenerateConfig

    monkeypatch.setattr(backbones, "resolve_dtype", lambda *a, **kw: "bfloat16")
    cfg = _resolve_auto(GenerateConfig(prompt="hi", dtype="auto", method="plain", quiet=True))
    assert (cfg.backend, cfg.dtype) == ("llama.cpp", "bfloat16")
    (built / "libllama.so").unlink()
    assert run.resolve_backend(opts(), "smollm2-135m", ["tree"]) == "torch"  # llama.cpp not built


def _one_by_one(rows, n: int, tokens: list[int]) -> np.ndarray:
    """Logits of ``tokens`` decoded one per decode after the row's first ``n`` tokens; the cells are freed again."""
    out = []
    for t in tokens:
        step, _ = rows.verify([[t]], [[]], [[]])
        rows.commit({0: [0]})
        out.append(step[0, 0])
    rows.ctx.seq_rm(rows.base[0], n)
    rows.past[0] = n
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_q4_1(tmp_path_factory):
    """A 2-layer random Llama (default init: attention spread over many keys, so the order of its sums shows) in
    Q4_1 made by llama-quantize: weights whose kernels take each row alone, so a batch's matmuls are exact."""
    from mtp.engines.llamacpp import quantize
    from mtp.engines.targets import convert_target

    folder = _tiny_llama(tmp_path_factory.mktemp("tiny-q4_1"))
    return quantize(convert_target(folder, folder / "model.gguf", "f32"), folder / "q4_1.gguf", "q4_1")


@needs_lib
def test_a_verify_past_512_cells_computes_what_one_token_decodes_compute(tiny_q4_1):
    """From a 512-cell KV view (300 cells used) llama.cpp splits a lone query's keys across its threads; the source
    fix fa-split-kv-every-row splits each query of a small batch alike, so a verify's logits are bit for bit those
    of one-token decodes there as below 256 cells (without the fix they differ by ~5e-3 at 300 cells on this model).
    exact_width measures the widest such verify (Q4_1: every width tried) and leaves the context empty."""
    from mtp.decode.executors.llamacpp import LlamaCppBackbone, exact_width
    from mtp.engines.llamacpp_lib import LlamaContext, RowCache

    follow = [88, 400, 401, 402]
    with LlamaContext(tiny_q4_1, n_ctx=1024, n_seq=16, n_batch=512, threads=2) as ctx:
        for n in (40, 300, 600):
            rows = RowCache(ctx)
            rows.add_rows([(PREFIX * 50)[:n]])
            want = _one_by_one(rows, n, follow)
            got, _ = rows.verify([follow], [[-1, 0, 1]], [[True] * 3])
            np.testing.assert_array_equal(got[0], want)
            rows.keep_rows([])
    target = LlamaCppBackbone(tiny_q4_1, None, n_ctx=1024, threads=2)
    try:
        assert exact_width(target, max_k=6) == 6
        assert target.rows.rows == 0 and target.rows.dropped == 0
    finally:
        target.close()


@needs_lib
def test_bit_exact_lookup_drafts_within_the_exact_width_and_answers_as_plain_decoding(tiny_gguf, monkeypatch):
    """--bit-exact: lookup's drafts are cut at the measured exact width (here forced to 3: at most 2 drafted tokens
    a step), its answers are one-token greedy decoding's; a width of 1 decodes plainly; a longer --draft-len, a
    method with heads and the torch backend are refused in one line. On by default for greedy lookup."""
    import mtp.decode.executors.llamacpp as ex
    from mtp.backbones import load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.executors.llamacpp import LlamaCppBackbone
    from mtp.decode.proposers import PlainProposer
    from mtp.decode.run import build_llama_decoder
    from mtp.errors import UserError
    from transformers import AutoConfig

    folder = tiny_gguf.parent
    target = LlamaCppBackbone(tiny_gguf, AutoConfig.from_pretrained(folder), n_ctx=1024, threads=2)
    try:
        tok = load_tokenizer(folder)
        monkeypatch.setattr(ex, "cached_exact_width", lambda t: 3)
        prompts = [PREFIX, PREFIX[3:] * 2]
        for calibrate in (False, True):
            exact = DraftOptions(bit_exact=True, backend="llama.cpp")
            decoder, sizing = build_llama_decoder(target, tok, "lookup", exact, calibrate=calibrate)
            for p in prompts:
                out = decoder.generate([p], 24, eos_token_ids=[])
                assert out.rows[0].tokens == _greedy_alone(tiny_gguf, p, 24)
                assert max(out.rows[0].accepted) <= 3
            assert out.verify_tokens <= 3 * out.verify_forwards
        # the default: on for greedy lookup whose length is left open, off for a given length or sampling
        assert build_llama_decoder(target, tok, "lookup", DraftOptions())[1].bit_exact
        assert not build_llama_decoder(target, tok, "lookup", DraftOptions(draft_len=4))[1].bit_exact
        assert not build_llama_decoder(target, tok, "lookup", DraftOptions(temperature=0.7))[1].bit_exact
        with pytest.raises(UserError, match="--draft-len 2 or less"):
            build_llama_decoder(target, tok, "lookup", DraftOptions(bit_exact=True, backend="llama.cpp", draft_len=4))
        with pytest.raises(UserError, match="runs plain and lookup"):
            build_llama_decoder(target, tok, "tree", DraftOptions(bit_exact=True, backend="llama.cpp"))
        monkeypatch.setattr(ex, "cached_exact_width", lambda t: 1)
        decoder, sizing = build_llama_decoder(target, tok, "lookup", DraftOptions(bit_exact=True, backend="llama.cpp"))
        assert isinstance(decoder.proposer, PlainProposer) and sizing.method == "plain"
    finally:
        target.close()
    with pytest.raises(UserError, match="--backend llama.cpp"):
        DraftOptions(bit_exact=True, backend="torch")


@needs_lib
def test_bit_exact_verifies_stay_inside_llamacpps_kv_view(tiny_q4_1, monkeypatch):
    """llama.cpp attends a KV view padded to 256 cells and splits its keys across threads by the view's length: a
    verify that grows the view computes its first tokens otherwise than their one-token decodes did (not bit-exact,
    shown here at 506 cells: a view of 768 split in two halves of 384 against 512 in halves of 256), one that stays
    inside is exact. --bit-exact's executor cuts a lone row's draft there
    (LlamaCppExecutor.fit), and greedy lookup across the step answers as plain decoding on the same target."""
    import mtp.decode.executors.llamacpp as ex
    from mtp.backbones import load_tokenizer
    from mtp.config import DraftOptions
    from mtp.decode.executors.llamacpp import LlamaCppBackbone, LlamaCppExecutor
    from mtp.decode.run import build_llama_decoder
    from mtp.decode.tree import Draft
    from transformers import AutoConfig

    folder = tiny_q4_1.parent
    target = LlamaCppBackbone(tiny_q4_1, AutoConfig.from_pretrained(folder), n_ctx=1024, threads=2)
    try:
        rows, n, follow = target.rows, 506, [88, 400, 401, 402, 403, 404, 405, 406]
        rows.add_rows([(PREFIX * 50)[:n]])
        want = _one_by_one(rows, n, follow)
        for k, exact in ((8, False), (6, True)):  # cells 506..513 grow the view to 768; 506..511 stay in 512
            got, _ = rows.verify([follow[:k]], [list(range(-1, k - 2))], [[True] * (k - 1)])
            rows._step = None
            rows.ctx.seq_rm(rows.base[0], n)
            rows.past[0] = n
            assert np.array_equal(got[0], want[:k]) == exact
        chain = Draft(torch.tensor([follow[1:]]), torch.tensor([[-1, 0, 1, 2, 3, 4, 5]]), torch.ones(1, 7).bool())
        assert LlamaCppExecutor(target, bit_exact=True).fit(None, chain).valid.tolist() == [[True] * 5 + [False] * 2]
        assert LlamaCppExecutor(target).fit(None, chain) is chain
        rows.keep_rows([])

        monkeypatch.setattr(ex, "cached_exact_width", lambda t: 16)
        tok = load_tokenizer(folder)
        plain, _ = build_llama_decoder(target, tok, "plain", DraftOptions(), calibrate=False)
        lookup, _ = build_llama_decoder(target, tok, "lookup", DraftOptions(bit_exact=True, backend="llama.cpp"),
                                        calibrate=False)
        prompt = (PREFIX * 50)[:n - 10]
        want = plain.generate([prompt], 40, eos_token_ids=[]).rows[0].tokens
        out = lookup.generate([prompt], 40, eos_token_ids=[])
        assert out.rows[0].tokens == want and out.verify_tokens > out.verify_forwards
    finally:
        target.close()
