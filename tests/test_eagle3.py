"""EAGLE-3 heads: training-time test, drafting in the engine, against inference-style references."""

import pytest
import torch

from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.proposers import DynamicTreeProposer, Proposer, TreeProposer, blockwise
from mtp.decode.tree import compile_tree
from mtp.errors import UserError
from mtp.training.losses import head_targets
from mtp.model.eagle3 import default_layers, parse_layers
from mtp.model.mtp import HeadsConfig, MTPModel
from mtp.training.train import mtp_step
from tests.conftest import tiny_model
from tests.test_decode import PROMPTS, Tok, reference_greedy


def eagle_heads(model, n=3, seed=1, scale=0.3, draft_ids=None):
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=n, kind="eagle3"))
    if draft_ids is not None:
        heads.set_draft_vocab(torch.tensor(draft_ids))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.heads.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return heads.eval()


def chain_reference(heads, ids: torch.Tensor, start: int, steps: int) -> list[torch.Tensor]:
    """Draft a chain after position ``start`` as an engine does: the committed positions 0..start in one
    causal pass (token after each, target state), then one query per step with its own previous output."""
    from mtp.hf_compat import new_cache

    head = heads.eagle
    _, states = heads.trunk(ids)
    g = head.fuse(states)
    cache = new_cache()
    a = head.step(heads.embed(ids[:, 1:start + 2]), g[:, :start + 1], torch.arange(start + 1)[None], None, cache)
    outs = [a[:, -1]]
    for j in range(1, steps):
        tok = ids[:, start + 1 + j: start + 2 + j]
        outs.append(head.step(heads.embed(tok), outs[-1][:, None], torch.tensor([[start + j]]), None, cache)[:, 0])
    return outs


def test_default_and_parsed_layers():
    assert default_layers(30) == [2, 15, 27]  # vLLM's default for SmolLM2-135M
    assert default_layers(2) == [0, 1, 2]
    assert parse_layers("27,2,15", 30) == [2, 15, 27]
    assert parse_layers("default", 30) == [2, 15, 27]
    for bad in ("1,2", "1,1,2", "0,5,31", "a,b,c", "-1,2,3"):
        with pytest.raises(UserError, match="--eagle-layers"):
            parse_layers(bad, 30)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_training_time_test_equals_inference_chains(arch):
    """Slot t of unroll step j is exactly the chain an engine drafts after position t, j steps in."""
    model = tiny_model(arch, vocab=64)
    heads = eagle_heads(model)
    ids = torch.randint(3, 64, (1, 11), generator=torch.Generator().manual_seed(0))
    _, states = heads.trunk(ids)
    outs = heads.eagle.unroll(heads.embed, states, ids, 3)
    for start in range(ids.shape[1] - 4):
        ref = chain_reference(heads, ids, start, 3)
        for j in range(3):
            torch.testing.assert_close(outs[j][0, start], ref[j][0], rtol=1e-10, atol=1e-10)


def test_training_time_test_gradients_equal_the_unrolled_reference():
    """The memory-efficient training step (chunked losses, one backward through the unroll) gives the
    gradients of the summed per-step losses computed from inference-style chains, one start at a time."""
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model, scale=0.1, draft_ids=list(range(3, 50)))  # some targets outside the vocab
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :3] = False  # prompt tokens: never a target
    weights = [1.0, 1.0, 0.8, 0.64]
    heads.train()
    mtp_step(heads, ids, weights, train_backbone=False, chunk_tokens=5, loss_mask=mask)
    got = {n: p.grad.clone() for n, p in heads.heads.named_parameters()}
    heads.zero_grad()
    head = heads.eagle
    t_len = ids.shape[1]
    total = 0.0
    for j in range(3):
        targets = head.to_draft(head_targets(ids, j + 1, mask))[0]  # x_{t+2+j} as a draft id, or -100
        terms = []
        for start in range(t_len):
            if targets[start] < 0:
                continue
            a = chain_reference(heads, ids, start, j + 1)[j]
            terms.append(torch.nn.functional.cross_entropy(head.draft_logits(a), targets[start:start + 1]))
        total = total + weights[j + 1] * torch.stack(terms).mean()
    total.backward()
    for n, p in heads.heads.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)  # RMSNorm runs in float32


class Recorder(Proposer):
    """Wraps a proposer and keeps every draft it made (tokens and parents per row)."""

    def __init__(self, inner):
        self.inner, self.needs_heads, self.name, self.drafts = inner, True, inner.name, []

    def heads_needed(self):
        return self.inner.heads_needed()

    def propose(self, state):
        draft = self.inner.propose(state)
        self.drafts.append((state.sequences(), draft.tokens.tolist(), draft.parents.tolist()))
        return draft


def test_engine_drafts_the_reference_chain_at_every_step():
    """Each step's chain is the greedy chain of an independent drafting from scratch on the sequence so far
    (its cache commits, holes of a batch, positions and draft keys all right)."""
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model)
    rec = Recorder(blockwise(3))
    SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=rec).generate(PROMPTS, max_new_tokens=12, eos_token_ids=[])
    assert rec.drafts
    for seqs, tokens, _ in rec.drafts:
        for row, seq in enumerate(seqs):
            ids = torch.tensor([seq])  # prompt + emitted, the root last
            start = len(seq) - 2  # the last committed position
            chain, ext = [], ids
            for j in range(3):
                a = chain_reference(heads, ext, start, j + 1)[j]
                tok = int(heads.eagle.draft_ids[heads.eagle.draft_logits(a).argmax(-1)])
                chain.append(tok)
                ext = torch.cat([ext, torch.tensor([[tok]])], 1)
            assert tokens[row] == chain


def trained_tiny_eagle(model, steps=150):
    """An eagle3 head trained on the tiny model's own greedy continuations of 16 prompts, and those prompts:
    it accepts there, so the tree machinery is exercised (a random 64-token model gives little to learn)."""
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=3, kind="eagle3"))
    g = torch.Generator().manual_seed(0)
    seqs, prompts = [], []
    for i in range(16):
        prompt = torch.randint(3, 64, (4,), generator=g).tolist()
        prompts.append(prompt)
        seqs.append(prompt + reference_greedy(model, prompt, 28))
    ids = torch.tensor(seqs)
    opt = torch.optim.AdamW(heads.head_parameters(), lr=3e-3)
    heads.train()
    for _ in range(steps):
        mtp_step(heads, ids, [1.0, 1.0, 1.0, 1.0], train_backbone=False)
        opt.step()
        opt.zero_grad()
    return heads.eval(), prompts


@pytest.fixture(scope="module")
def trained():
    model = tiny_model("llama", vocab=64)
    return (model, *trained_tiny_eagle(model))


@pytest.mark.parametrize("proposer", [
    blockwise(3),
    TreeProposer(compile_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])),
    DynamicTreeProposer(nodes=10, top_k=3),
])
def test_trained_eagle_drafts_accept_and_stay_token_identical(trained, proposer):
    model, heads, prompts = trained
    prompts = [p[:3] for p in prompts[:3]] + [prompts[3]]
    refs = [reference_greedy(model, p, 24) for p in prompts]
    out = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer).generate(prompts, max_new_tokens=24,
                                                                        eos_token_ids=[])
    assert [r.tokens for r in out.rows] == refs
    assert sum(r.acceptance_length for r in out.rows) / len(refs) > 1.5  # the drafts are used, not just harmless


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model, draft_ids=list(range(10, 60)))
    heads.save_pretrained(tmp_path / "h")
    back = MTPModel.from_pretrained(tmp_path / "h", backbone=model)
    assert back.config.kind == "eagle3" and back.config.draft_vocab == 50 and back.tapped == heads.tapped
    for (n, a), (_, b) in zip(heads.heads.state_dict().items(), back.heads.state_dict().items()):
        assert torch.equal(a, b), n


def test_eagle3_heads_refuse_joint_training():
    with pytest.raises(UserError, match="frozen"):
        HeadsConfig(backbone="x", kind="eagle3", trained_backbone="full")


def test_float32_heads_train_on_a_bfloat16_backbone():
    """mtp train keeps float32 master heads on a bf16 backbone: the unroll casts the target's states in."""
    model = tiny_model("llama", vocab=64, dtype=torch.bfloat16)
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=2, kind="eagle3"), head_dtype=torch.float32)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    losses = mtp_step(heads, ids, [1.0, 1.0, 1.0], train_backbone=False)
    assert all(torch.isfinite(torch.tensor(losses[1:])))
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in heads.head_parameters())


def _four_layer_llama(arch="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    with torch.no_grad():  # norms away from 1, so that a norm copied from the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.double().eval()


def test_init_from_target_copies_the_layer_whose_input_fc_passes_through():
    """--draft-init target: the first draft step computes exactly the target's layer at the highest tap."""
    from mtp.model.trunk import capture_hidden

    model = _four_layer_llama()
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=2, kind="eagle3", eagle_layers=[0, 1, 2]))
    assert heads.eagle.init_from_target(model) == 2  # the layer whose input is tap 2
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture_hidden(model, [0, 1, 2, 3]) as store:
        model.get_decoder()(input_ids=ids)
        a0 = heads.eagle.unroll(heads.embed, [store[i] for i in heads.tapped], ids, 1)[0]
    torch.testing.assert_close(a0, store[3])  # layer 2's output: the input of layer 3
    # a copy of any other layer computes something else
    for wrong in (0, 1, 3):
        heads.eagle.init_from_target(model, wrong)
        with torch.no_grad():
            other = heads.eagle.unroll(heads.embed, [store[i] for i in heads.tapped], ids, 1)[0]
        assert not torch.allclose(other, store[3], atol=1e-3)


def test_init_from_target_refuses_what_it_cannot_copy():
    model = tiny_model("gemma3", vocab=64)
    heads = MTPModel(model, HeadsConfig(backbone="tiny", n_heads=2, kind="eagle3"))
    with pytest.raises(UserError, match="not a Llama-style layer"):
        heads.eagle.init_from_target(model)
    with pytest.raises(UserError, match="layers 0..1"):
        heads.eagle.init_from_target(tiny_model("llama", vocab=64), 5)
    qwen = _four_layer_llama("qwen2")  # q/k/v biases are dropped: close to the layer, not equal
    heads = MTPModel(qwen, HeadsConfig(backbone="tiny", n_heads=2, kind="eagle3", eagle_layers=[0, 1, 2]))
    assert heads.eagle.init_from_target(qwen) == 2


def test_soft_draft_loss_matches_a_naive_reference():
    """--draft-loss soft: draft step k at t learns softmax of the target's draft-vocabulary logits at t + k; the
    chunked step's losses and gradients equal a reference that holds every logit at once."""
    model = tiny_model("llama", vocab=64)
    heads = eagle_heads(model, n=3, draft_ids=list(range(0, 64, 2)))
    heads.train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :3] = False  # a prompt: never a target
    weights = [1.0, 1.0, 0.8, 0.64]
    losses = mtp_step(heads, ids, weights, train_backbone=False, chunk_tokens=3, loss_mask=mask, soft=True)
    got = {n: p.grad.clone() for n, p in heads.heads.named_parameters() if p.grad is not None}
    heads.heads.zero_grad()
    head = heads.eagle
    final, states = heads.trunk(ids)
    teacher = torch.softmax(head.teacher_logits(model, final), -1)  # (B, T, Vd)
    outs = head.unroll(heads.embed, states, ids, 3)
    total, ref = 0.0, []
    for k, a in enumerate(outs, 1):
        valid = head.to_draft(head_targets(ids, k, mask)) >= 0  # (B, T)
        logq = torch.log_softmax(head.draft_logits(a), -1)
        shifted = torch.zeros_like(teacher)
        shifted[:, :-k] = teacher[:, k:]
        per = -(shifted * logq).sum(-1)[valid]
        ref.append(float(per.mean().detach()))
        total = total + weights[k] * per.mean()
    total.backward()
    assert losses[1:] == pytest.approx(ref, rel=1e-6)
    for n, p in heads.heads.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad)
