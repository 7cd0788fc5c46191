"""History stays compatible (issue 12, item 7): a workspace made by the code before slots.

tests/data/workspace-v1.tar.gz was made by tests/data/make_v1_workspace.py with the code of
commit d29c175: a baseline, experiments 1-4 (3 discarded, the others kept), and experiment 5
left in flight by a kill -9 of the daemon (the event log's -wal as the kill left it). It was
made in another directory, so the slot worktree's git link points nowhere here (a workspace
that was moved). Every version of autoresearch from now on must verify it, show it, and resume
it: this module is the guard.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from autoresearch.report import results_tsv
from autoresearch.state import fold

from chaos_fixtures import check_invariants
from daemon_fixtures import cli, events, git

DATA = Path(__file__).parent / "data" / "workspace-v1.tar.gz"
# What the old code recorded (experiment: state, metric); the fixture's train.py computes them.
RECORDED = {0: ("kept", 1.987634), 1: ("kept", 1.323364), 2: ("kept", 1.153968),
            3: ("discarded", 1.275976), 4: ("kept", 1.143168), 5: ("training", None)}


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
    out = cli("verify", str(root))
    assert out.returncode == 0, out.stderr
    assert f"ok: {meta['events']} events" in out.stdout
    assert "every transition legal" in out.stdout


def test_status_and_results_show_the_recorded_experiments(v1):
    root, meta = v1
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

    folded = fold(events(root))
    assert {n: (e.state, e.metric) for n, e in folded.experiments.items()} == RECORDED


def test_run_resumes_the_interrupted_experiment_then_numbers_go_on(v1):
    root, meta = v1
    before = fold(events(root))
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

    out = cli("verify", str(root))
    assert out.returncode == 0, out.stderr
    assert check_invariants(root) == []
    # results: the old rows as they were, the new ones after them, in experiment order.
    table = cli("results", str(root)).stdout
    assert table.startswith(meta["results_tsv"])
    assert table == results_tsv(after) and len(table.splitlines()) == 1 + 7
