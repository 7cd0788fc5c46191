"""Proposals in worker threads, so that the coordinator's one thread never waits for an agent.

The coordinator asks for a proposal with ``want(n, ctx, kind)`` and goes on; a worker thread
builds the proposer for ``kind`` and calls ``propose(ctx)``. Outcomes come back through
``done()`` (it never blocks), each exactly once, as ``(n, Proposal)`` or ``(n, exception)``:
an exception raised by a proposer is a value here, never raised in the pool or lost.
A finishing worker sets the optional ``wake`` event, so the coordinator can sleep on it.

Deadlines: a proposal still running ``grace`` seconds after ``ctx.deadline`` is given up: its
``ctx.cancel`` is set (the proposer stops its agent) and it comes out of ``done()`` as
``ProposerUnavailable``; whatever the worker returns later is dropped. ``cancel(n)`` drops a
proposal the same way, with no outcome at all. A dropped outcome may still have cost tokens:
``dropped()`` hands those outcomes out (each once, never blocks), so that the spend is recorded.

Agent CLIs (kind ``command``) edit the human's worktree, so only one runs at a time: while a
command worker thread is alive (even one cancelled and still winding down its agent),
``may_start("command")`` is False. In-memory proposers (offline, anthropic) run side by side,
and next to a command one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import structlog

from .base import Proposal, ProposalContext, Proposer, ProposerUnavailable

DEADLINE_GRACE_S = 30.0  # past ctx.deadline, before a silent proposer is given up
WORKTREE_KINDS = frozenset({"command"})  # proposers that edit the human's worktree: one at a time

Outcome = Proposal | BaseException


@dataclass(eq=False)
class _Job:
    n: int
    ctx: ProposalContext
    kind: str
    thread: threading.Thread | None = None
    timer: threading.Timer | None = None
    live: bool = True  # False once its outcome is queued, or it was cancelled: later results drop


class ProposalPool:
    def __init__(self, make_proposer: Callable[[str], Proposer], *,
                 wake: threading.Event | None = None, grace: float = DEADLINE_GRACE_S):
        self._make = make_proposer
        self._wake = wake
        self._grace = grace
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}  # wanted, outcome not yet handed out by done()
        self._ready: list[tuple[int, Outcome]] = []
        self._dropped: deque[tuple[int, Outcome]] = deque(maxlen=1000)  # for their spend only
        self._threads: list[tuple[str, threading.Thread]] = []  # (kind, worker), alive or not
        self._closed = False

    def want(self, n: int, ctx: ProposalContext, kind: str) -> None:
        """Start proposing for experiment `n` in a worker thread; returns at once."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the proposal pool is closed")
            if n in self._jobs:
                raise ValueError(f"experiment {n} is already being proposed")
            if not self._may_start(kind):
                raise RuntimeError(f"a {kind} proposer is already running: only one at a time")
            job = _Job(n, ctx, kind)
            job.thread = threading.Thread(target=self._work, args=(job,), name=f"proposer-{n}",
                                          daemon=True)
            delay = max(0.0, ctx.deadline + self._grace - time.monotonic())
            job.timer = threading.Timer(delay, self._expire, args=(job,))
            job.timer.daemon = True
            self._jobs[n] = job
            self._threads = [(k, t) for k, t in self._threads if t.is_alive()]
            self._threads.append((kind, job.thread))
            job.thread.start()
            job.timer.start()

    def done(self) -> list[tuple[int, Outcome]]:
        """The outcomes that arrived since the last call, each once, in arrival order. Never blocks
        on a proposer: the lock is only ever held for bookkeeping."""
        with self._lock:
            ready, self._ready = self._ready, []
            for n, _ in ready:
                self._jobs.pop(n, None)
            return ready

    def cancel(self, n: int) -> None:
        """Stop proposing for `n`: sets its ctx.cancel; its outcome, now or later, is dropped."""
        with self._lock:
            job = self._jobs.pop(n, None)
            if job is None:
                return
            self._dropped.extend((m, o) for m, o in self._ready if m == n)
            self._ready = [(m, o) for m, o in self._ready if m != n]
            self._retire(job)

    def dropped(self) -> list[tuple[int, Outcome]]:
        """Outcomes of cancelled or expired proposals (done() never gives them), each once: a
        proposer that answered late may still have spent tokens (its usage and cost_usd)."""
        with self._lock:
            out = list(self._dropped)
            self._dropped.clear()
            return out

    def busy(self) -> set[int]:
        """Experiments wanted whose outcome done() has not handed out yet (nor cancelled)."""
        with self._lock:
            return set(self._jobs)

    def may_start(self, kind: str) -> bool:
        with self._lock:
            return self._may_start(kind)

    def close(self, wait: float = 0.0) -> bool:
        """Cancel every proposal (on stop); then wait up to `wait` seconds for the workers to
        end. True when none is left running."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                self._retire(job)
            self._jobs.clear()
            self._dropped.extend(self._ready)
            self._ready.clear()
            threads = [t for _, t in self._threads]
        deadline = time.monotonic() + wait
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # -- internals

    def _may_start(self, kind: str) -> bool:
        return kind not in WORKTREE_KINDS or not any(
            k in WORKTREE_KINDS and t.is_alive() for k, t in self._threads)

    def _work(self, job: _Job) -> None:
        # A new thread starts with empty contextvars: bind the experiment, so that every log
        # line the proposer writes says which experiment it is for.
        structlog.contextvars.bind_contextvars(experiment=job.n, proposer=job.kind)
        try:
            outcome: Outcome = self._make(job.kind).propose(job.ctx)
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinator as a value
            outcome = exc
        self._deliver(job, outcome)

    def _expire(self, job: _Job) -> None:
        self._deliver(job, ProposerUnavailable("the proposal deadline passed without an answer"),
                      expired=True)

    def _deliver(self, job: _Job, outcome: Outcome, expired: bool = False) -> None:
        with self._lock:
            if not job.live:  # cancelled, expired, or already answered
                if not expired:
                    self._dropped.append((job.n, outcome))
                return
            self._retire(job, cancel=expired)  # a late proposer is told to stop
            self._ready.append((job.n, outcome))
        if self._wake is not None:
            self._wake.set()

    def _retire(self, job: _Job, cancel: bool = True) -> None:
        job.live = False
        if cancel:
            job.ctx.cancel.set()
        if job.timer is not None:
            job.timer.cancel()
