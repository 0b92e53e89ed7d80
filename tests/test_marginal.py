import itertools

import pytest
import torch

from mtp.analysis.marginal import CachedEvaluator, NaiveEvaluator, marginalize
from tests.conftest import tiny_model


@torch.inference_mode()
def next_dist(model, seq):
    return torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1], -1)


def brute_force(model, ids, t, k):
    """Exact p(x_{t+k} | x_{<=t}) by enumerating every intermediate path."""
    vocab = model.config.vocab_size
    total = torch.zeros(vocab, dtype=torch.float64)
    prefix = ids[: t + 1].tolist()
    for path in itertools.product(range(vocab), repeat=k - 1):
        w, seq = 1.0, list(prefix)
        for tok in path:
            w = w * next_dist(model, seq)[tok]
            seq.append(tok)
        total += w * next_dist(model, seq)
    return total


def reference_truncated(model, ids, t, k, top_p, cap):
    """Nested top-p truncation with at most `cap` paths per level, written the obvious way."""
    def top_p_set(dist):
        p, tok = dist.sort(descending=True)
        n = int((p.cumsum(0) < top_p).sum()) + 1
        return list(zip(tok[: min(n, cap)].tolist(), p[: min(n, cap)].tolist()))

    prefix = ids[: t + 1].tolist()
    paths = [((), 1.0)]
    for _ in range(k - 1):
        children = []
        for path, w in paths:
            for tok, p in top_p_set(next_dist(model, prefix + list(path))):
                children.append((path + (tok,), w * p))
        children.sort(key=lambda c: -c[1])
        paths = children[:cap]
    total = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for path, w in paths:
        total += w * next_dist(model, prefix + list(path))
    return total, len(paths)


@pytest.mark.parametrize("k", [2, 3])
def test_marginal_equals_brute_force(arch, k):
    model = tiny_model(arch, vocab=12)
    ids = torch.randint(3, 12, (14,), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([9, 10, 5])
    res = marginalize(CachedEvaluator(model, chunk_tokens=7), ids, positions, k, [1.0], max_candidates=10**6)
    for i, t in enumerate(positions.tolist()):
        exact = brute_force(model, ids, t, k)
        assert torch.allclose(res.marginals[k - 1][0, i], exact, atol=1e-10, rtol=0)
        assert res.marginals[k - 1][0, i].sum().item() == pytest.approx(1.0, abs=1e-10)
        assert res.candidates[k - 2][0, i].item() == 12 ** (k - 1)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("top_p,cap", [(0.9, 100), (0.99, 5), (0.5, 3)])
def test_truncated_marginal_matches_reference(arch, k, top_p, cap):
    model = tiny_model(arch, vocab=40)
    ids = torch.randint(3, 40, (20,), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([12, 15, 16])
    res = marginalize(CachedEvaluator(model, chunk_tokens=16), ids, positions, k, [top_p, 1.0], cap)
    for i, t in enumerate(positions.tolist()):
        ref, n = reference_truncated(model, ids, t, k, top_p, cap)
        assert torch.allclose(res.marginals[k - 1][0, i], ref, atol=1e-10, rtol=0)
        assert res.candidates[k - 2][0, i].item() == n


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_cached_equals_naive_any_chunking(arch, chunk):
    model = tiny_model(arch, vocab=64)
    ids = torch.randint(3, 64, (24,), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([7, 8, 15, 20])  # sliding window 6 < context: gemma3 masks must apply it
    a = marginalize(CachedEvaluator(model, chunk_tokens=chunk), ids, positions, 3, [0.99, 0.9], 8)
    b = marginalize(NaiveEvaluator(model), ids, positions, 3, [0.99, 0.9], 8)
    for ma, mb in zip(a.marginals, b.marginals):
        assert torch.allclose(ma, mb, atol=1e-12, rtol=0)
    for ca, cb in zip(a.candidates, b.candidates):
        assert torch.equal(ca, cb)


def test_smaller_top_p_is_nested_subset():
    model = tiny_model("llama", vocab=64)
    ids = torch.randint(3, 64, (20,), generator=torch.Generator().manual_seed(4))
    res = marginalize(CachedEvaluator(model), ids, torch.tensor([10, 12]), 3, [0.99, 0.9, 0.5], 50)
    for cand in res.candidates:
        assert (cand[0] >= cand[1]).all() and (cand[1] >= cand[2]).all()
    for marg in res.marginals[1:]:
        mass = marg.sum(-1)  # truncated sums: less mass for smaller top_p
        assert (mass[0] >= mass[1] - 1e-12).all() and (mass[1] >= mass[2] - 1e-12).all()
