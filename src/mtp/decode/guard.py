"""Speculation that must pay for itself: the decoder measures, while it decodes, whether its drafts make tokens
come faster than plain decoding would, and decodes plainly where they do not.

The draft sizes come from a verify-cost curve and held-out head accuracies (:mod:`mtp.decode.methods`). Both can
be wrong for the text at hand: heads accept 1.2-1.5 tokens per step on requests from outside their training
data where their held-out split says 2-3, and the time a step takes besides the verify (drafting with PyTorch
heads, Python, reading back) is in no curve. So the guard times whole steps, wall clock, and compares two arms:

- ``draft``: the decoder's proposer, as sized;
- ``plain``: no draft (one token per step, the proposer not called).

Each arm's rate is its tokens per second over its latest steps. It starts with the drafts (with plain steps where
the sizing itself expected the drafts not to pay: ``start="plain"``), tries the other arm, then keeps the faster
arm and re-tries the other one now and then, less often each time it loses again (so a text that turns
repetitive halfway, where prompt lookup starts to pay, is noticed). Rates are kept per batch size (a power of
two): a server's batch changes what a step costs for both arms.

Lossless whatever it decides: only whether a step is drafted changes, never which tokens are accepted. The heads'
own state (an EAGLE-3 drafter's cache, transformer heads' cache, the hidden state sequential heads read) is
updated on plain steps too, so drafting can resume at any step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from mtp.errors import UserError

PROBE = 8
"""Steps of an arm that make a measurement (the first of them, after a switch, is not counted)."""
FIRST_DRAFT = 16
"""Steps the drafts get first: the sizing expected them to pay."""
RETRY = 32
"""Steps before the losing arm is tried again; doubles each time it loses again, up to :data:`MAX_RETRY`."""
MAX_RETRY = 512
MARGIN = 1.03
"""The other arm must be this much faster to take over (timing noise does not flip the choice back and forth)."""


@dataclass
class _Arm:
    tokens: deque = field(default_factory=lambda: deque(maxlen=2 * PROBE))
    seconds: deque = field(default_factory=lambda: deque(maxlen=2 * PROBE))
    steps: int = 0
    emitted: int = 0
    time: float = 0.0

    def rate(self) -> float | None:
        """Tokens per second over the window: all its tokens over all its time (not mean tokens over the median
        step: a lookup step with no match costs what a plain step costs, one with a long draft several times
        that, so the drafts' step times are bimodal and a median would leave the long ones out)."""
        if len(self.seconds) < PROBE // 2:
            return None
        return sum(self.tokens) / max(sum(self.seconds), 1e-9)


@dataclass
class _Bucket:
    """One batch size's arms and schedule: ``best`` runs (exploits) for ``left`` steps, then the other arm runs
    :data:`PROBE` + 1 steps (a probe) and takes over if it was faster."""

    arms: dict = field(default_factory=lambda: {"draft": _Arm(), "plain": _Arm()})
    best: str = "draft"
    current: str = "draft"
    left: int = FIRST_DRAFT  # steps of the current arm before the next decision
    retry: int = RETRY
    fresh: bool = True  # the current arm's first step after a switch (not counted: caches, branch predictors)
    switches: int = 0


class SpeedGuard:
    """Per step: :meth:`drafting` says whether to draft; :meth:`record` is told what the step gave and took.

    ``start``: the arm a batch size begins with (draft: for :data:`FIRST_DRAFT` steps; plain: for :data:`PROBE` + 1,
    then the drafts are probed). ``clock``: the time source (tests pass a fake one)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, start: str = "draft"):
        if start not in ("draft", "plain"):
            raise UserError(f"the speed guard starts with draft or plain, not {start!r}")
        self.clock, self.start = clock, start
        self.buckets: dict[int, _Bucket] = {}
        self._start: float | None = None
        self._key: int | None = None

    @staticmethod
    def _bucket_of(rows: int) -> int:
        b = 1
        while b < rows:
            b *= 2
        return b

    def drafting(self, rows: int) -> bool:
        """Starts a step of ``rows`` running rows; True: draft it."""
        if rows < 1:
            raise UserError("the speed guard needs at least one row")
        self._key = self._bucket_of(rows)
        bucket = self.buckets.get(self._key)
        if bucket is None:
            bucket = self.buckets[self._key] = _Bucket()
            if self.start == "plain":
                bucket.best = bucket.current = "plain"
                bucket.left = PROBE + 1
        self._start = self.clock()
        return bucket.current == "draft"

    def record(self, tokens: int) -> None:
        """Ends the step :meth:`drafting` started: it emitted ``tokens`` over all rows."""
        if self._start is None:
            return
        seconds = self.clock() - self._start
        self._start = None
        bucket = self.buckets[self._key]
        arm = bucket.arms[bucket.current]
        arm.steps += 1
        arm.emitted += tokens
        arm.time += seconds
        if bucket.fresh:
            bucket.fresh = False
        else:
            arm.tokens.append(tokens)
            arm.seconds.append(seconds)
        bucket.left -= 1
        if bucket.left <= 0:
            self._decide(bucket)

    def _decide(self, bucket: _Bucket) -> None:
        other = "plain" if bucket.best == "draft" else "draft"
        if bucket.current == bucket.best:  # exploited long enough: probe the other arm (afresh)
            bucket.arms[other].tokens.clear()
            bucket.arms[other].seconds.clear()
            self._run(bucket, other, PROBE + 1)
            return
        probed, best = bucket.arms[bucket.current].rate(), bucket.arms[bucket.best].rate()
        if probed is not None and (best is None or probed > MARGIN * best):
            bucket.best, bucket.retry = bucket.current, RETRY  # the probed arm takes over
            bucket.left = bucket.retry
            return
        bucket.retry = min(2 * bucket.retry, MAX_RETRY)  # lost again: probed less often
        self._run(bucket, bucket.best, bucket.retry)

    @staticmethod
    def _run(bucket: _Bucket, arm: str, steps: int) -> None:
        bucket.current, bucket.left, bucket.fresh = arm, steps, True
        bucket.switches += 1

    def report(self) -> dict:
        """Per batch size: the share of steps drafted, each arm's tokens per second over all its steps, switches."""
        out = {}
        for key, bucket in sorted(self.buckets.items()):
            d, p = bucket.arms["draft"], bucket.arms["plain"]
            out[str(key)] = {
                "drafted_steps": d.steps, "plain_steps": p.steps,
                "draft_share": round(d.steps / max(1, d.steps + p.steps), 3),
                "draft_tokens_per_s": round(d.emitted / d.time, 2) if d.time else None,
                "plain_tokens_per_s": round(p.emitted / p.time, 2) if p.time else None,
                "switches": bucket.switches}
        return out
