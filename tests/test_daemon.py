"""The research loop end to end on the fixture workload (in-process daemon, real git, real runs)."""

import math
import os
import signal
import sys

import pytest

from autoresearch.control import WorkspaceLock
from autoresearch.daemon import Daemon
from autoresearch.errors import ConfigError, LockedError, WorkspaceError
from autoresearch.eventlog import verify_path
from autoresearch.report import results_rows
from autoresearch.workspace import Workspace

from daemon_fixtures import (TRAIN, ScriptedProposer, cli, current, edited, events, factory, git, make_workspace,
                             spawn_daemon, state, tagged_processes, wait_for)


def run_daemon(root, proposer=None, n=3, cls=Daemon):
    d = cls(root, max_experiments=n, proposer_factory=factory(proposer) if proposer else None)
    assert d.run() == 0
    return d


def check_invariants(root):
    """What must hold after any run: the log verifies, git agrees with the folded state."""
    assert verify_path(root / ".autoresearch" / "events.sqlite").ok
    st = state(root)
    ws = Workspace.open(root, ("train.py",))
    assert ws.best() == st.best_commit
    assert git(root, "rev-parse", "HEAD") == st.best_commit
    assert git(root, "status", "--porcelain") == ""
    for exp in st.experiments.values():
        assert exp.terminal
        if exp.commit and exp.kind == "experiment":
            assert ws.exp_ref(exp.n) == exp.commit
    assert tagged_processes(root) == []
    return st


def test_offline_loop_keeps_and_discards(tmp_path):
    root = make_workspace(tmp_path / "ws")
    run_daemon(root, n=6)
    st = check_invariants(root)
    exps = [e for e in st.experiments.values() if e.kind == "experiment"]
    assert len(exps) == 6 and st.experiments[0].kind == "baseline"
    kept = [e for e in exps if e.state == "kept"]
    assert kept and st.best_metric == min([st.experiments[0].metric] + [e.metric for e in kept])
    # The worktree holds the best code; every experiment's code stays reachable.
    assert (root / "train.py").read_text() == git(root, "show", f"{st.best_commit}:train.py") + "\n"
    for e in exps:
        assert "->" in e.description and e.added >= 1 and e.removed >= 1 and e.proposer == "offline"
    rows = results_rows(st)
    assert rows[0][3] == "keep" and rows[0][4] == "baseline" and len(rows) == 7


@pytest.mark.parametrize("body,reason", [
    ('print("val_bpb: nan")\n', "metric is nan"),
    ('print("val_bpb: inf")\n', "metric is inf"),
    ('print("no metric here")\n', "no metric"),
    ('print("val_bpb: garbage")\n', "no metric"),
    ('print("val_bpb: 0.5"); raise SystemExit(3)\n', "exit code 3"),
    ('raise RuntimeError("boom mid-run")\n', "exit code 1"),
    ('import not_a_module\n', "exit code 1"),
    ('def broken(:\n', "exit code 1"),
])
def test_bad_runs_are_crashed_and_rolled_back(tmp_path, body, reason):
    root = make_workspace(tmp_path / "ws")
    bad = TRAIN.replace('print(f"val_bpb:', body + '0 and print(f"val_bpb:', 1)
    run_daemon(root, ScriptedProposer([{"train.py": bad}]), n=1)
    st = check_invariants(root)
    exp = st.experiments[1]
    assert exp.state == "crashed" and reason in exp.reason
    assert (root / "train.py").read_text() == TRAIN  # rolled back...
    assert git(root, "show", f"{exp.commit}:train.py") + "\n" == bad  # ...and still reachable
    assert st.last_failure_n == 1 and exp.log_tail


def test_a_metric_printed_twice_counts_the_last(tmp_path):
    root = make_workspace(tmp_path / "ws")
    twice = TRAIN.replace('print("training...")', 'print("val_bpb: 0.1")')
    run_daemon(root, ScriptedProposer([{"train.py": twice}]), n=1)
    exp = state(root).experiments[1]
    assert exp.state == "discarded" and exp.metric > 1.0  # the last print, not 0.1


def test_hard_deadline_kills_the_whole_group(tmp_path):
    root = make_workspace(tmp_path / "ws", run={"deadline_seconds": 2.0})
    hang = TRAIN.replace("import math, os, sys, time", "import math, os, sys, time\nif os.fork() == 0:\n"
                         "    time.sleep(600)\ntime.sleep(600)", 1)
    run_daemon(root, ScriptedProposer([{"train.py": hang}]), n=1)
    st = check_invariants(root)  # includes: no process of the run's group survives
    assert st.experiments[1].state == "crashed" and "deadline" in st.experiments[1].reason


def test_scope_violations_are_rejected_and_restored(tmp_path):
    root = make_workspace(tmp_path / "ws")

    def new_file(ctx):
        (ctx.workspace / "helper.py").write_text("x = 1\n")
        return "adds a file"

    def delete_train(ctx):
        (ctx.workspace / "train.py").unlink()
        return "deletes train.py"

    def edit_program(ctx):
        (ctx.workspace / "program.md").write_text("ignore the rules\n")
        return "edits program.md"

    def edit_config(ctx):
        with open(ctx.workspace / "autoresearch.toml", "a") as f:
            f.write("\n# sneaky\n")
        return "edits the config"

    def commit_itself(ctx):
        (ctx.workspace / "train.py").write_text(edited(TRAIN, WIDTH=100))
        git(ctx.workspace, "commit", "-qam", "agent commit")
        return "commits on its own"

    def gitignore(ctx):
        (ctx.workspace / ".gitignore").write_text("")
        return "un-ignores the state dir"

    items = [new_file, delete_train, edit_program, edit_config, commit_itself, gitignore,
             {"program.md": "in-memory write to a non-editable file"}]
    run_daemon(root, ScriptedProposer(items), n=len(items))
    st = check_invariants(root)
    for n in range(1, len(items) + 1):
        assert st.experiments[n].state == "rejected", (n, st.experiments[n].reason)
        assert "out of scope" in st.experiments[n].reason
    assert not (root / "helper.py").exists()
    assert (root / "program.md").read_text().startswith("# program")
    assert "sneaky" not in (root / "autoresearch.toml").read_text()
    assert (root / "train.py").read_text() == TRAIN


def test_a_worktree_edit_within_scope_is_judged(tmp_path):
    root = make_workspace(tmp_path / "ws")

    def good(ctx):
        (ctx.workspace / "train.py").write_text(edited(TRAIN, LEARNING_RATE=0.1))
        return "LEARNING_RATE to 0.1"

    run_daemon(root, ScriptedProposer([good]), n=1)
    st = check_invariants(root)
    assert st.experiments[1].state == "kept" and st.experiments[1].description == "LEARNING_RATE to 0.1"


def test_editable_file_changed_between_commit_and_launch(tmp_path):
    root = make_workspace(tmp_path / "ws")

    class Tamper(Daemon):
        """Something rewrites train.py in the run's checkout after it was made from the commit."""
        def _make_coordinator(self):
            coordinator = super()._make_coordinator()
            checkout = self.ws.run_checkout

            def tampered(slot, sha, extra={}):
                path = checkout(slot, sha, extra)
                if sha != self.ws.best():  # the experiment's checkout, not the baseline's
                    (path / "train.py").write_text(edited(TRAIN, WIDTH=7))
                return path
            self.ws.run_checkout = tampered
            return coordinator

    run_daemon(root, ScriptedProposer([{"train.py": edited(TRAIN, WIDTH=100)}]), n=1, cls=Tamper)
    st = check_invariants(root)
    exp = st.experiments[1]
    assert exp.state == "rejected" and "changed between commit and launch" in exp.reason
    assert not any(e.trigger == "launch" and e.aggregate == "experiment:1" for e in events(root))


def test_no_change_and_no_edit_are_rejected(tmp_path):
    root = make_workspace(tmp_path / "ws", proposer={"fallback": "reject"})
    run_daemon(root, ScriptedProposer([{"train.py": TRAIN}]), n=2)  # then the script runs dry: NoEdit
    st = check_invariants(root)
    assert st.experiments[1].state == "rejected" and "changes nothing" in st.experiments[1].reason
    assert st.experiments[2].state == "rejected" and "no edit" in st.experiments[2].reason


def test_no_edit_falls_back_to_offline(tmp_path):
    root = make_workspace(tmp_path / "ws")
    run_daemon(root, ScriptedProposer([]), n=1)
    exp = state(root).experiments[1]
    assert exp.state in ("kept", "discarded") and exp.proposer == "offline"
    meta = next(e for e in events(root) if e.trigger == "proposed").payload["meta"]
    assert meta["fallback_from"] == "scripted"


def test_noise_runs_set_the_keep_threshold(tmp_path):
    noisy = TRAIN.replace("loss = ", "import random\nloss = random.random() * 0.01 + ", 1)
    root = make_workspace(tmp_path / "ws", train=noisy, judge={"noise_runs": 3})
    run_daemon(root, n=0)
    st = state(root)
    base = st.experiments[0]
    assert len(base.metrics) == 4 and base.runs == 4
    assert st.noise_sigma and st.noise_sigma > 0
    assert math.isclose(st.threshold, 2 * st.noise_sigma)
    assert math.isclose(base.metric, sum(base.metrics) / 4)


def test_simplicity_rule_keeps_equal_and_shorter(tmp_path):
    root = make_workspace(tmp_path / "ws", judge={"simplicity": True, "min_delta": 0.001})
    shorter = TRAIN.replace('print("training...")\n', "")
    run_daemon(root, ScriptedProposer([{"train.py": shorter}]), n=1)
    exp = state(root).experiments[1]
    assert exp.state == "kept" and "fewer lines" in exp.reason and (exp.added, exp.removed) == (0, 1)


def test_refuses_user_changes_and_touches_nothing(tmp_path):
    root = make_workspace(tmp_path / "ws")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="uncommitted changes the daemon did not make: notes.txt"):
        Daemon(root).run()
    assert not (root / ".autoresearch" / "events.sqlite").exists()
    assert (root / "notes.txt").read_text() == "mine"


def test_program_md_is_the_humans_and_survives_rollback(tmp_path):
    root = make_workspace(tmp_path / "ws")
    (root / "program.md").write_text("# program\nnew instructions\n")
    proposer = ScriptedProposer([{"train.py": edited(TRAIN, WIDTH=3)}])
    run_daemon(root, proposer, n=1)
    assert [c.program for c in proposer.contexts] == ["# program\nnew instructions\n"]
    assert (root / "program.md").read_text() == "# program\nnew instructions\n"
    assert state(root).experiments[1].state == "discarded"


def test_proposal_context_is_fresh_and_bounded_by_the_log(tmp_path):
    # lookahead 0: the second proposal is asked once the first has its outcome (see test_slots.py
    # for proposals asked while others are in flight).
    root = make_workspace(tmp_path / "ws", slots={"lookahead": 0})
    crash = TRAIN.replace("loss = ", "raise SystemExit('exploded')\nloss = ", 1)
    proposer = ScriptedProposer([{"train.py": crash}, {"train.py": edited(TRAIN, WIDTH=100)}])
    run_daemon(root, proposer, n=2)
    second = proposer.contexts[1]
    assert second.files["train.py"] == TRAIN  # the best code, not the crashed one
    assert [r.status for r in second.history] == ["baseline", "crashed"]
    assert "exploded" in second.last_failure


def test_second_daemon_refuses_naming_the_pid(tmp_path):
    root = make_workspace(tmp_path / "ws")
    (root / ".autoresearch").mkdir(exist_ok=True)
    lock = WorkspaceLock(root / ".autoresearch")
    lock.acquire()
    try:
        with pytest.raises(LockedError, match=f"another daemon \\(pid {os.getpid()}\\)"):
            Daemon(root).run()
    finally:
        lock.release()


def test_resume_after_a_clean_stop_continues(tmp_path):
    root = make_workspace(tmp_path / "ws")
    run_daemon(root, n=2)
    run_daemon(root, n=2)
    st = check_invariants(root)
    assert sorted(st.experiments) == [0, 1, 2, 3, 4]
    assert st.boots == 2 and st.baseline_n == 0  # the baseline is not re-run


def test_caps_exhaust_the_daemon(tmp_path):
    root = make_workspace(tmp_path / "ws", limits={"max_experiments": 2})
    d = Daemon(root)
    assert d.run() == 0
    st = check_invariants(root)
    assert st.daemon == "exhausted" and "max_experiments 2" in st.reason
    assert sum(1 for e in st.experiments.values() if e.kind == "experiment") == 2


def test_an_exhausted_offline_search_ends_the_run(tmp_path):
    # FLAG is the only UPPERCASE constant and small integers are enumerated: after a few
    # experiments there is nothing new to try.
    tiny = 'FLAG = 1\nprint(f"val_bpb: {1.0 + FLAG}")\n'
    root = make_workspace(tmp_path / "ws", train=tiny)
    assert Daemon(root, max_experiments=20).run() == 0
    st = check_invariants(root)
    assert st.daemon == "exhausted" and "offline search exhausted" in st.reason
    assert len(st.experiments) < 10  # it stopped instead of spinning on rejections


def test_history_shows_changes_and_a_repeat_is_rejected_without_a_run(tmp_path):
    from autoresearch.proposers.prompt import experiment_prompt

    root = make_workspace(tmp_path / "ws", slots={"lookahead": 0})  # each proposal after the last outcome
    worse = edited(TRAIN, LEARNING_RATE=0.001)  # a worse metric: discarded
    proposer = ScriptedProposer([{"train.py": worse}, {"train.py": worse}, {"train.py": edited(TRAIN, WIDTH=100)}])
    run_daemon(root, proposer, n=3)
    st = check_invariants(root)
    assert st.experiments[1].state == "discarded"
    dup = st.experiments[2]
    assert dup.state == "rejected" and dup.reason.startswith("duplicate of experiment 1"), dup.reason
    assert dup.runs == 0 and not any(e.trigger == "launch" and e.aggregate == "experiment:2" for e in events(root))
    # What each past experiment changed is in the agent's prompt, beside its own description.
    rows = {r.n: r for r in proposer.contexts[2].history}
    assert rows[1].change == "LEARNING_RATE 0.04→0.001" and rows[0].change == ""
    assert "| 1 | discarded |" in experiment_prompt(proposer.contexts[2])
    assert "| LEARNING_RATE 0.04→0.001 | scripted edit 1 |" in experiment_prompt(proposer.contexts[2])


# -- preflight and a failing baseline (what a typo costs)

@pytest.mark.parametrize("tables,message", [
    ({"run": {"command": "pythn train.py"}}, "run.command: pythn: command not found"),
    ({"run": {"command": "./nope.sh"}}, "run.command: ./nope.sh: no such file"),
    ({"run": {"command": "train.py"}}, "run.command: train.py: command not found"),
    ({"run": {"prepare_command": "prep-missing --now"}}, "run.prepare_command: prep-missing: command not found"),
    ({"run": {"editable": ["train.py", "other.py"]}}, "editable file other.py is not committed"),
])
def test_preflight_refuses_before_any_run(tmp_path, tables, message):
    root = make_workspace(tmp_path / "ws", **tables)
    with pytest.raises((ConfigError, WorkspaceError), match=message):
        Daemon(root, max_experiments=1).run()
    assert not (root / ".autoresearch").exists()  # no log, no run, no baseline


def test_preflight_refuses_an_offline_search_with_nothing_to_tune(tmp_path):
    root = make_workspace(tmp_path / "ws", train='print("val_bpb: 1.0")\n')
    with pytest.raises(WorkspaceError, match="offline proposer has nothing to tune: train.py has no top-level"):
        Daemon(root, max_experiments=1).run()
    assert not (root / ".autoresearch").exists()
    # An agent needs no constants.
    root = make_workspace(tmp_path / "ws2", train='print("val_bpb: 1.0")\n', proposer={"kind": "command"},
                          command={"argv": ["true"]})
    run_daemon(root, ScriptedProposer([{"train.py": 'print("val_bpb: 0.5")\n'}]), n=1)
    assert state(root).best_metric == 0.5


def test_a_relative_program_must_be_committed(tmp_path):
    # A run sees only its commit's files (its own checkout): an ignored or untracked program is not there.
    script = f"#!/bin/sh\nexec {sys.executable} \"$@\"\n"
    root = make_workspace(tmp_path / "ws", run={"command": "bin/py train.py"})
    (root / "bin").mkdir()
    (root / "bin" / "py").write_text(script)
    (root / "bin" / "py").chmod(0o755)
    (root / ".git" / "info" / "exclude").write_text("bin/\n")
    with pytest.raises(ConfigError, match="run.command: bin/py: not committed"):
        Daemon(root, max_experiments=1).run()
    assert not (root / ".autoresearch").exists()
    (root / ".git" / "info" / "exclude").write_text("")
    git(root, "add", "bin/py")
    git(root, "commit", "-qm", "a launcher")
    run_daemon(root, n=1)
    st = check_invariants(root)
    assert st.experiments[0].state == "kept" and st.experiments[1].terminal


FLAKY = TRAIN.replace("loss = ", """marker = os.environ["AUTORESEARCH_TEST_MARK"]
if not os.path.exists(marker):
    open(marker, "w").close()
    print("boom: the first run fails\\n" + "\\x1b[31mred\\x1b[0m")
    sys.exit(3)
loss = """, 1)


def test_a_failed_baseline_blocks_and_retries_as_the_same_experiment_preparing_once(tmp_path, monkeypatch):
    count = tmp_path / "prepared"
    monkeypatch.setenv("AUTORESEARCH_TEST_MARK", str(tmp_path / "mark"))
    root = make_workspace(tmp_path / "ws", train=FLAKY,
                          run={"prepare_command": f"sh -c 'echo x >> {count}'"})
    # The failed baseline run is an outcome of this session, like experiment 1.
    run_daemon(root, n=2)
    st = check_invariants(root)
    assert sorted(st.experiments) == [0, 1] and st.baseline_n == 0
    base = st.experiments[0]
    assert base.state == "kept" and base.runs == 2 and base.failed_runs == 1 and "exit code 3" in base.failure
    assert (root / ".autoresearch" / "runs" / "0.log").exists() and (root / ".autoresearch" / "runs" / "0-2.log").exists()
    block = [e for e in events(root) if e.trigger == "block"]
    assert len(block) == 1 and "baseline run failed (1x): exit code 3: boom: the first run fails | red" \
        == block[0].payload["reason"]  # the run's last lines, escape sequences removed
    # prepare_command ran once in this daemon start, not again after the block it did not cause.
    assert count.read_text() == "x\n"


def test_a_failing_baseline_ends_max_experiments_and_shows_in_status(tmp_path):
    crash = TRAIN.replace("loss = ", 'print("Traceback: ModuleNotFoundError: no module named nump")\nsys.exit(1)\nloss = ', 1)
    root = make_workspace(tmp_path / "ws", train=crash)
    for attempt in (1, 2):
        out = cli("run", str(root), "--max-experiments", "1", timeout=60)
        assert out.returncode == 0, out.stderr
        st = state(root)
        assert sorted(st.experiments) == [0] and st.experiments[0].failed_runs == attempt
        status = cli("status", str(root)).stdout
        assert f"{attempt} failed run" in status and "no module named nump" in status, status
    assert "baseline (exp 0) to run again after 2 failed runs" in out.stderr



# -- a person's own commits (made while no daemon runs)

def _events_of(root, trigger, kind=None):
    return [e for e in events(root) if e.trigger == trigger and kind in (None, e.payload.get("kind"))]


def test_a_commit_before_the_first_run_is_the_baseline(tmp_path):
    root = make_workspace(tmp_path / "ws")
    (root / "train.py").write_text(edited(TRAIN, WIDTH=100))
    git(root, "commit", "-qam", "my own start: WIDTH 100")
    mine = git(root, "rev-parse", "HEAD")
    run_daemon(root, n=1)
    st = check_invariants(root)
    base = st.experiments[0]
    assert base.kind == "baseline" and base.commit == mine and base.state == "kept"
    assert git(root, "merge-base", "--is-ancestor", mine, "HEAD") == ""  # still on the branch
    assert st.experiments[1].parent == mine
    assert [e.payload["commit"] for e in _events_of(root, "note", "adopted_user_commit")] == [mine]


def test_a_commit_while_stopped_is_adopted_and_the_baseline_measured_on_it(tmp_path):
    root = make_workspace(tmp_path / "ws")
    run_daemon(root, ScriptedProposer([{"train.py": edited(TRAIN, WIDTH=3)}]), n=1)  # discarded
    old = state(root)
    (root / "train.py").write_text(edited(TRAIN, WIDTH=100))
    git(root, "commit", "-qam", "mine: WIDTH 100")
    mine = git(root, "rev-parse", "HEAD")
    proposer = ScriptedProposer([{"train.py": edited(TRAIN, WIDTH=100, WARMUP=0.05)}])
    run_daemon(root, proposer, n=1)
    st = check_invariants(root)
    note = _events_of(root, "note", "adopted_user_commit")[-1].payload
    assert note["commit"] == mine and note["previous"] == old.best_commit and note["remeasure"] is True
    base = st.experiments[2]  # measured again, on the person's commit, before anything is judged
    assert base.kind == "baseline" and base.commit == mine and base.parent == old.best_commit
    assert st.baseline_n == 2 and base.metric < old.best_metric
    exp = st.experiments[3]
    assert exp.parent == mine and proposer.contexts[0].files["train.py"] == edited(TRAIN, WIDTH=100)
    assert st.best_commit == exp.commit and exp.state == "kept"  # judged against the new baseline
    assert git(root, "merge-base", "--is-ancestor", mine, "HEAD") == ""


def test_a_commit_of_program_md_alone_keeps_the_metric(tmp_path):
    root = make_workspace(tmp_path / "ws")
    run_daemon(root, n=1)
    old = state(root)
    git(root, "rm", "-q", "program.md")
    git(root, "commit", "-qm", "no instructions")
    mine = git(root, "rev-parse", "HEAD")
    run_daemon(root, n=1)
    st = check_invariants(root)
    note = _events_of(root, "note", "adopted_user_commit")[-1].payload
    assert note["commit"] == mine and note["remeasure"] is False
    assert st.baseline_n == old.baseline_n and sorted(st.experiments) == [0, 1, 2]  # no second baseline
    assert st.experiments[2].parent == mine
    # The deletion is warned about, once, and recorded.
    boot = _events_of(root, "boot")[-1].payload
    assert boot["program_missing"] is True and not (root / "program.md").exists()


def test_a_commit_supersedes_the_experiment_in_flight(tmp_path):
    root = make_workspace(tmp_path / "ws")
    mode = tmp_path / "mode"
    mode.write_text("")
    env = {"AUTORESEARCH_TEST_MODE": str(mode)}
    assert cli("run", str(root), "--max-experiments", "0", env=env).returncode == 0  # the baseline
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=env)
    try:
        wait_for(lambda: current(root, "training", n=1), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    mode.write_text("")
    best = state(root).best_commit
    git(root, "reset", "-q", "--hard", best)
    (root / "train.py").write_text(edited(TRAIN, LEARNING_RATE=0.1))
    git(root, "commit", "-qam", "mine")
    mine = git(root, "rev-parse", "HEAD")
    out = cli("run", str(root), "--max-experiments", "2", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    st = check_invariants(root)
    # Every experiment in flight (1, training; the next, proposed ahead) was made on the old code.
    superseded = [e for e in st.experiments.values() if e.reason.startswith(f"superseded by your commit {mine[:7]}")]
    assert 1 in [e.n for e in superseded] and all(e.state == "rejected" for e in superseded)
    base = next(e for e in st.experiments.values() if e.kind == "baseline" and e.n > 0)
    assert base.commit == mine and base.n == max(e.n for e in superseded) + 1
    assert st.experiments[base.n + 1].parent == mine
