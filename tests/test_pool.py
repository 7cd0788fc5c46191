"""proposers/pool.py: proposals in real worker threads, with a fixed-latency fake proposer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import structlog

from autoresearch.proposers.base import Proposal, ProposalContext, ProposerUnavailable
from autoresearch.proposers.pool import ProposalPool

LATENCY = 1.0


def ctx(n: int, deadline_s: float = 60.0) -> ProposalContext:
    return ProposalContext(
        workspace=Path("."), n=n, program="", editable=("train.py",), files={"train.py": "LR = 1\n"},
        history=(), best_metric=None, direction="minimize", last_failure=None, harness_dir=None,
        deadline=time.monotonic() + deadline_s)


class Fake:
    """Answers after `latency` seconds; `obey=False` ignores ctx.cancel (a stuck agent)."""

    def __init__(self, kind: str, latency: float = LATENCY, obey: bool = True,
                 error: BaseException | None = None):
        self.name, self.latency, self.obey, self.error = kind, latency, obey, error
        self.cancelled: dict[int, bool] = {}
        self.returned: set[int] = set()
        self.logged: dict[int, dict] = {}

    def propose(self, c: ProposalContext) -> Proposal:
        self.logged[c.n] = structlog.contextvars.get_contextvars()
        if self.obey:
            self.cancelled[c.n] = c.cancel.wait(self.latency)
        else:
            time.sleep(self.latency)
            self.cancelled[c.n] = c.cancel.is_set()
        if self.error is not None:
            raise self.error
        self.returned.add(c.n)
        return Proposal(description=f"idea {c.n}", files={"train.py": f"LR = {c.n}\n"},
                        proposer=self.name)


def collect(pool: ProposalPool, wake: threading.Event, count: int, timeout: float = 10.0):
    """What done() hands out until `count` outcomes came, sleeping on the wake event."""
    got: list = []
    end = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < end:
        wake.wait(0.5)
        wake.clear()
        got += pool.done()
    return got


def test_three_proposals_at_once_take_one_latency_and_wake_the_coordinator():
    fake, wake = Fake("anthropic"), threading.Event()
    pool = ProposalPool(lambda kind: fake, wake=wake)
    t0 = time.monotonic()
    for n in (1, 2, 3):
        pool.want(n, ctx(n), "anthropic")
    assert time.monotonic() - t0 < 0.1  # want() starts the work and returns
    assert pool.busy() == {1, 2, 3}
    got = collect(pool, wake, 3)
    elapsed = time.monotonic() - t0
    assert sorted(n for n, _ in got) == [1, 2, 3]
    assert all(isinstance(p, Proposal) and p.description == f"idea {n}" for n, p in got)
    assert LATENCY <= elapsed < 1.6 * LATENCY, elapsed  # side by side: one latency, not three
    assert pool.busy() == set() and pool.done() == []  # each outcome once


def test_done_never_blocks_while_proposals_run():
    fake = Fake("offline")
    pool = ProposalPool(lambda kind: fake)
    for n in (1, 2, 3):
        pool.want(n, ctx(n), "offline")
    worst, outcomes = 0.0, []
    end = time.monotonic() + LATENCY / 2
    while time.monotonic() < end:  # the proposers are mid-way
        t0 = time.perf_counter()
        outcomes += pool.done()
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.005)
    assert outcomes == [] and worst < 0.02, worst
    pool.close(wait=5)


def test_cancel_sets_the_flag_and_drops_the_outcome_now_and_later():
    fake, wake = Fake("anthropic", obey=False, latency=0.3), threading.Event()
    pool = ProposalPool(lambda kind: fake, wake=wake)
    contexts = {n: ctx(n) for n in (1, 2, 3)}
    for n, c in contexts.items():
        pool.want(n, c, "anthropic")
    pool.cancel(1)  # still proposing
    assert contexts[1].cancel.is_set() and pool.busy() == {2, 3}
    time.sleep(0.6)  # all three workers have returned
    assert fake.returned == {1, 2, 3} and fake.cancelled[1] is True and fake.cancelled[2] is False
    pool.cancel(3)  # answered, not handed out yet: dropped too
    assert [n for n, _ in pool.done()] == [2]
    assert pool.busy() == set() and pool.done() == []
    pool.cancel(42)  # unknown: nothing to do
    # What they cost is not lost: the dropped outcomes come out of dropped(), once.
    assert sorted((n, p.description) for n, p in pool.dropped()) == [(1, "idea 1"), (3, "idea 3")]
    assert pool.dropped() == []


def test_a_proposal_past_its_deadline_and_grace_is_given_up():
    fake, wake = Fake("anthropic", latency=1.5, obey=False), threading.Event()
    pool = ProposalPool(lambda kind: fake, wake=wake, grace=0.3)
    c = ctx(7, deadline_s=0.2)
    t0 = time.monotonic()
    pool.want(7, c, "anthropic")
    [(n, outcome)] = collect(pool, wake, 1)
    assert 0.5 - 0.05 <= time.monotonic() - t0 < 1.5  # deadline + grace, and no later
    assert n == 7 and isinstance(outcome, ProposerUnavailable)
    assert outcome.reason == "the proposal deadline passed without an answer"
    assert c.cancel.is_set() and pool.busy() == set()
    while 7 not in fake.returned and time.monotonic() - t0 < 5:
        time.sleep(0.01)  # the stuck proposer finally answers: dropped
    assert 7 in fake.returned and pool.done() == [] and not wake.is_set()
    [(n, late)] = pool.dropped()
    assert n == 7 and isinstance(late, Proposal)  # for its spend only


def test_the_default_grace_is_thirty_seconds():
    fake, wake = Fake("anthropic", latency=0.2), threading.Event()
    pool = ProposalPool(lambda kind: fake, wake=wake)
    pool.want(1, ctx(1, deadline_s=-29.0), "anthropic")  # 1 s of grace left: still answers
    [(_, outcome)] = collect(pool, wake, 1)
    assert isinstance(outcome, Proposal)


def test_an_exception_in_the_proposer_or_its_factory_comes_out_as_the_outcome():
    boom = ValueError("model said no")
    fake, wake = Fake("anthropic", latency=0.0, error=boom), threading.Event()

    def make(kind):
        if kind == "broken":
            raise RuntimeError("no such proposer")
        return fake

    pool = ProposalPool(make, wake=wake)
    pool.want(1, ctx(1), "anthropic")
    pool.want(2, ctx(2), "broken")
    got = dict(collect(pool, wake, 2))
    assert got[1] is boom
    assert isinstance(got[2], RuntimeError) and str(got[2]) == "no such proposer"
    interrupt = Fake("anthropic", latency=0.0, error=KeyboardInterrupt())
    pool2 = ProposalPool(lambda kind: interrupt, wake=wake)
    pool2.want(3, ctx(3), "anthropic")  # even a BaseException stays in the worker
    [(_, outcome)] = collect(pool2, wake, 1)
    assert isinstance(outcome, KeyboardInterrupt)


def test_agent_clis_run_one_at_a_time_in_memory_proposers_side_by_side():
    cli, api = Fake("command", latency=0.5, obey=False), Fake("anthropic", latency=0.2)
    wake = threading.Event()
    pool = ProposalPool(lambda kind: cli if kind == "command" else api, wake=wake)
    assert pool.may_start("command")
    pool.want(1, ctx(1), "command")
    assert not pool.may_start("command")
    assert pool.may_start("anthropic") and pool.may_start("offline")
    with pytest.raises(RuntimeError, match="only one at a time"):
        pool.want(2, ctx(2), "command")
    pool.want(3, ctx(3), "anthropic")  # beside the agent CLI
    with pytest.raises(ValueError, match="already being proposed"):
        pool.want(3, ctx(3), "anthropic")
    pool.cancel(1)  # cancelled, but the agent is still winding down in the worktree
    assert not pool.may_start("command")
    assert [n for n, _ in collect(pool, wake, 1)] == [3]
    end = time.monotonic() + 5
    while not pool.may_start("command") and time.monotonic() < end:
        time.sleep(0.01)
    assert 1 in cli.returned  # it became free only once the worker had ended
    pool.want(2, ctx(2), "command")
    assert [n for n, _ in collect(pool, wake, 1)] == [2]


def test_each_worker_logs_with_its_own_experiment_number():
    fake, wake = Fake("anthropic", latency=0.0), threading.Event()
    pool = ProposalPool(lambda kind: fake, wake=wake)
    structlog.contextvars.bind_contextvars(experiment=99)
    try:
        for n in (4, 5):
            pool.want(n, ctx(n), "anthropic")
        collect(pool, wake, 2)
        assert structlog.contextvars.get_contextvars()["experiment"] == 99  # caller's untouched
    finally:
        structlog.contextvars.unbind_contextvars("experiment")
    assert fake.logged[4]["experiment"] == 4 and fake.logged[5]["experiment"] == 5


def test_close_cancels_everything_and_waits_for_the_workers():
    fake = Fake("anthropic")
    pool = ProposalPool(lambda kind: fake)
    contexts = [ctx(n) for n in (1, 2)]
    for c in contexts:
        pool.want(c.n, c, "anthropic")
    t0 = time.monotonic()
    assert pool.close(wait=5) is True
    assert time.monotonic() - t0 < LATENCY / 2  # the workers obeyed the cancel at once
    assert all(c.cancel.is_set() for c in contexts) and pool.done() == [] and pool.busy() == set()
    assert sorted(n for n, _ in pool.dropped()) == [1, 2]  # their spend can still be recorded
    with pytest.raises(RuntimeError, match="closed"):
        pool.want(3, ctx(3), "anthropic")
