"""The crash matrix: SIGKILL the daemon process at every transition of both machines, in both
windows, restart it, run on to the next kept/discarded experiment, check every invariant.

Windows (autoresearch/faults.py): `pre:<trigger>` dies after the previous side effect, just
before the trigger's event is appended; `post:<trigger>` dies right after the event is durable,
before its side effect. Every transition goes through Daemon._record, so both windows exist for
every trigger. The trigger list is read from machine.py's tables: a new trigger without a
scenario that reaches it fails here until one is added to REACHES.

Each case: one workspace; a scenario drives the daemon (a real `autoresearch run` process) to
the k-th occurrence of the trigger with AUTORESEARCH_CRASH_AT set; the process must die by
SIGKILL exactly there (an unreachable point fails the case). Then restarts without the crash
point until one more experiment is kept or discarded (or the caps say exhausted), and
tests/chaos_fixtures.check_invariants must find nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.control import submit_request
from autoresearch.machine import DAEMON_TRANSITIONS, EXPERIMENT_TRANSITIONS
from autoresearch.state import fold

from anthropic_fake import FakeAnthropic, text_reply, tweak_constant
from chaos_fixtures import SCRIPTED_AGENT, ApiLog, check_invariants, kept_or_discarded
from daemon_fixtures import REPO, cli, current, events, git, has_event, kill_runs, make_workspace, spawn_daemon, wait_for

TRIGGERS = sorted({row["trigger"] for row in DAEMON_TRANSITIONS + EXPERIMENT_TRANSITIONS})


class Case:
    """One workspace, the fixture workload's mode file, and (for the anthropic scenarios) the fake API."""

    def __init__(self, tmp_path: Path, config: dict, api_respond=None):
        self.tmp = tmp_path
        self.mode = tmp_path / "mode"
        self.mode.write_text("")
        self.env = {"AUTORESEARCH_TEST_MODE": str(self.mode)}
        self.api = self.api_log = None
        if api_respond is not None:
            self.api_log = ApiLog(api_respond)
            self.api = FakeAnthropic().start()
            self.api.default = self.api_log
            self.env.update(ANTHROPIC_API_KEY="sk-ant-crash-matrix", ANTHROPIC_BASE_URL=self.api.url)
            config = {"proposer": {"kind": "anthropic", "fallback": "reject"},
                      "anthropic": {"timeout_seconds": 5.0, "deadline_seconds": 30.0}, **config}
        self.root = make_workspace(tmp_path / "ws", **config)
        self.procs = []

    def run(self, *args: str, crash: str | None = None, timeout: float = 90):
        env = {**self.env, **({"AUTORESEARCH_CRASH_AT": crash} if crash else {})}
        return cli("run", str(self.root), *args, env=env, timeout=timeout)

    def spawn(self, crash: str):
        proc = spawn_daemon(self.root, env={**self.env, "AUTORESEARCH_CRASH_AT": crash})
        self.procs.append(proc)
        return proc

    def setup_crash(self, point: str) -> None:
        """Leave the workspace as a kill at `point` leaves it (the state the scenario starts from)."""
        out = self.run("--max-experiments", "1", crash=point)
        assert out.returncode == -signal.SIGKILL, f"setup kill at {point} not reached: {out.stderr[-1000:]}"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        kill_runs(self.root)
        if self.api is not None:
            self.api.stop()


# ---------------------------------------------------------------- scenarios
# Each: (workspace config, optional fake-API responder, fn(case, point, trigger) -> exit code of
# the process that was to be killed at `point`).

def _plain(case, point, trigger):
    return case.run("--max-experiments", "1", crash=point).returncode


def _after_baseline(case, point, trigger):
    """Baseline done in an earlier session, program.md edited while stopped: the next boot
    notes the edit and resumes the loop (no second baseline)."""
    assert case.run("--max-experiments", "0").returncode == 0
    (case.root / "program.md").write_text("# program\nTry the width first.\n")
    return case.run("--max-experiments", "1", crash=point).returncode


def _from(setup_point):
    """The daemon was killed at `setup_point` earlier; the next boot interrupts and resumes."""
    def scenario(case, point, trigger):
        case.setup_crash(setup_point)
        return case.run("--max-experiments", "1", crash=point).returncode
    return scenario


def _prepare_fails_once(case, point, trigger):
    return case.run("--max-experiments", "1", crash=point, timeout=120).returncode


def _caps(case, point, trigger):
    return case.run(crash=point).returncode  # limits.max_experiments ends it


def _scripted_agent(case, point, trigger):
    return case.run("--max-experiments", "3", crash=point).returncode


def _requests(case, point, trigger):
    """pause / resume / skip through the inbox (the CLI) of a running daemon."""
    proc = case.spawn(point)
    wait_for(lambda: has_event(case.root, "baseline_done") or proc.poll() is not None, timeout=60)
    state_dir = case.root / ".autoresearch"
    # What `autoresearch pause|resume|skip` writes, without its wait for the answer
    # (the daemon is meant to die before answering).
    if trigger in ("pause", "resume"):
        submit_request(state_dir, "pause")
        if trigger == "resume":
            wait_for(lambda: has_event(case.root, "pause") or proc.poll() is not None, timeout=30)
            submit_request(state_dir, "resume")
    else:
        case.mode.write_text("sleep:60")  # runs from now on last long enough to be skipped
        wait_for(lambda: current(case.root, "training") or proc.poll() is not None, timeout=60)
        submit_request(state_dir, "skip")
    try:
        return proc.wait(timeout=30)
    except Exception:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)


def _prep_script(tmp: Path) -> str:
    script = tmp / "prepare.py"
    script.write_text("import pathlib, sys\nmarker = pathlib.Path(sys.argv[1])\n"
                      "if not marker.exists():\n    marker.write_text('x')\n"
                      "    print('data not ready yet'); sys.exit(1)\n")
    return f"{sys.executable} {script} {tmp / 'prepared'}"


def _agent_script(tmp: Path) -> list[str]:
    script = tmp / "agent.py"
    script.write_text(SCRIPTED_AGENT)
    return [sys.executable, str(script)]


def _no_edit_first(req):
    """Experiment 1: prose, no edit (NoEdit after usage -> `spend`); later: a real edit."""
    if "# Experiment 1\n" in req.text(0):
        return text_reply("I would rather not change anything.")
    return tweak_constant()(req)


SCENARIOS = {
    "plain": ({}, None, _plain),
    "anthropic": ({}, tweak_constant(), _plain),
    "spend": ({"anthropic": {"max_nudges": 0}}, _no_edit_first, _plain),
    "after_baseline": ({}, None, _after_baseline),
    "interrupted_proposing": ({}, None, _from("post:start")),
    "interrupted_committed": ({}, None, _from("post:commit")),
    "give_up": ({"limits": {"max_interrupts": 0}}, None, _from("post:start")),
    "noise_runs": ({"judge": {"noise_runs": 1}}, None, _plain),
    "prepare_fails_once": ("prepare", None, _prepare_fails_once),
    "caps": ({"limits": {"max_experiments": 1}}, None, _caps),
    "scripted_agent": ("agent", None, _scripted_agent),
    "requests": ({}, None, _requests),
}

# trigger -> (scenario, k: which occurrence in the killed process)
REACHES = {
    "boot": ("plain", 1), "prepare": ("plain", 1), "begin_baseline": ("plain", 1), "adopt": ("plain", 1),
    "launch": ("plain", 1), "finish": ("plain", 1), "keep": ("plain", 1),  # the baseline's keep
    "baseline_done": ("plain", 1), "start": ("plain", 1), "stop": ("plain", 1),
    "proposed": ("anthropic", 1), "commit": ("anthropic", 1), "spend": ("spend", 1),
    "resume_loop": ("after_baseline", 1), "note": ("after_baseline", 1),
    "interrupt": ("interrupted_proposing", 1), "repropose": ("interrupted_proposing", 1),
    "retry": ("interrupted_committed", 1), "give_up": ("give_up", 1), "rerun": ("noise_runs", 1),
    "block": ("prepare_fails_once", 1), "unblock": ("prepare_fails_once", 1), "exhaust": ("caps", 1),
    "reject": ("scripted_agent", 1), "crash": ("scripted_agent", 1), "discard": ("scripted_agent", 1),
    "pause": ("requests", 1), "resume": ("requests", 1), "skip": ("requests", 1),
}


def _config(kind, tmp):
    if kind == "prepare":
        return {"run": {"prepare_command": _prep_script(tmp)}}
    if kind == "agent":
        return {"proposer": {"kind": "command", "fallback": "reject"},
                "command": {"argv": _agent_script(tmp), "deadline_seconds": 30.0}}
    return kind


def recover(case) -> None:
    """Restart without the crash point until one more experiment is kept or discarded."""
    case.mode.write_text("")
    goal = kept_or_discarded(case.root) + 1
    for _ in range(4):
        if _pause_outstanding(case.root):
            # A pause outlives restarts: resume it (the daemon reads the request at start).
            submit_request(case.root / ".autoresearch", "resume")
        out = case.run("--max-experiments", "1")
        assert out.returncode == 0, f"restart failed ({out.returncode}): {out.stderr[-2000:]}"
        st = fold(events(case.root))
        if kept_or_discarded(case.root) >= goal or st.daemon == "exhausted":
            return
    raise AssertionError("no experiment was kept or discarded after 4 restarts")


def _pause_outstanding(root: Path) -> bool:
    """The log says paused, or a pause request waits in the inbox (killed before its event)."""
    inbox = root / ".autoresearch" / "inbox"
    paused = fold(events(root)).paused
    for request in sorted(inbox.glob("*.json")):
        action = json.loads(request.read_text())["action"]
        paused = {"pause": True, "resume": False}.get(action, paused)
    return paused


@pytest.mark.parametrize("window", ["pre", "post"])
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_crash_at_every_transition(tmp_path, trigger, window):
    if trigger not in REACHES:
        pytest.fail(f"no scenario reaches trigger {trigger!r}: add one to REACHES")
    name, k = REACHES[trigger]
    config, respond, scenario = SCENARIOS[name]
    case = Case(tmp_path, _config(config, tmp_path), respond)
    point = f"{window}:{trigger}@{k}"
    try:
        t0 = time.monotonic()
        rc = scenario(case, point, trigger)
        assert rc == -signal.SIGKILL, f"{point} never reached in scenario {name!r} (exit {rc})"
        evs = events(case.root)
        if window == "post":  # died right after its event, before anything else
            assert evs[-1].trigger == trigger, [e.trigger for e in evs[-3:]]
        t1 = time.monotonic()
        recover(case)
        problems = check_invariants(case.root, case.api_log)
        assert problems == [], problems
        print(f"{point} [{name}]: crash {t1 - t0:.1f}s, recover+check {time.monotonic() - t1:.1f}s")
    finally:
        case.close()


def test_every_trigger_has_a_scenario():
    assert sorted(REACHES) == TRIGGERS
    assert set(name for name, _ in REACHES.values()) == set(SCENARIOS)


def test_kill_between_git_commit_and_its_ref(tmp_path):
    """Inside the commit step: HEAD already on the new commit, refs/autoresearch/exp/N not yet
    set, the log still at `proposed` (a window the random soak found: no event separates them)."""
    case = Case(tmp_path, {})
    try:
        assert case.run("--max-experiments", "1", crash="pre:commit").returncode == -signal.SIGKILL
        git(case.root, "update-ref", "-d", "refs/autoresearch/exp/1")  # back to before the ref
        assert git(case.root, "rev-parse", "HEAD") != git(case.root, "rev-parse", "refs/autoresearch/best")
        recover(case)
        assert check_invariants(case.root) == []
    finally:
        case.close()


def test_a_rejected_agent_edit_left_by_a_kill_is_rolled_back(tmp_path):
    """post:reject of an agent CLI's out-of-scope file: the restart must roll it back, not refuse
    to start over "uncommitted changes the daemon did not make" (found by the matrix)."""
    case = Case(tmp_path, _config("agent", tmp_path))
    try:
        assert case.run("--max-experiments", "1", crash="post:reject").returncode == -signal.SIGKILL
        assert (case.root / "notes.txt").exists()
        out = case.run("--max-experiments", "1")
        assert out.returncode == 0, out.stderr[-2000:]
        assert not (case.root / "notes.txt").exists()
        assert check_invariants(case.root) == []
    finally:
        case.close()


def test_a_kill_inside_an_atomic_write_leaves_no_stray_file(tmp_path):
    """SIGKILL between writing the temp file and renaming it over train.py (found by the soak:
    a stray `.train.py.*.tmp` in the worktree made every restart refuse)."""
    root = make_workspace(tmp_path / "ws")
    code = ("import os, signal, sys\n"
            "from autoresearch.workspace import Workspace\n"
            "ws = Workspace.open(sys.argv[1], ['train.py'])\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "ws.write_files({'train.py': 'WIDTH = 1\\n'})\n")
    out = subprocess.run([sys.executable, "-c", code, str(root)], cwd=tmp_path, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == -signal.SIGKILL
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    out = cli("run", str(root), "--max-experiments", "1")  # and a daemon starts and runs there
    assert out.returncode == 0, out.stderr[-2000:]
    assert check_invariants(root) == []
