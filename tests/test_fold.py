"""fold is pure, and replay equals live: property-tested over random legal event sequences."""

import copy
import random

import pytest
from hypothesis import given, settings, strategies as st

from autoresearch.eventlog import Event, EventLog
from autoresearch.machine import LEGAL, MachineError, Machines, check_event
from autoresearch.state import State, apply, fold


def _random_walk(seed: int, steps: int):
    """Drive the real machines with random legal triggers; return (events, live state)."""
    rng = random.Random(seed)
    events, live = [], State()

    def record(aggregate, trigger, source, dest, payload):
        seq = len(events) + 1
        e = Event(seq, f"2026-01-01T00:00:{seq % 60:02d}.000000Z", aggregate, trigger, source, dest,
                  copy.deepcopy(payload), f"h{seq}")
        events.append(e)
        apply(live, e)

    m = Machines(record)
    n = 0
    for _ in range(steps):
        if rng.random() < 0.3:
            t = rng.choice(sorted({t for (t, s) in LEGAL["daemon"] if s == m.daemon.state}))
            payload = {"reason": rng.choice(["x", "y"])}
            if t == "baseline_done":
                payload = {"n": n, "commit": f"c{n}", "metric": rng.random(), "sigma": 0.01, "threshold": 0.02}
            elif t == "note":
                payload = {"kind": "program_changed", "new_hash": f"p{rng.random()}"}
            m.daemon.fire(t, **payload)
            continue
        exp = m.experiment(n)
        triggers = sorted({t for (t, s) in LEGAL["experiment"] if s == exp.state})
        if not triggers:
            n += 1
            continue
        t = rng.choice(triggers)
        payload = {"usage": {"input_tokens": rng.randint(0, 9)}, "cost_usd": 0.001}
        if t in ("commit", "adopt"):
            payload.update(commit=f"c{n}", parent="p", added=rng.randint(0, 5), removed=1)
        elif t == "proposed":
            payload.update(description=f"d{n}", files={"train.py": f"x = {n}"})
        elif t == "finish":
            payload.update(metric=rng.random(), log_tail="tail")
        elif t in ("keep", "discard"):
            payload.update(metric=rng.random())
        exp.fire(t, **payload)
    return events, live


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(0, 150), cut=st.floats(0, 1))
def test_replay_equals_live_and_fold_is_pure(seed, steps, cut):
    events, live = _random_walk(seed, steps)
    snapshot = copy.deepcopy(events)
    assert fold(events) == live
    assert events == snapshot  # the fold did not touch its input
    for e in events:  # every recorded transition is in the table
        assert check_event(e.aggregate, e.trigger, e.source, e.dest) == ""
    # Folding a prefix, then the rest, gives the same state and leaves the prefix state alone.
    k = int(len(events) * cut)
    prefix = fold(events[:k])
    prefix_copy = copy.deepcopy(prefix)
    assert fold(events[k:], prefix) == live
    assert prefix == prefix_copy


def test_fold_over_a_real_log_equals_live(tmp_path):
    log = EventLog.open(tmp_path / "e.sqlite")
    live = State()
    m = Machines(lambda *args: apply(live, log.append(*args)))
    m.daemon.fire("boot", pid=1, profile="cpu")
    m.daemon.fire("prepare")
    m.daemon.fire("begin_baseline")
    m.experiment(0).fire("adopt", commit="abc", files={"train.py": "A = 1"}, description="baseline")
    assert log.state() == live
    assert live.profile == "cpu" and live.experiments[0].kind == "baseline" and live.daemon == "baseline"


def test_an_illegal_trigger_is_an_error_and_records_nothing():
    recorded = []
    m = Machines(lambda *a: recorded.append(a))
    with pytest.raises(MachineError):
        m.daemon.fire("baseline_done", n=0)
    with pytest.raises(MachineError):
        m.experiment(0).fire("keep")
    assert recorded == [] and m.daemon.state == "stopped"
    assert not hasattr(m.daemon, "to_running")  # auto_transitions=False: no back doors
    assert check_event("experiment:1", "keep", "proposing", "kept").startswith("trigger 'keep' is not allowed")


def test_a_failed_append_leaves_the_state_unchanged():
    def record(*a):
        raise OSError("database or disk is full")

    m = Machines(record)
    with pytest.raises(OSError):
        m.daemon.fire("boot")
    assert m.daemon.state == "stopped"


def test_node_notes_fold_into_state_and_a_boot_forgets_them():
    """A Ray executor's verdicts on nodes (note kind=node): the last per node; a new start checks afresh."""
    def ev(seq, trigger, source, dest, payload):
        return Event(seq, f"2026-01-01T00:00:{seq:02d}.000000Z", "daemon", trigger, source, dest, payload, f"h{seq}")

    st = fold([
        ev(1, "boot", "stopped", "starting", {}),
        ev(2, "note", "starting", "starting", {"kind": "node", "node": "a", "ip": "10.0.0.1", "usable": True, "slots": 2}),
        ev(3, "note", "starting", "starting", {"kind": "node", "node": "b", "ip": "10.0.0.2", "usable": False,
                                               "slots": 2, "reason": "autoresearch 0.0.9 on the node, 0.1.0 here"}),
        ev(4, "note", "starting", "starting", {"kind": "node", "node": "a", "ip": "10.0.0.1", "usable": False,
                                               "slots": 2, "reason": "node left the cluster"}),
    ])
    assert st.nodes == {"a": {"ip": "10.0.0.1", "usable": False, "slots": 2, "reason": "node left the cluster"},
                        "b": {"ip": "10.0.0.2", "usable": False, "slots": 2,
                              "reason": "autoresearch 0.0.9 on the node, 0.1.0 here"}}
    from autoresearch.report import status_line
    assert "nodes: 0 usable (0 slots), 1 refused (10.0.0.2: autoresearch 0.0.9 on the node" in status_line(st)
    st = fold([ev(1, "boot", "stopped", "starting", {}), ev(2, "note", "starting", "starting",
              {"kind": "node", "node": "a", "usable": True, "slots": 2}), ev(3, "boot", "stopped", "starting", {})])
    assert st.nodes == {}
