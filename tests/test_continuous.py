"""Continuous batching: rows join a running batch between steps and leave it, and every row still decodes
exactly what it decodes alone (tiny random float64 models, every head kind and method)."""

import pytest
import torch

from mtp.decode.accept import Sampling
from mtp.decode.engine import SpeculativeDecoder, Request
from tests.conftest import tiny_model
from tests.test_decode import PROMPTS, Tok, methods, reference_greedy, with_heads

LATE = [[1, 3, 3, 8, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61], [1, 12]]


def run_schedule(dec: SpeculativeDecoder, n: int = 18):
    """PROMPTS start together; LATE[0] joins after 2 steps, LATE[1:] after 4; the first row is cancelled after
    3 steps; finished rows leave at once. Returns {prompt index: tokens} of the rows that finished."""
    everything = PROMPTS + LATE
    owner: list[int] = []  # prompt index of each running row
    done: dict[int, list[int]] = {}

    def join(indices):
        dec.add([Request(everything[i], n, frozenset()) for i in indices])
        owner.extend(indices)

    def leave(rows):
        dec.drop(rows)
        for r in sorted(rows, reverse=True):
            owner.pop(r)

    with dec.session():
        join([0, 1, 2])
        steps = 0
        while owner:
            dec.step()
            steps += 1
            finished = [r for r in range(len(owner)) if dec.done[r]]
            for r in finished:
                done[owner[r]] = list(dec.results[r].tokens)
            if steps == 3 and 0 in owner and 0 not in done:
                finished.append(owner.index(0))  # the client went away
            leave(finished)
            if steps == 2:
                join([3])
            if steps == 4:
                join([4, 5])
    return done


@pytest.mark.parametrize("kind", ["mlp", "transformer", "hydra", "eagle3"])
def test_rows_that_join_and_leave_decode_what_they_decode_alone(kind):
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, kind)
    everything = PROMPTS + LATE
    refs = [reference_greedy(model, p, 18) for p in everything]
    for name, proposer in methods(heads).items():
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer)
        done = run_schedule(dec)
        assert 0 not in done, name  # cancelled before its end
        assert sorted(done) == [1, 2, 3, 4, 5], name
        for i, tokens in done.items():
            assert tokens == refs[i], (kind, name, i)
        assert dec.state.slots is None  # nothing is left once every row has left


def test_sliding_window_model_and_compaction():
    """Gemma 3's sliding layers read positions, not slot order: joining at other lengths and compacting still
    decodes exactly (and the compaction shrinks the layout to the longest row)."""
    model = tiny_model("gemma3", vocab=64)
    heads = with_heads(model, "mlp")
    everything = PROMPTS + LATE
    refs = [reference_greedy(model, p, 18) for p in everything]
    dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=methods(heads)["tree"])
    done = run_schedule(dec)
    for i, tokens in done.items():
        assert tokens == refs[i], i


def test_compaction_keeps_each_rows_slots_and_drops_shared_holes():
    from mtp.decode.slots import Slots

    s = Slots(2, torch.device("cpu"), 16, bucket=4)
    cache = s.cache()
    layer_keys = torch.arange(2 * 8, dtype=torch.float).view(2, 1, 8, 1)
    # one layer written by hand: row 0 uses slots 0, 2, 5; row 1 uses 1, 2
    s.begin(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.bool))
    cache.update(layer_keys, layer_keys.clone(), 0)
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0, [0, 2, 5]] = True
    valid[1, [1, 2]] = True
    s.keep_all(valid)
    s.select(torch.tensor([1, 0]))  # reversed rows, then compacted
    assert s.end == 3 and s.batch == 2
    keys = cache.layers[0].keys[:, 0, :3, 0]
    assert keys[0, :2].tolist() == [9.0, 10.0] and not bool(s.valid[0, 2])
    assert keys[1].tolist() == [0.0, 2.0, 5.0] and bool(s.valid[1, :3].all())


def test_rows_sample_with_their_own_seed_and_greedy_rows_stay_greedy():
    """A batch mixing a greedy row and sampling rows with their own generators: the greedy row is plain greedy,
    a sampling row draws the same tokens whoever shares its batch (the draft sizes being equal)."""
    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, "mlp")
    ref = reference_greedy(model, PROMPTS[0], 12)
    hot = Sampling(temperature=1.0, top_p=0.9)

    def sampled(with_others: bool):
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=methods(heads)["tree"])
        rows = [Request(PROMPTS[1], 12, frozenset(), sampling=hot, generator=torch.Generator().manual_seed(7))]
        if with_others:
            rows = [Request(PROMPTS[0], 12, frozenset()), *rows,
                    Request(PROMPTS[2], 12, frozenset(), sampling=hot, generator=torch.Generator().manual_seed(8))]
        with dec.session():
            dec.add(rows)
            while not all(dec.done):
                dec.step()
        return [r.tokens for r in dec.results]

    mixed = sampled(True)
    assert mixed[0] == ref
    assert mixed[1] == sampled(False)[0]


def test_decoding_outside_a_session_is_refused():
    model = tiny_model("llama", vocab=64)
    dec = SpeculativeDecoder(model, Tok())
    with pytest.raises(RuntimeError, match="session"):
        dec.add([Request(PROMPTS[0], 4)])


def test_a_step_over_rows_that_are_all_done_emits_nothing():
    model = tiny_model("llama", vocab=64)
    dec = SpeculativeDecoder(model, Tok())
    with dec.session():
        dec.add([Request(PROMPTS[0], 1, frozenset()), Request(PROMPTS[1], 1, frozenset())])
        assert all(dec.done)
        assert dec.step() == [None, None]
        assert [len(r.tokens) for r in dec.results] == [1, 1]


def test_the_decoder_reaches_the_backbone_only_through_its_executor_and_proposers_get_a_draft_context():
    """The executor interface is all the loop needs (prefill, verify, commit, join, select, reset, check_room):
    a recording executor sees every backbone step of a schedule with rows joining and leaving, no forward of the
    model runs outside it, and each draft is made from a DraftContext, never the decoder itself."""
    from mtp.decode.executors.pytorch import TorchExecutor
    from mtp.decode.proposers import DraftContext, TreeProposer

    model = tiny_model("llama", vocab=64)
    heads = with_heads(model, "mlp")
    calls, outside = [], []

    class Recording(TorchExecutor):
        pass

    for name in ("reset", "check_room", "prefill", "verify", "commit", "join", "select"):
        def wrapped(self, *a, _name=name, **kw):
            calls.append(_name)
            return getattr(TorchExecutor, _name)(self, *a, **kw)
        setattr(Recording, name, wrapped)

    executor = Recording(model)
    inside = []
    real_forward = executor.forward

    def forward(*a, **kw):
        inside.append(1)
        return real_forward(*a, **kw)

    executor.forward = forward
    hook = model.register_forward_pre_hook(lambda *_: outside.append(1))

    contexts = []
    tree = methods(heads)["tree"]

    class Seeing(TreeProposer):
        def propose(self, ctx):
            contexts.append(type(ctx))
            return super().propose(ctx)

    try:
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=Seeing(tree.tree), executor=executor)
        done = run_schedule(dec)
    finally:
        hook.remove()
    everything = PROMPTS + LATE
    assert all(done[i] == reference_greedy(model, everything[i], 18) for i in done)
    assert {"prefill", "verify", "commit", "join", "select", "check_room"} <= set(calls)
    assert calls.count("prefill") == 3 and calls.count("join") == 2  # three groups joined, two after the first
    assert len(outside) == len(inside) > 0  # every forward of the model went through the executor
    assert contexts and set(contexts) == {DraftContext}
