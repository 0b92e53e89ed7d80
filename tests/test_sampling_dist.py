"""End to end: sampling through the self-speculative engine (heads, a static tree, a batch of rows, several seeds)
draws the backbone's own sampling distribution.

A tiny random model with a 16-token vocabulary: the joint distribution of the first three generated tokens has
16^3 outcomes, computed exactly from the model's logits (temperature and top-k applied with plain torch ops at
every prefix, no decode code involved). The engine's samples are compared with it by a chi-square test at
p = 1e-6 (a sound engine fails it once in a million runs; the seeds are fixed, so the outcome is the same every
run). Token 1 is the prefill's sample; tokens 2 and 3 come from the verify steps (accepted draft nodes at depth 1
and 2, or the next root).
"""

import pytest
import torch

from mtp.decode import engine as engine_module
from mtp.decode.accept import Accepted, Sampling, _path_to
from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.proposers import TreeProposer
from mtp.decode.tree import compile_tree
from tests.conftest import tiny_model
from tests.test_decode import Tok, with_heads

V = 16
T = 0.8
TOP_K = 10  # of 16: the truncation is part of the distribution too
PROMPTS = [[1, 5, 9, 13, 5, 9], [1, 7, 3]]  # different lengths: the batch is left-padded
ROWS = 2000  # per prompt and seed
SEEDS = (0, 1)
TREE = [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0)]
P_VALUE = 1e-6


def exact_joint(model, prompt, depth=3):
    """P(t1..t_depth) under plain ancestral sampling at temperature T with top-k TOP_K: (V ** depth,),
    index t1 V^2 + t2 V + t3."""
    seqs, probs = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(depth):
            logits = model(seqs).logits[:, -1].double() / T  # (M, V)
            kth = logits.sort(-1, descending=True).values[:, TOP_K - 1: TOP_K]
            p = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            probs = (probs[:, None] * p).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return probs


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, int]:
    """Pearson's chi-square; cells expecting fewer than 5 counts are pooled into one. (statistic, p, dof)"""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, p, dof


def engine_counts(model, heads, rows=ROWS, seeds=SEEDS):
    """Counts of (prompt, t1, t2, t3) over seeds x rows samples per prompt, and the share of first verify steps
    that accepted at least one / two draft nodes."""
    counts = torch.zeros(len(PROMPTS), V ** 3, dtype=torch.float64)
    first_step = []
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(rows * len(PROMPTS))]  # prompts interleaved in the batch
    for seed in seeds:
        dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=TreeProposer(compile_tree(TREE)),
                      sampling=Sampling(temperature=T, top_k=TOP_K), seed=seed)
        out = dec.generate(batch, max_new_tokens=4, eos_token_ids=[])
        for i, row in enumerate(out.rows):
            t1, t2, t3 = row.tokens[:3]
            counts[i % len(PROMPTS), t1 * V * V + t2 * V + t3] += 1
            first_step.append(row.accepted[0])
    first_step = torch.tensor(first_step)
    return counts, float((first_step >= 2).float().mean()), float((first_step >= 3).float().mean())


def distribution_test(model, heads, rows=ROWS, seeds=SEEDS):
    counts, _, _ = engine_counts(model, heads, rows, seeds)
    expected = torch.stack([exact_joint(model, p) for p in PROMPTS]) * counts.sum(1, keepdim=True)
    return chi2_pvalue(counts.reshape(-1), expected.reshape(-1)), counts, expected


def test_tree_sampling_through_the_engine_follows_the_backbones_distribution():
    model = tiny_model("llama", vocab=V, dtype=torch.float32)
    heads = with_heads(model, n=3)
    counts, depth1, depth2 = engine_counts(model, heads)
    # the drafts are accepted often enough for the test to be about acceptance, at depth 1 and at depth 2
    assert depth1 > 0.2 and depth2 > 0.03, (depth1, depth2)
    expected = torch.stack([exact_joint(model, p) for p in PROMPTS]) * counts.sum(1, keepdim=True)
    assert counts[expected == 0].sum() == 0  # nothing top-k cuts off is ever emitted
    stat, p, dof = chi2_pvalue(counts.reshape(-1), expected.reshape(-1))
    assert p > P_VALUE, (stat, dof, p)
    # the pairs (t1, t2) alone, an unpooled check with large counts per cell
    stat, p, dof = chi2_pvalue(counts.reshape(len(PROMPTS), V * V, V).sum(-1).reshape(-1),
                               expected.reshape(len(PROMPTS), V * V, V).sum(-1).reshape(-1))
    assert p > P_VALUE, (stat, dof, p)


def test_the_distribution_test_catches_a_broken_acceptance_rule(monkeypatch):
    """Guard of the guard: accepting every draft's deepest node, judging every node with the root's
    distribution, or dropping the temperature in the acceptance is caught by the same test (half the samples)."""
    model = tiny_model("llama", vocab=V, dtype=torch.float32)
    heads = with_heads(model, n=3)

    def always_accept(logits, draft, sampling, generator=None):
        best = draft.depth_q().argmax(1)  # the first deepest node: its whole path is accepted
        acc = _path_to(draft, best)
        probs = sampling.probs(logits[torch.arange(len(best)), best])
        acc.next_root = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return acc

    real = engine_module.accept_sample

    def root_distribution_everywhere(logits, draft, sampling, generator=None) -> Accepted:
        return real(logits[:, :1].expand_as(logits), draft, sampling, generator)

    def temperature_ignored(logits, draft, sampling, generator=None) -> Accepted:
        return real(logits, draft, Sampling(temperature=1.0, top_k=TOP_K), generator)

    for broken in (always_accept, root_distribution_everywhere, temperature_ignored):
        monkeypatch.setattr(engine_module, "accept_sample", broken)
        (stat, p, dof), _, _ = distribution_test(model, heads, rows=1000)
        assert p < 1e-10, (broken.__name__, stat, dof, p)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (5e-324, 1.0), (9e-38, 1.0), (1.0, 1e-300),
                                                (1e-38, 5e-324)])
def test_tiny_temperatures_and_top_p_sample_the_top_token_without_nans(temperature, top_p):
    """Valid per OpenAI's API, and 0 in float32: the distribution is the limit (all mass on the largest logit,
    greedy exactly), never NaN; a batch of such rows and greedy ones decodes together."""
    from mtp.decode.accept import Sampling

    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 0.4, 0.45]])
    s = Sampling(temperature=temperature, top_p=top_p)
    probs = s.probs(logits)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [1, 0] and torch.allclose(probs.max(-1).values, torch.ones(2))
    g = torch.Generator().manual_seed(0)
    assert s.choose(logits, g).tolist() == [1, 0]
