"""The speed guard (mtp.decode.guard): drafts run only where they are timed to make tokens come faster, and the
output never changes."""

import pytest
import torch

from mtp.decode.engine import SpeculativeDecoder
from mtp.decode.guard import FIRST_DRAFT, PROBE, SpeedGuard
from mtp.decode.proposers import LookupProposer, TreeProposer
from mtp.decode.tree import compile_tree
from mtp.errors import UserError
from tests.conftest import tiny_model
from tests.test_decode import PROMPTS, Tok, reference_greedy, with_heads


class FakeClock:
    """Each step costs what the test says: ``cost(drafting)`` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(guard, clock, steps, draft_cost, draft_tokens, plain_cost=1.0, rows=1):
    """``steps`` steps; a drafted step takes ``draft_cost`` s and gives ``draft_tokens`` tokens, a plain one
    ``plain_cost`` s and one token per row. Returns the arm of every step."""
    arms = []
    for _ in range(steps):
        drafting = guard.drafting(rows)
        clock.now += draft_cost if drafting else plain_cost
        guard.record(draft_tokens if drafting else rows)
        arms.append(drafting)
    return arms


def test_drafts_that_do_not_pay_are_dropped_and_retried_ever_less_often():
    clock = FakeClock()
    guard = SpeedGuard(clock)
    # drafted steps: 1.5 tokens in 2 s (0.75 tokens/s); plain: 1 token/s
    arms = run_steps(guard, clock, 2000, draft_cost=2.0, draft_tokens=1.5)
    assert all(arms[:FIRST_DRAFT])  # the drafts first (their sizing expected them to pay)
    assert not any(arms[FIRST_DRAFT:FIRST_DRAFT + PROBE + 1])  # then plain is measured
    share = sum(arms[200:]) / len(arms[200:])
    assert share < 0.05, share  # retried now and then, less and less
    report = guard.report()["1"]
    assert report["draft_tokens_per_s"] == pytest.approx(0.75) and report["plain_tokens_per_s"] == pytest.approx(1.0)


def test_drafts_that_pay_keep_running_and_a_change_of_text_is_noticed():
    clock = FakeClock()
    guard = SpeedGuard(clock)
    arms = run_steps(guard, clock, 600, draft_cost=1.2, draft_tokens=2.0)  # 1.67 tokens/s against 1
    assert sum(arms[100:]) / len(arms[100:]) > 0.9
    # the text changes: the drafts stop being accepted; the guard turns to plain within a few hundred steps
    arms = run_steps(guard, clock, 800, draft_cost=1.2, draft_tokens=1.0)
    assert sum(arms[-300:]) / 300 < 0.1
    # and back: drafts pay again
    arms = run_steps(guard, clock, 1200, draft_cost=1.2, draft_tokens=2.5)
    assert sum(arms[-300:]) / 300 > 0.9


def test_batch_sizes_are_judged_apart():
    clock = FakeClock()
    guard = SpeedGuard(clock)
    run_steps(guard, clock, 300, draft_cost=1.2, draft_tokens=2.0, rows=1)  # one row: drafts pay
    run_steps(guard, clock, 300, draft_cost=5.0, draft_tokens=8.0, plain_cost=2.0, rows=4)  # 4 rows: 1.6 vs 2 tokens/s
    report = guard.report()
    assert set(report) == {"1", "4"}
    assert report["1"]["draft_share"] > 0.9 and report["4"]["draft_share"] < 0.3
    with pytest.raises(UserError):
        guard.drafting(0)


class CostedGuard(SpeedGuard):
    """A guard whose drafted steps take ``draft_cost`` seconds and plain ones 1 s."""

    def __init__(self, draft_cost: float):
        self.now = 0.0
        super().__init__(clock=lambda: self.now)
        self.draft_cost, self._drafting = draft_cost, False

    def drafting(self, rows):
        self._drafting = super().drafting(rows)
        return self._drafting

    def record(self, tokens):
        self.now += self.draft_cost if self._drafting else 1.0
        super().record(tokens)


def test_a_guarded_decoder_says_what_plain_greedy_says_whichever_arm_runs():
    """Whatever the timings (drafting slow, then fast), every row's output is plain greedy's, with heads whose
    state must follow plain steps too (eagle3's own cache, transformer heads')."""
    model = tiny_model("llama", vocab=64)
    refs = [reference_greedy(model, p, 160) for p in PROMPTS]
    for kind in ("mlp", "hydra", "transformer", "eagle3"):
        heads = with_heads(model, kind)
        proposer = TreeProposer(compile_tree([(0,), (1,), (0, 0), (0, 0, 0)]))
        for slow in (True, False):
            dec = SpeculativeDecoder(model, Tok(), mtp_model=heads, proposer=proposer, guard=True)
            dec.guard = CostedGuard(20.0 if slow else 0.1)
            out = dec.generate(PROMPTS, max_new_tokens=160, eos_token_ids=[])
            assert [r.tokens for r in out.rows] == refs, (kind, slow)
            report = dec.guard.report()
            steps = sum(g["drafted_steps"] + g["plain_steps"] for g in report.values())
            plain = sum(g["plain_steps"] for g in report.values())
            if slow:
                assert plain > steps // 3, (kind, report)
            else:
                assert plain < steps // 4, (kind, report)  # plain measured, retried less and less
    # a lookup decoder, one row alone
    dec = SpeculativeDecoder(model, Tok(), proposer=LookupProposer(draft_len=4), guard=True)
    assert dec.generate(PROMPTS[1:2], max_new_tokens=160, eos_token_ids=[]).rows[0].tokens == refs[1]


def test_lookup_draft_length_follows_the_curve_and_the_acceptance_seen():
    from mtp.decode.proposers import SizedLookupProposer

    steep = {1: 1.0, 2: 1.7, 3: 2.2, 4: 2.6, 5: 3.2, 6: 3.7, 8: 4.4, 10: 5.5, 12: 6.2, 16: 7.9, 32: 15.4}
    flat = {k: 1.0 + 0.01 * k for k in steep}
    p = SizedLookupProposer(steep)
    assert p.draft_len == 1  # a steep curve and an unknown text: the shortest draft
    assert SizedLookupProposer(flat).draft_len >= 4  # tokens nearly free: longer, as far as the prior's 0.5 per token pays

    # a text that copies: every drafted token accepted -> longer drafts
    for _ in range(40):
        p._drafted = [p.draft_len]
        p.observe([list(range(p.draft_len + 1))])
    assert p.draft_len >= 15 and p.acceptance()[0] > 0.9
    # then nothing is accepted any more -> back to the shortest
    for _ in range(400):
        p._drafted = [p.draft_len]
        p.observe([[7]])
    assert p.draft_len == 1 and p.sizes[0] == 1 and max(p.sizes) >= 15
    # a row with no draft, or one that finished, teaches nothing
    before = p.reached.clone()
    p._drafted = [0, 3]
    p.observe([[1, 2], None])
    assert torch.equal(p.reached, before)
    with pytest.raises(UserError):
        SizedLookupProposer({1: 1.0})


def test_sized_lookup_reproduces_plain_greedy_and_reports_its_lengths(monkeypatch):
    import mtp.decode.run as run
    from mtp.config import DraftOptions

    flat = {k: 1.0 + 0.01 * k for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)}
    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: flat)
    model = tiny_model("llama", vocab=64)
    refs = [reference_greedy(model, p, 60) for p in PROMPTS]
    dec, info = run.build_decoder(model, Tok(), None, None, "tiny", "lookup", DraftOptions())
    assert info.as_dict()["draft_len_from"].startswith("verify cost") and info.draft_len >= 4
    out = dec.generate(PROMPTS, max_new_tokens=60, eos_token_ids=[])
    assert [r.tokens for r in out.rows] == refs
    sizes = run.adaptive_sizes(dec)
    # the decoder's proposer was re-sized for its batch of 3 (the batch curve): its own lengths, per match length
    assert sizes["observed_steps"] > 0 and 1 <= sizes["initial"] <= info.draft_len
    assert max(sizes["per_match_length"].values()) == sizes["final"] and sum(sizes["visits_per_match_length"].values())
    fixed, info = run.build_decoder(model, Tok(), None, None, "tiny", "lookup", DraftOptions(draft_len=5))
    assert info.draft_len == 5 and run.adaptive_sizes(fixed) is None


@pytest.mark.parametrize("pays", [False, True])
def test_a_guard_that_starts_plain_probes_the_drafts_after_a_few_steps_and_keeps_them_where_they_pay(pays):
    """Where the sizing expected no draft to pay (start="plain"): plain steps first, then one probe of the drafts;
    drafts that pay take over, ones that do not are retried ever less often."""
    clock = FakeClock()
    guard = SpeedGuard(clock, start="plain")
    arms = run_steps(guard, clock, 1000, draft_cost=1.2, draft_tokens=2.0 if pays else 1.1)
    assert not any(arms[:PROBE + 1]) and all(arms[PROBE + 1:2 * (PROBE + 1)])  # plain, then a probe of the drafts
    tail = sum(arms[200:]) / len(arms[200:])
    assert tail > 0.9 if pays else tail < 0.05
    with pytest.raises(UserError, match="draft or plain"):
        SpeedGuard(clock, start="sometimes")


def test_the_decoders_guard_starts_plain_where_the_sizing_expected_no_draft_to_pay():
    from mtp.config import DraftOptions
    from mtp.decode.methods import Sizing
    from mtp.decode.run import speed_guard

    opts = DraftOptions(guard=True)
    assert speed_guard(opts, Sizing(method="tree", expected_speedup=0.9)).start == "plain"
    assert speed_guard(opts, Sizing(method="tree", expected_speedup=1.2)) is True
    assert speed_guard(opts, Sizing(method="tree")) is True  # sizes given by hand: no expectation
    assert speed_guard(DraftOptions(guard=False), Sizing(method="tree", expected_speedup=0.9)) is False


def test_match_lookup_drafts_per_match_length_and_stops_where_short_matches_fail():
    """MatchLookupProposer: a class of long matches that copy gets long drafts, a class of 1-token matches that never
    hold gets none (plain steps) but is probed now and then; the lookup method uses it and stays lossless."""
    from mtp.decode.proposers import DraftContext, MatchLookupProposer

    steep = {1: 1.0, 2: 1.7, 3: 2.2, 4: 2.6, 8: 4.4, 16: 7.9, 32: 15.4}
    p = MatchLookupProposer(steep, probe=4)
    one, long_ = p.classes.index(1), p.classes.index(16)
    assert p.per_class[one] == 0 and p.per_class[long_] > 0  # priors: a lone token no, a 16-token match yes
    assert p._match([5, 6, 7, 9, 5, 6, 7]) == (p.classes.index(3), [9, 5, 6, 7]) and p._match([1, 2, 3]) == (-1, [])
    for _ in range(40):  # long matches copy: all accepted; 1-token matches (when probed) fail
        p._drafted, p._row_class = [p.per_class[long_], 1], [long_, one]
        p.observe([list(range(p.per_class[long_] + 1)), [3]])
    assert p.per_class[long_] == p.lengths[-1] and p.per_class[one] == 0
    assert p.class_acceptance(long_)[0] > 0.9 and p.class_acceptance(one)[0] < 0.1

    rows = [[8, 1, 2, 9, 4, 1], list(range(20)) + [50] + list(range(20))]  # a 1-token match; a 20-token one
    drafted = []
    for _ in range(8):
        d = p.propose(DraftContext(batch=2, device=torch.device("cpu"), root=torch.zeros(2), sequences=lambda: rows))
        drafted.append(d.valid.sum(1).tolist())
        p._drafted = None  # (no verify here)
    assert all(k[1] == 21 for k in drafted)  # the copy row drafts all that followed its match, each step
    assert sum(k[0] > 0 for k in drafted) == 2  # the 1-token row: only its probes (every 4th visit)
    done = DraftContext(batch=2, device=torch.device("cpu"), root=torch.zeros(2), sequences=lambda: rows,
                        done=(False, True))
    assert p.propose(done).valid.sum(1).tolist()[1] == 0  # a finished row drafts nothing
