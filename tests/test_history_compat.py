"""History stays compatible (issue 12, item 7): a workspace made by the code before slots.

tests/data/workspace-v1.tar.gz was made by tests/data/make_v1_workspace.py with the code of
commit d29c175: a baseline, experiments 1-4 (3 discarded, the others kept), and experiment 5
left in flight by a kill -9 of the daemon (the event log's -wal as the kill left it). It was
made in another directory, so the slot worktree's git link points nowhere here (a workspace
that was moved). Every version of autoresearch from now on must verify it, show it, and resume
it: this module is the guard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest

from autoresearch.dashboard.source import LogReader
from autoresearch.eventlog import SCHEMA_VERSION, Event, EventLog
from autoresearch.machine import Machines
from autoresearch.report import results_rows, results_tsv
from autoresearch.state import State, apply, fold

from chaos_fixtures import check_invariants
from daemon_fixtures import cli, git

DATA = Path(__file__).parent / "data" / "workspace-v1.tar.gz"
# What the old code recorded (experiment: state, metric); the fixture's train.py computes them.
RECORDED = {0: ("kept", 1.987634), 1: ("kept", 1.323364), 2: ("kept", 1.153968),
            3: ("discarded", 1.275976), 4: ("kept", 1.143168), 5: ("training", None)}


def events(root: Path) -> list:
    """The log's events, read as `status` reads them (a writer would upgrade the log)."""
    log = EventLog.open_reader(root / ".autoresearch" / "events.sqlite")
    try:
        return list(log.events())
    finally:
        log.close()


def schema(root: Path) -> str:
    conn = sqlite3.connect(f"file:{root / '.autoresearch' / 'events.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    finally:
        conn.close()


def log_digest(root: Path) -> str:
    """The log's content as stored (the main file and its -wal)."""
    h = hashlib.sha256()
    for name in ("events.sqlite", "events.sqlite-wal"):
        h.update((root / ".autoresearch" / name).read_bytes())
    return h.hexdigest()


@pytest.fixture
def v1(tmp_path):
    """(workspace, fixture.json) unpacked fresh for each test."""
    with tarfile.open(DATA) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "workspace"
    return root, json.loads((tmp_path / "fixture.json").read_text())


def test_fixture_is_small_and_as_described(v1):
    root, meta = v1
    assert DATA.stat().st_size < 200_000
    assert (root / ".autoresearch" / "events.sqlite-wal").stat().st_size > 0  # the kill's unmerged tail
    # A moved workspace: the slot worktree's git link names the directory it was made in.
    link = (root / ".autoresearch" / "slots" / "0" / ".git").read_text()
    assert meta["path"] in link and str(root) not in link


def test_verify_is_clean(v1):
    root, meta = v1
    assert schema(root) == "1"
    out = cli("verify", str(root))
    assert out.returncode == 0, out.stderr
    assert f"ok: {meta['events']} events" in out.stdout
    assert schema(root) == "1"
    assert "every transition legal" in out.stdout


def test_status_and_results_show_the_recorded_experiments(v1):
    root, meta = v1
    stored = log_digest(root)
    out = cli("results", str(root))
    assert out.returncode == 0, out.stderr
    # The same table, byte for byte, as the code that made the workspace printed.
    assert out.stdout == meta["results_tsv"]
    rows = [line.split("\t") for line in out.stdout.splitlines()[1:]]
    assert [(r[3], float(r[1])) for r in rows] == [
        ("keep" if s == "kept" else "discard", m) for s, m in list(RECORDED.values())[:5]]

    out = cli("status", str(root))
    assert out.returncode == 0, out.stderr
    assert "exp 5 training" in out.stdout
    assert "best 1.143168" in out.stdout and "(exp 4," in out.stdout
    assert "4 experiments: 3 kept, 1 discarded" in out.stdout
    assert "no daemon is running" in out.stdout

    out = cli("status", str(root), "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["current"]["n"] == 5 and st["current"]["state"] == "training"
    assert st["best_metric"] == 1.143168 and st["running"] is False

    out = cli("history", str(root), "--experiment", "3")
    assert out.returncode == 0, out.stderr
    assert "discard" in out.stdout

    out = cli("show", str(root), "3")
    assert out.returncode == 0, out.stderr
    assert "discarded" in out.stdout and "-LEARNING_RATE = 0.108" in out.stdout and "+LEARNING_RATE = 0.143" in out.stdout

    out = cli("plot", str(root), "-o", str(root.parent / "progress.png"))
    assert out.returncode == 0, out.stderr
    assert (root.parent / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    folded = fold(events(root))
    assert {n: (e.state, e.metric) for n, e in folded.experiments.items()} == RECORDED
    reader = LogReader(root / ".autoresearch")  # the dashboard's view of it
    try:
        assert len(reader.poll()[0]) == meta["events"]
        seen = reader.state  # (kept flat: without the proposals' files and the log tails)
        assert {n: (e.state, e.metric, e.commit) for n, e in seen.experiments.items()} == \
            {n: (e.state, e.metric, e.commit) for n, e in folded.experiments.items()}
        assert (seen.best_commit, seen.best_metric, seen.seq) == (folded.best_commit, folded.best_metric, folded.seq)
    finally:
        reader.close()
    # Readers wrote nothing: the log, its -wal and its schema version (1) are as the old code left them.
    assert log_digest(root) == stored and schema(root) == "1"


def test_run_resumes_the_interrupted_experiment_then_numbers_go_on(v1):
    root, meta = v1
    before_events = events(root)
    before = fold(before_events)
    commit5 = git(root, "rev-parse", "refs/autoresearch/exp/5")
    assert before.experiments[5].commit == commit5

    out = cli("run", str(root), "--max-experiments", "2", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]

    after = fold(events(root))
    assert sorted(after.experiments) == [0, 1, 2, 3, 4, 5, 6]
    for n in range(5):  # the old outcomes are untouched
        assert (after.experiments[n].state, after.experiments[n].metric) == RECORDED[n]
    five = after.experiments[5]
    # Experiment 5 ran again under its own number, from its recorded commit.
    assert five.terminal and five.state in ("kept", "discarded") and five.metric is not None
    assert five.commit == commit5 == git(root, "rev-parse", "refs/autoresearch/exp/5")
    assert five.description == before.experiments[5].description
    assert after.experiments[6].terminal
    triggers = [e.trigger for e in events(root) if e.experiment == 5]
    assert "interrupt" in triggers and triggers.count("start") == 1

    assert schema(root) == str(SCHEMA_VERSION)  # the daemon, a writer, upgraded it; events kept
    old = {e.seq: e.hash for e in events(root) if e.seq <= meta["events"]}
    assert len(old) == meta["events"] and old == {e.seq: e.hash for e in before_events}
    out = cli("verify", str(root))
    assert out.returncode == 0, out.stderr
    assert check_invariants(root) == []
    # results: the old rows as they were, the new ones after them, in experiment order.
    table = cli("results", str(root)).stdout
    assert table.startswith(meta["results_tsv"])
    assert table == results_tsv(after) and len(table.splitlines()) == 1 + 7


# ------------------------------------------------------------------ the fold, old and new events

class Recorder:
    """Legal events through the real machines (as the daemon records them), folded live."""

    def __init__(self):
        self.events, self.live = [], State()
        self.m = Machines(self._record)

    def _record(self, aggregate, trigger, source, dest, payload):
        seq = len(self.events) + 1
        event = Event(seq, f"2026-11-29T14:00:{seq:02d}.000000Z", aggregate, trigger, source, dest,
                      json.loads(json.dumps(payload)), f"h{seq}")
        self.events.append(event)
        apply(self.live, event)

    def baseline(self, metric):
        d, e = self.m.daemon, self.m.experiment(0)
        d.fire("boot", pid=1)
        d.fire("prepare")
        d.fire("begin_baseline")
        e.fire("adopt", commit="c0", description="baseline")
        e.fire("launch", log="runs/0.log", attempt=1, sandbox="off")
        e.fire("finish", exit_code=0, metric=metric, memory_gb=0.5)
        e.fire("keep", metric=metric, reason="baseline")
        d.fire("baseline_done", n=0, commit="c0", metric=metric)

    def run(self, n, *, start=None, launch=None):
        """Experiment n from start to its run's end (judging); its outcome is fired by the test."""
        e = self.m.experiment(n)
        e.fire("start", kind="experiment", proposer="offline", **(start or {}))
        e.fire("proposed", description=f"change {n}", files={"train.py": f"X = {n}"})
        e.fire("commit", commit=f"c{n}", parent=(start or {}).get("parent", "c0"))
        e.fire("launch", log=f"runs/{n}.log", attempt=1, sandbox="off", **(launch or {}))
        return e


def test_the_fold_reads_the_new_fields_and_old_logs_fold_without_them(v1):
    root, _ = v1
    old = fold(events(root))  # a version-1 log: none of the fields
    for exp in old.experiments.values():
        assert exp.slot is None and exp.device == {} and exp.parents == [] and exp.kind in ("baseline", "experiment")
    assert old.experiments[3].parent == old.experiments[2].commit  # from `commit`, as before

    r = Recorder()
    r.baseline(2.0)
    one = r.run(1, start={"parent": "c0"}, launch={"slot": 1, "device": {"kind": "cuda", "index": 0, "name": "NVIDIA H100 80GB HBM3"}})
    one.fire("finish", exit_code=0, metric=1.5)
    one.fire("keep", metric=1.5, reason="improved")
    merge = r.m.experiment(2)
    merge.fire("start", kind="merge", parents=["c1", "c9"], parent="c1")
    merge.fire("commit", commit="c2", parent="c1")
    merge.fire("launch", log="runs/2.log", attempt=1, slot=0, device={"kind": "cpu"})
    merge.fire("finish", exit_code=0, metric=1.2)
    merge.fire("keep", metric=1.2, reason="merged")
    st = fold(r.events)
    assert st == r.live
    e1, e2 = st.experiments[1], st.experiments[2]
    assert (e1.slot, e1.device["name"], e1.parent, e1.parents) == (1, "NVIDIA H100 80GB HBM3", "c0", [])
    assert (e2.kind, e2.parents, e2.parent, e2.slot) == ("merge", ["c1", "c9"], "c1", 0)
    # A kept merge is the new best, and counts as an experiment.
    assert (st.best_commit, st.best_metric, st.best_n) == ("c2", 1.2, 2)
    assert st.counts()["kept"] == 2


def test_results_are_in_experiment_order_when_outcomes_arrive_out_of_order():
    """Three in flight at once; they end 3, 1, 2: results.tsv lists 0, 1, 2, 3, as autoresearch's
    analysis reads it (row order is experiment order, the baseline first)."""
    r = Recorder()
    r.baseline(2.0)
    runs = {n: r.run(n, launch={"slot": n - 1}) for n in (1, 2, 3)}
    runs[3].fire("finish", exit_code=0, metric=1.4)
    runs[3].fire("keep", metric=1.4, reason="improved")
    runs[1].fire("finish", exit_code=1, metric=None)
    runs[1].fire("crash", reason="exit code 1")
    runs[2].fire("finish", exit_code=0, metric=1.9)
    runs[2].fire("discard", metric=1.9, reason="no improvement")
    outcomes = [e.experiment for e in r.events if e.dest in ("kept", "discarded", "crashed")]
    assert outcomes == [0, 3, 1, 2]
    st = fold(r.events)
    assert [row[3] for row in results_rows(st)] == ["keep", "crash", "discard", "keep"]
    rows = list(csv.DictReader(io.StringIO(results_tsv(st)), delimiter="\t"))
    assert list(rows[0]) == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [r["commit"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert rows[0]["description"] == "baseline" and [r["description"] for r in rows[1:]] == \
        ["change 1", "change 2", "change 3"]
    # What the reference analysis computes from it: the baseline is row 0, kept rows improve on it.
    kept = [float(r["val_bpb"]) for r in rows if r["status"].upper() == "KEEP"]
    assert kept == [2.0, 1.4]
