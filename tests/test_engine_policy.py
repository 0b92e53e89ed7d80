"""llama.cpp's draft settings from measured costs (mtp.engines.policy), on synthetic curves whose answer is
known: the fits recover what made the curves, and the choice is the optimum of its own formula."""

import pytest

from mtp.engines import policy
from mtp.engines.policy import Costs


def synthetic(t1, per_token, draft_token, overhead, a, b, lengths=policy.ROUND_LENGTHS):
    verify = {k: t1 + per_token * (k - 1) for k in policy.VERIFY_POINTS}
    costs = Costs(t1=t1, verify=verify)
    for d in lengths:
        costs.rounds.append({"d": d, "round_s": verify[1] + per_token * d + overhead + d * draft_token,
                             "tokens_per_round": policy.expected_tokens(a, b, d)})
    return costs


def test_fits_recover_the_costs_and_the_acceptance_that_made_the_rounds():
    costs = synthetic(t1=0.0375, per_token=0.006, draft_token=0.002, overhead=0.001, a=0.7, b=0.8)
    overhead, draft_token = policy.fit_round_cost(costs)
    assert overhead == pytest.approx(0.001, abs=1e-9) and draft_token == pytest.approx(0.002, abs=1e-9)
    assert policy.fit_acceptance(costs) == pytest.approx((0.7, 0.8), abs=1e-9)


@pytest.mark.parametrize("t1, per_token, draft_token, a, b", [
    (0.0375, 0.006, 0.002, 0.7, 0.8),    # a 0.5B model: verify nearly flat, good drafts: a long chain
    (0.0082, 0.005, 0.0025, 0.45, 0.8),  # smollm2 on two cores: each verified token ~0.6 of a decode
    (0.010, 0.0005, 0.0002, 0.9, 0.95),  # flat verify, cheap and good drafts
])
def test_choice_is_the_optimum_of_its_formula(t1, per_token, draft_token, a, b):
    costs = synthetic(t1, per_token, draft_token, 0.0, a, b)
    choice = policy.choose(costs)
    brute = {d: policy.expected_tokens(a, b, d) * t1 / (t1 + per_token * d + d * draft_token)
             for d in range(1, policy.N_MAX_CAP + 1)}
    best = max(brute, key=brute.get)
    assert choice["n_max"] == best and choice["predicted_speedup"] == pytest.approx(brute[best], abs=1e-3)
    assert choice["pays"] == (brute[best] > 1)
    # p_min: the break-even confidence of one more draft; n_min: the shortest draft worth verifying
    assert choice["p_min"] == pytest.approx(min(0.99, (draft_token + per_token) / t1), abs=1e-3)
    n_min = choice["n_min"]
    worth = [sum(choice["p_min"] ** i for i in range(n + 1)) * t1 >= t1 + per_token * n for n in range(1, best + 1)]
    assert n_min == (worth.index(True) + 1 if True in worth else best)


def test_a_chain_that_cannot_pay_chooses_plain_decoding():
    costs = synthetic(t1=0.0082, per_token=0.0055, draft_token=0.003, overhead=0.002, a=0.35, b=0.6)
    choice = policy.choose(costs)
    assert not choice["pays"] and choice["predicted_speedup"] < 1
    assert policy.flags(choice) == []
    assert policy.flags(dict(choice, pays=True))[:2] == ["--spec-draft-n-max", str(choice["n_max"])]


def test_verify_cost_is_interpolated_and_extrapolated_linearly():
    costs = Costs(t1=1.0, verify={1: 1.0, 2: 1.5, 4: 2.5})
    assert [policy.verify_at(costs, k) for k in (1, 2, 3, 4, 6)] == [1.0, 1.5, 2.0, 2.5, 3.5]


def test_round_row_counts_rounds_from_the_servers_counters():
    answers = [{"timings": {"predicted_n": 10, "draft_n_accepted": 4, "predicted_ms": 60.0}},
               {"timings": {"predicted_n": 6, "draft_n_accepted": 2, "predicted_ms": 40.0}}]
    row = policy.round_row(4, answers)
    assert row == {"d": 4, "round_s": pytest.approx(0.1 / 10), "tokens_per_round": pytest.approx(1.6)}


class FakeServer:
    """Answers like llama-server: a prompt that extends the cached one reads only the new tokens."""

    def __init__(self):
        self.cached = []

    def complete(self, ids, n, timeout=0.0, cache_prompt=False):
        common = 0
        while common < min(len(ids), len(self.cached)) and ids[common] == self.cached[common]:
            common += 1
        new = len(ids) - common if cache_prompt else len(ids)
        self.cached = list(ids) + [-1]
        return {"timings": {"prompt_n": new, "prompt_ms": 2.0 + 1.5 * new}}


def test_verify_timings_read_only_the_new_tokens_after_the_cached_prefix():
    curve = policy.measure_verify(FakeServer(), list(range(300)), list(range(1000, 1050)), points=(1, 2, 4),
                                  repeats=3)
    assert curve == {1: pytest.approx(0.0035), 2: pytest.approx(0.005), 4: pytest.approx(0.008)}


def test_export_prints_the_settings_measured_for_that_target_and_draft(tmp_path, monkeypatch):
    """`mtp export --format gguf` serves with the flags the cached costs choose; plain where drafts lose; and
    says how to measure where nothing was measured on this machine."""
    import os

    from mtp.export.run import GGUF_NAME, serve_commands

    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    target, out = tmp_path / "target.gguf", tmp_path / "out"
    target.write_bytes(b"target")
    out.mkdir()
    (out / GGUF_NAME).write_bytes(b"draft")
    assert "not measured on this machine" in serve_commands("gguf", out, str(target))["llama.cpp draft settings"]
    threads = os.cpu_count() or 2
    good = synthetic(t1=0.0375, per_token=0.006, draft_token=0.002, overhead=0.001, a=0.7, b=0.8)
    policy.save_cached(target, out / GGUF_NAME, threads, good, {})
    cmds = serve_commands("gguf", out, str(target))
    choice = policy.choose(good)
    assert " ".join(policy.flags(choice)[2:]) in cmds["llama.cpp"]
    assert f"--spec-draft-n-max {choice['n_max']}" in cmds["llama.cpp"] and "predicted" in cmds["llama.cpp draft settings"]
    bad = synthetic(t1=0.0082, per_token=0.0055, draft_token=0.003, overhead=0.002, a=0.35, b=0.6)
    policy.save_cached(target, out / GGUF_NAME, threads, bad, {})
    cmds = serve_commands("gguf", out, str(target))
    assert "-md" not in cmds["llama.cpp"] and "serve plain" in cmds["llama.cpp draft settings"]


def test_coverage_counts_the_target_outputs_each_draft_vocabulary_holds():
    ranked = [7, 3, 9, 1]  # the draft's tokens, most frequent first
    cover = policy.coverage([[7, 7, 3], [9, 5, 7]], ranked, [1, 2, 3, 4])
    assert cover == {1: pytest.approx(3 / 6), 2: pytest.approx(4 / 6), 3: pytest.approx(5 / 6), 4: pytest.approx(5 / 6)}
    assert policy.vocab_sizes(3000) == [256, 512, 1024, 2048, 3000]


@pytest.mark.parametrize("per_row, coverage_drop", [
    (2e-7, 0.02),   # a costly lm_head, outputs concentrated in few tokens: a small vocabulary pays
    (1e-9, 0.30),   # an lm_head that costs nothing, and a small vocabulary loses much: keep it all
])
def test_draft_vocabulary_is_the_optimum_of_its_model(per_row, coverage_drop):
    """Draft rounds measured at two sizes (cost per token linear in the rows) and the coverage of each size: the
    chosen size maximizes the predicted speedup, acceptance scaled by coverage, over every size."""
    full, small, base_cost, a, b = 16384, 2048, 0.001, 0.6, 0.7
    cost = {n: base_cost + per_row * n for n in (full, small)}
    measured = {n: synthetic(t1=0.0375, per_token=0.004, draft_token=cost[n], overhead=0.0005, a=a, b=b)
                for n in (full, small)}
    sizes = sorted(set(policy.vocab_sizes(full)) | {small})
    cover = {n: 1.0 - coverage_drop * (1 - (n / full) ** 0.5) for n in sizes}
    pick = policy.choose_vocab(measured[full], measured, cover)
    assert pick["fit"]["draft_token_per_row_s"] == pytest.approx(per_row, rel=1e-6)
    assert pick["fit"]["draft_token_base_s"] == pytest.approx(base_cost, rel=1e-6)

    def speed(n):
        an = a * cover[n] / cover[full]
        return max(policy.expected_tokens(an, b, d) * 0.0375 / (0.0375 + 0.004 * d + 0.0005 + d * (base_cost + per_row * n))
                   for d in range(1, policy.N_MAX_CAP + 1))

    best = max(sizes, key=speed)
    assert pick["draft_vocab"] == best and pick["predicted_speedup"] == pytest.approx(speed(best), abs=2e-3)
    assert (best < full) == (per_row > 1e-8)
    assert pick["measured"][str(small)]["predicted_accept_a"] == pytest.approx(a * cover[small])


def test_engines_status_lists_the_settings_measured_on_this_cpu(tmp_path, monkeypatch):
    from mtp.engines import llamacpp
    from mtp.engines.setup import measured_settings

    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    target, draft = tmp_path / "target.gguf", tmp_path / "eagle3-draft.gguf"
    target.write_bytes(b"target")
    draft.write_bytes(b"draft")
    good = synthetic(t1=0.0375, per_token=0.006, draft_token=0.002, overhead=0.001, a=0.7, b=0.8)
    policy.save_cached(target, draft, 2, good, {"cpu": llamacpp.cpu_signature(), "threads": 2,
                                                "target": str(target), "draft": str(draft)})
    lines = measured_settings()
    assert len(lines) == 1 and "target.gguf" in lines[0] and "--spec-draft-n-max" in lines[0], lines
