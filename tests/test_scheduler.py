"""The serving scheduler in-process, on a tiny decoder: deadlines, draining, a failing engine, queue limits."""

import asyncio

import pytest

from mtp.decode.engine import SpeculativeDecoder, Request
from mtp.serve.protocol import ApiError
from mtp.serve.scheduler import Job, Scheduler
from tests.conftest import tiny_model
from tests.test_decode import PROMPTS, Tok, reference_greedy


async def events(job: Job, limit: float = 30.0):
    out = []
    while True:
        kind, value = await asyncio.wait_for(job.queue.get(), limit)
        out.append((kind, value))
        if kind != "tokens":
            return out


def run(coro):
    return asyncio.run(coro)


def test_jobs_finish_with_their_greedy_tokens_and_a_done_event():
    model = tiny_model("llama", vocab=64)
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=2, max_queue=4)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(Request(p, 10, frozenset()), loop, 60.0) for p in PROMPTS]  # 3 jobs, 2 rows: one waits
        sched.start()
        for j in jobs:
            sched.submit(j)
        return [await events(j) for j in jobs]

    try:
        results = run(main())
    finally:
        sched.stop()
    for prompt, evs in zip(PROMPTS, results):
        tokens = [t for kind, v in evs if kind == "tokens" for t in v]
        assert tokens == reference_greedy(model, prompt, 10) and evs[-1] == ("done", "length")
    assert not sched.thread.is_alive()


def test_deadline_queue_limit_and_drain():
    model = tiny_model("llama", vocab=64)
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=1, max_queue=1)

    async def main():
        loop = asyncio.get_running_loop()
        expired = Job(Request(PROMPTS[0], 400, frozenset()), loop, 0.0)
        sched.submit(expired)
        later = Job(Request(PROMPTS[1], 4, frozenset()), loop, 60.0)
        sched.submit(later)  # one free row and one place in the queue
        with pytest.raises(ApiError) as full:
            sched.submit(Job(Request(PROMPTS[1], 4, frozenset()), loop, 60.0))
        assert full.value.status == 429
        sched.start()
        (kind, error), = [e for e in await events(expired) if e[0] != "tokens"]
        assert kind == "error" and (error.status, error.code) == (503, "timeout")  # the server was busy: retry
        assert error.headers == {"Retry-After": "1"}
        assert (await events(later))[-1] == ("done", "length")
        long = Job(Request(PROMPTS[1], 480, frozenset()), loop, 60.0)
        sched.submit(long)
        kind, first = await asyncio.wait_for(long.queue.get(), 30)
        assert kind == "tokens"  # decoding, with hundreds of tokens still to go
        sched.drain(0.0)  # shutting down: no grace left
        with pytest.raises(ApiError) as refused:
            sched.submit(Job(Request(PROMPTS[2], 4, frozenset()), loop, 60.0))
        assert refused.value.status == 503
        # no grace: the worker ends the running request before its next step (it cannot have finished)
        evs = await events(long)
        kind, error = evs[-1]
        assert kind == "error" and (error.status, error.code) == (503, "shutting_down"), evs[-1]
        assert len(first) + sum(len(v) for k, v in evs if k == "tokens") < 480

    try:
        run(main())
    finally:
        sched.stop()


@pytest.mark.parametrize("part, fail_at, first_len, first_ends", [
    ("step", 2, 10, ("done",)),  # the engine's step: the row resumes, its answer unchanged
    ("drop", 1, 3, ("error", "done")),  # bookkeeping after a step ("done" was sent before the drop failed)
])
def test_a_failure_in_any_part_of_the_loop_fails_that_batch_only(monkeypatch, part, fail_at, first_len, first_ends):
    """An injected failure in a step is recovered (the rows resume from the tokens they sent, the answer token
    for token plain greedy); one in the scheduler's own bookkeeping ends that batch with a 500. Either way the
    worker serves the next request, token for token plain greedy."""
    model = tiny_model("llama", vocab=64)
    dec = SpeculativeDecoder(model, Tok())
    sched = Scheduler(dec, max_batch=4, max_queue=4)
    real, calls = getattr(SpeculativeDecoder, part), {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected")
        return real(self, *args)

    monkeypatch.setattr(SpeculativeDecoder, part, flaky)

    async def main():
        loop = asyncio.get_running_loop()
        sched.start()
        first = Job(Request(PROMPTS[0], first_len, frozenset()), loop, 60.0)
        sched.submit(first)
        evs = await events(first)
        kind, value = evs[-1]
        assert kind in first_ends
        if kind == "error":
            assert value.status == 500
        else:
            assert [t for k, v in evs if k == "tokens" for t in v] == reference_greedy(model, PROMPTS[0], first_len)
        second = Job(Request(PROMPTS[1], 6, frozenset()), loop, 60.0)
        sched.submit(second)
        evs = await events(second)
        assert evs[-1] == ("done", "length")
        assert [t for k, v in evs if k == "tokens" for t in v] == reference_greedy(model, PROMPTS[1], 6)
        assert sched.thread.is_alive()

    try:
        run(main())
    finally:
        sched.stop()


def test_a_request_past_its_deadline_while_decoding_ends_with_the_tokens_it_has(monkeypatch):
    """--timeout passing mid-decoding ends the answer there (finish "length", as max_tokens would; transformers'
    max_time), its tokens plain greedy: not an error that throws them away, nor a 503 a client would retry."""
    import time

    model = tiny_model("llama", vocab=64)
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=2, max_queue=4)
    real = SpeculativeDecoder.step

    def slow(self, *args):
        time.sleep(0.05)
        return real(self, *args)

    monkeypatch.setattr(SpeculativeDecoder, "step", slow)

    async def main():
        loop = asyncio.get_running_loop()
        job = Job(Request(PROMPTS[0], 400, frozenset()), loop, 0.5)
        sched.start()
        sched.submit(job)
        return await events(job)

    try:
        evs = run(main())
    finally:
        sched.stop()
    tokens = [t for k, v in evs if k == "tokens" for t in v]
    assert evs[-1] == ("done", "length") and 1 <= len(tokens) < 400
    assert tokens == reference_greedy(model, PROMPTS[0], len(tokens))


POISON = 63  # a token whose row the injected fault below breaks, alone or in any batch


def test_a_request_that_breaks_a_step_fails_alone_with_a_4xx(monkeypatch):
    """Mixed batch: one row's request makes every step it is part of fail. That row ends with a 422 (a client
    must not retry it: it would fail again); the rows batched with it resume from the tokens they already sent
    and finish, token for token plain greedy; requests after it are served."""
    model = tiny_model("llama", vocab=64)
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=4, max_queue=8)
    real = SpeculativeDecoder.step
    seen = {"n": 0}

    def poisoned(self, *args):
        if any(POISON in r.prompt for r in self.requests) and self.results[0].steps >= 1:
            seen["n"] += 1
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(self, *args)

    monkeypatch.setattr(SpeculativeDecoder, "step", poisoned)

    async def main():
        loop = asyncio.get_running_loop()
        good = [Job(Request(p, 12, frozenset()), loop, 60.0) for p in (PROMPTS[0], PROMPTS[1])]
        bad = Job(Request(PROMPTS[2] + [POISON], 12, frozenset()), loop, 60.0)
        for j in (good[0], bad, good[1]):  # admitted together: one batch
            sched.submit(j)
        sched.start()
        out = [await events(j) for j in (*good, bad)]
        after = Job(Request(PROMPTS[2], 5, frozenset()), loop, 60.0)
        sched.submit(after)
        return out, await events(after)

    try:
        (ev0, ev1, bad_evs), after = run(main())
    finally:
        sched.stop()
    for prompt, evs in zip(PROMPTS, (ev0, ev1)):
        assert evs[-1] == ("done", "length")
        assert [t for k, v in evs if k == "tokens" for t in v] == reference_greedy(model, prompt, 12)
    kind, error = bad_evs[-1]
    assert kind == "error" and (error.status, error.code) == (422, "decoding_failed"), bad_evs[-1]
    assert error.type == "invalid_request_error" and "inf, nan" in error.message
    assert after[-1] == ("done", "length") and seen["n"] >= 2


def test_a_cancelled_job_leaves_and_the_others_go_on():
    model = tiny_model("llama", vocab=64)
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=4, max_queue=4)

    async def main():
        loop = asyncio.get_running_loop()
        gone = Job(Request(PROMPTS[0], 300, frozenset()), loop, 60.0)
        stays = Job(Request(PROMPTS[1], 12, frozenset()), loop, 60.0)
        sched.start()
        sched.submit(gone)
        sched.submit(stays)
        await gone.queue.get()
        sched.cancel(gone)
        evs = await events(stays)
        assert evs[-1] == ("done", "length")
        for _ in range(100):
            if sched.idle:
                break
            await asyncio.sleep(0.02)
        assert sched.idle and sched.decoder.state.slots is None

    try:
        run(main())
    finally:
        sched.stop()


def test_a_request_that_ends_at_its_first_token_is_answered():
    """A row can end the moment it joins (its first token is EOS, or max_tokens 1): no step then runs for it.
    (Found by the 429 test under load: sampling drew EOS first and the step over no live row failed.)"""
    model = tiny_model("llama", vocab=64)
    first = reference_greedy(model, PROMPTS[0], 1)[0]
    sched = Scheduler(SpeculativeDecoder(model, Tok()), max_batch=2, max_queue=4)

    async def main():
        loop = asyncio.get_running_loop()
        sched.start()
        jobs = [Job(Request(PROMPTS[0], 10, frozenset([first])), loop, 60.0),
                Job(Request(PROMPTS[1], 1, frozenset()), loop, 60.0)]
        for j in jobs:
            sched.submit(j)
        return [await events(j) for j in jobs]

    try:
        eos_first, one_token = run(main())
    finally:
        sched.stop()
    assert eos_first == [("tokens", [first]), ("done", "eos")]
    assert one_token[-1] == ("done", "length") and len(one_token[0][1]) == 1


def test_loading_runs_on_a_thread_that_exits_and_hands_back_its_result_or_its_error():
    """mtp serve loads and measures on a thread that ends before decoding starts (machine.in_own_thread: a second
    live OpenMP pool throttles every barrier of the decoding thread's compute)."""
    import threading

    from mtp.errors import UserError
    from mtp.machine import in_own_thread

    seen = {}

    def load():
        seen["thread"] = threading.current_thread()
        return 42

    assert in_own_thread(load) == 42
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()

    def bad():
        raise UserError("no such model")

    with pytest.raises(UserError, match="no such model"):
        in_own_thread(bad)


def test_events_from_the_decoding_thread_reach_each_queue_in_order_with_one_wakeup_per_batch():
    """Mailbox: events posted from another thread arrive in their queues in order; posts made before the loop has
    emptied the mailbox share one wake-up byte (the loop is not woken per event)."""
    import threading

    from mtp.serve.scheduler import Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        box = Mailbox.of(loop)
        assert Mailbox.of(loop) is box
        queues = [asyncio.Queue() for _ in range(3)]
        writes = []
        write = box._write
        box._write = lambda *a: writes.append(1) or write(*a)

        def producer():
            for i in range(200):
                box.post(queues[i % 3], ("tokens", [i]))
            for q in queues:
                box.post(q, ("done", "length"))

        t = threading.Thread(target=producer)
        t.start()
        got = [[] for _ in queues]
        for q, out in zip(queues, got):
            while True:
                kind, value = await asyncio.wait_for(q.get(), 10)
                if kind == "done":
                    break
                out.extend(value)
        t.join()
        assert got == [list(range(k, 200, 3)) for k in range(3)]
        assert 1 <= len(writes) < 203 and not box.pending
        box._write = lambda *a: -1  # a wake-up byte that did not go: the loop is woken its own way
        threading.Thread(target=box.post, args=(queues[0], ("done", "stop"))).start()
        assert await asyncio.wait_for(queues[0].get(), 10) == ("done", "stop") and not box.armed

    run(main())
