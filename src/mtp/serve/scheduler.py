"""Continuous batching over mtp's engine: one worker thread owns the decoder, requests come and go between steps.

A request becomes a :class:`Job`: it waits in a bounded queue (``max_queue``; beyond it the server answers
429), joins the running batch between two steps when a row is free (``max_batch`` rows; the new rows'
prompts are prefilled together, then decoded with the others, each row accepting its own number of tokens
per step), and leaves it when it finishes, when its client goes away or when its deadline passes. Tokens go
back to the request's coroutine as events (``tokens``, ``done``, ``error``) through its event loop.

The decoder is touched by the worker thread only; the HTTP side only appends to the queue and sets flags.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field

from mtp.decode.engine import SpeculativeDecoder, Request
from mtp.errors import NoRoomYet, UserError
from mtp.serve.protocol import ApiError


@dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    timeout: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0
    cancelled: bool = False  # set by the HTTP side (client gone); the worker drops the row

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout

    def send(self, kind: str, value=None) -> None:
        """An event to the request's coroutine (from the worker thread)."""
        try:
            Mailbox.of(self.loop).post(self.queue, (kind, value))
        except Exception:  # noqa: BLE001 - no mailbox (no fds left, say): the loop's own way, never a raise here
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
            except RuntimeError:  # its event loop is gone (server stopped): nobody is listening
                pass


class Mailbox:
    """Events from the decoding thread to an event loop, without handing the GIL to that loop at each one.

    ``loop.call_soon_threadsafe`` wakes the loop with a socket ``send``, which releases the GIL: the loop's thread
    wakes, takes it, and the decoding thread waits until the loop has handled the event (until its next blocking
    call), every step. Here events go into a deque; the first one since the loop last emptied it writes one
    wake-up byte with a libc ``write`` that keeps the GIL (ctypes.PyDLL), so the decoding thread goes on to its
    next ``llama_decode`` (which releases the GIL) and the loop handles the events while that runs. The loop reads
    the byte through ``add_reader`` (public asyncio API) and puts every pending event into its queue."""

    _boxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        box = cls._boxes.get(loop)
        if box is None:
            with cls._lock:
                box = cls._boxes.get(loop)
                if box is None:
                    box = cls._boxes[loop] = cls(loop)
        return box

    def __init__(self, loop: asyncio.AbstractEventLoop):  # the loop is held weakly, as the registry holds it
        self.loop = weakref.ref(loop)
        self.pending: collections.deque = collections.deque()
        self.armed = False  # a wake-up byte is on its way: no other until the loop has emptied the deque
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)
        self._write = _gil_keeping_write()
        weakref.finalize(loop, _close_all, self.rsock, self.wsock)
        try:
            loop.call_soon_threadsafe(loop.add_reader, self.rsock.fileno(), self._deliver)
        except RuntimeError:  # the loop is closed: nobody will listen
            pass

    def post(self, queue: asyncio.Queue, item) -> None:
        """From any thread: ``item`` into ``queue`` on the loop's thread."""
        loop = self.loop()
        if loop is None or loop.is_closed():  # nobody is listening: keep nothing
            self.pending.clear()
            return
        self.pending.append((queue, item))
        if not self.armed:
            self.armed = True
            try:
                wrote = self._write(self.wsock.fileno(), b"\0", 1)
            except (OSError, ValueError):
                wrote = -1
            if wrote != 1:  # the byte did not go: wake the loop its own way
                self.armed = False
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    self.pending.clear()

    def _deliver(self) -> None:
        try:
            self.rsock.recv(4096)
        except OSError:  # nothing to read (a wake-up by call_soon_threadsafe), or closed
            pass
        self.armed = False
        while self.pending:
            queue, item = self.pending.popleft()
            queue.put_nowait(item)


def _close_all(*socks) -> None:
    for s in socks:
        s.close()


def _gil_keeping_write():
    """libc's write(2) called without releasing the GIL (os.write and socket.send release it); os.write where
    the C library cannot be reached this way."""
    try:
        fn = ctypes.PyDLL(None).write
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_ssize_t
        return fn
    except (OSError, AttributeError):
        return lambda fd, data, n: os.write(fd, data[:n])


class Scheduler:
    def __init__(self, decoder: SpeculativeDecoder, max_batch: int = 8, max_queue: int = 64, metrics=None):
        self.decoder, self.max_batch, self.max_queue, self.metrics = decoder, max_batch, max_queue, metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # row i of the decoder's batch is running[i]
        self.cond = threading.Condition()
        self.draining = False
        self.drain_deadline = float("inf")
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="mtp-decoder", daemon=True)
        self._window: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, tokens, rows) per step
        self._full = False  # the engine had no room for the queue's head: admit nothing until a row leaves

    # ------------------------------------------------------------------ the HTTP side

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it: 503 while shutting down, 429 when the queue is full."""
        with self.cond:
            if self.draining or self.stopped:
                raise ApiError(503, "the server is shutting down", code="shutting_down", type="server_error")
            free = max(0, self.max_batch - len(self.running))  # rows free at the next step take these at once
            if len(self.waiting) >= self.max_queue + free:
                raise ApiError(429, f"too many requests: {len(self.running)} decoding and {len(self.waiting)} "
                               f"waiting (--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later",
                               code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self._gauges()
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its row is freed before the next step."""
        job.cancelled = True
        with self.cond:
            self.cond.notify()

    def drain(self, grace: float) -> None:
        """Stop taking requests; those already in finish within ``grace`` seconds or end with an error event."""
        with self.cond:
            self.draining = True
            self.drain_deadline = min(self.drain_deadline, time.monotonic() + grace)
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End every job (with an error event) and the worker thread."""
        self.drain(0.0)
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def queue_depth(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        import torch

        self.decoder.reset()  # rows left by an earlier generate() call are not ours
        with torch.inference_mode(), self.decoder.session():
            while True:
                with self.cond:
                    while self.idle and not self.stopped:
                        self.cond.wait(0.5)
                    if self.stopped and self.idle:
                        return
                    admit = self._take()
                try:
                    if time.monotonic() >= self.drain_deadline:
                        self._end_all(ApiError(503, "the server shut down before this request finished",
                                               code="shutting_down", type="server_error"))
                        continue
                    if admit:
                        self._admit(admit)
                    if self.running and not all(self.decoder.done):
                        self._step()
                    self._retire()
                except Exception as e:  # noqa: BLE001 - whatever broke, the worker (and the server) go on
                    traceback.print_exc(file=sys.stderr)
                    self._end_all(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error",
                                           type="server_error"), waiting=False)

    def _take(self) -> list[Job]:
        """Jobs that join the batch now (the queue's head, up to the free rows); expired ones end here."""
        now, admit, keep = time.monotonic(), [], collections.deque()
        while self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:
                self._count("cancelled")
            elif now >= job.deadline:
                # the server was busy: try again later
                self._fail(job, ApiError(503, f"timed out after {job.timeout:g} s waiting for a free row "
                                              f"(--timeout)", code="timeout", type="server_error",
                                         headers={"Retry-After": "1"}))
            elif len(self.running) + len(admit) < self.max_batch and not (self._full and self.running):
                admit.append(job)
            else:
                keep.append(job)
        self.waiting = keep
        self._gauges()
        return admit

    def _admit(self, jobs: list[Job]) -> None:
        first = len(self.running)
        self.running.extend(jobs)
        try:
            self.decoder.add([j.request for j in jobs], self._on_tokens)
            self._full = False
        except Exception as e:  # noqa: BLE001 - these requests fail; the running batch goes on
            del self.running[first:]
            if isinstance(e, NoRoomYet) and first:  # they fit once rows leave (an engine with a fixed KV budget)
                with self.cond:
                    self.waiting.extendleft(reversed(jobs))
                self._full = True
                return
            if len(jobs) > 1:  # one request's failure is its own: one at a time, in order, as many as fit
                for k, job in enumerate(jobs):
                    self._admit([job])
                    if self._full:  # this one went back to the queue: so do the ones behind it
                        with self.cond:
                            self.waiting.popleft()
                            self.waiting.extendleft(reversed(jobs[k:]))
                        return
                return
            # alone (a new row is prefilled on its own): the failure is this request's, and it would fail again
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
            self._fail(jobs[0], self._own_failure(e))
            return

    def _on_tokens(self, row: int, tokens: list[int]) -> None:
        job = self.running[row]
        if tokens:
            if job.first_token is None:
                job.first_token = time.monotonic()
                if self.metrics:
                    self.metrics.ttft.observe(job.first_token - job.submitted)
            job.tokens += len(tokens)
            if self.metrics:  # every token a client receives, the prefill's first one too (usage counts it)
                self.metrics.tokens.inc(len(tokens))
            job.send("tokens", tokens)

    def _step(self) -> None:
        before = sum(j.tokens for j in self.running)
        live = sum(1 for d in self.decoder.done if not d)
        try:
            self.decoder.step(self._on_tokens)
        except Exception:  # noqa: BLE001 - the batch's state is lost, its requests are not
            traceback.print_exc(file=sys.stderr)
            self._recover()
            return
        new = sum(j.tokens for j in self.running) - before
        now = time.monotonic()
        self._window.append((now, new, live))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        if self.metrics:
            self.metrics.verify_steps.inc()
            self.metrics.row_steps.inc(live)
            span = now - self._window[0][0] if len(self._window) > 1 else 0.0
            if span > 0:
                self.metrics.tokens_per_s.set(sum(w[1] for w in list(self._window)[1:]) / span)
            rows = sum(w[2] for w in self._window)
            if rows:
                self.metrics.acceptance.set(sum(w[1] for w in self._window) / rows)

    def _retire(self) -> None:
        """Rows that are done, cancelled or past their deadline leave the batch."""
        now, gone = time.monotonic(), []
        for row, job in enumerate(self.running):
            if self.decoder.done[row]:
                job.send("done", self.decoder.results[row].finish)
                self._count("ok")
                if self.metrics:
                    self.metrics.latency.observe(now - job.submitted)
                gone.append(row)
            elif job.cancelled:
                self._count("cancelled")
                gone.append(row)
            elif now >= job.deadline:
                # its own decoding took too long: the answer ends with the tokens it has, as max_tokens would end
                # it (transformers' max_time), not with an error that throws them away
                job.send("done", "length")
                self._count("time_limit")
                gone.append(row)
        if gone:
            self._full = False
            self.decoder.drop(gone)
            self.running = [j for i, j in enumerate(self.running) if i not in set(gone)]
        self._gauges()

    @staticmethod
    def _own_failure(e: Exception) -> ApiError:
        """The error of a request that failed on its own: a 4xx (it would fail again; clients must not retry it)."""
        if isinstance(e, UserError):
            return ApiError(400, str(e))
        return ApiError(422, f"this request cannot be decoded: {type(e).__name__}: {str(e)[:200]}",
                        code="decoding_failed")

    def _recover(self) -> None:
        """A step of the batch failed. Rows that had finished end as they were; every other row resumes alone
        (its prompt and the tokens it already sent re-read, :attr:`Request.generated`) for one step: a row that
        fails again on its own fails alone (a 4xx), the others go on together. Each retry decodes at least one
        more token per row, so a failure that comes from batching itself cannot loop."""
        old, results, done = self.running, list(self.decoder.results), list(self.decoder.done)
        self.running = []
        self.decoder.reset()
        alive = []
        for job, res, finished in zip(old, results, done):
            if job.cancelled:
                self._count("cancelled")
            elif self._settle(job, res, finished):
                alive.append(job)
        again = []
        for job in alive:
            self.running = [job]
            try:
                self.decoder.add([job.request], self._on_tokens)
                if not self.decoder.done[0]:
                    self.decoder.step(self._on_tokens)
                if self._settle(job, self.decoder.results[0], self.decoder.done[0]):
                    again.append(job)
            except Exception as e:  # noqa: BLE001 - this row's own failure
                traceback.print_exc(file=sys.stderr)
                self._fail(job, self._own_failure(e))
            finally:
                self.running = []
                self.decoder.reset()
        self._full = False
        if again:
            self._admit(again)
        self._gauges()

    def _settle(self, job: Job, result, finished: bool) -> bool:
        """A row taken out of the batch: a finished one gets its done event; any other resumes from the tokens it
        sent (its request's ``generated``) and True is returned."""
        if finished:
            job.send("done", result.finish)
            self._count("ok")
            return False
        job.request = dataclasses.replace(job.request, generated=tuple(result.tokens))
        return True

    def _end_all(self, error: ApiError, waiting: bool = True) -> None:
        for job in self.running:
            if not job.cancelled:
                self._fail(job, error)
        self.running = []
        self._full = False
        self.decoder.reset()
        if waiting:
            with self.cond:
                jobs, self.waiting = list(self.waiting), collections.deque()
            for job in jobs:
                self._fail(job, error)
        self._gauges()

    def _fail(self, job: Job, error: ApiError) -> None:
        job.send("error", error)
        self._count(error.code or "error")

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.outcomes.labels(outcome=outcome).inc()

    def _gauges(self) -> None:
        if not self.running:  # idle: no tokens per second (not the last busy moment's), a fresh window after
            self._window.clear()
        if self.metrics:
            self.metrics.queue.set(len(self.waiting))
            self.metrics.running.set(len(self.running))
            if not self.running:
                self.metrics.tokens_per_s.set(0)
