"""The daemon with a command agent (a small script standing in for an agent CLI), run as a user
runs it: `autoresearch run`, then git and the event log are checked from outside."""

import os
import signal
import subprocess
import sys
import textwrap

from daemon_fixtures import cli, events, git, kill9, make_workspace, spawn_daemon, state, wait_for


def _workspace(tmp_path, body: str, **tables):
    script = tmp_path / "agent.py"
    script.write_text("import subprocess, sys\nsys.stdin.read()\n" + textwrap.dedent(body))
    return make_workspace(tmp_path / "ws", proposer={"kind": "command"},
                          command={"argv": [sys.executable, str(script)], "deadline_seconds": 60.0},
                          **tables)


COMMIT = """
    src = open("train.py").read()
    open("train.py", "w").write(src.replace("WIDTH = 64", "WIDTH = 100"))
    subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qam", "agent"],
                   check=True)
    print("WIDTH 100, committed myself")
"""


def _check_restored(root, branch):
    st = state(root)
    assert git(root, "symbolic-ref", "HEAD") == branch
    assert git(root, "rev-parse", "HEAD") == st.best_commit == git(root, "rev-parse", "refs/autoresearch/best")
    assert git(root, "status", "--porcelain") == ""
    return st


def test_an_agents_own_commit_rejects_the_experiment(tmp_path):
    root = _workspace(tmp_path, COMMIT)
    branch = git(root, "symbolic-ref", "HEAD")
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    st = _check_restored(root, branch)
    exp = st.experiments[1]
    assert exp.state == "rejected" and exp.proposer == "command", exp.reason
    assert "HEAD moved" in exp.reason
    reject = next(e for e in events(root) if e.trigger == "reject")
    assert reject.payload["description"] == "WIDTH 100, committed myself"
    # Nothing tried is lost: the agent's commit stays reachable under its own ref, off the branch.
    kept = git(root, "rev-parse", "refs/autoresearch/rejected/1")
    assert "WIDTH = 100" in git(root, "show", f"{kept}:train.py")
    assert subprocess.run(["git", "merge-base", "--is-ancestor", kept, "HEAD"], cwd=root).returncode == 1


def test_an_agent_on_another_branch_is_put_back(tmp_path):
    switch = "subprocess.run(['git', 'checkout', '-qb', 'agent-branch'], check=True)\n"
    root = _workspace(tmp_path, switch + textwrap.dedent(COMMIT))
    branch = git(root, "symbolic-ref", "HEAD")
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    st = _check_restored(root, branch)
    exp = st.experiments[1]
    assert exp.state == "rejected" and "left the branch" in exp.reason, exp.reason


def test_uncommitted_config_edit_does_not_turn_no_edit_into_a_rejection(tmp_path):
    root = _workspace(tmp_path, "print('nothing to try')\n")
    with open(root / "autoresearch.toml", "a") as f:
        f.write("# the person's note, not committed\n")
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    exp = state(root).experiments[1]
    # Documented: an agent that changes nothing falls back to the offline search.
    assert exp.proposer == "offline" and exp.state in ("kept", "discarded"), (exp.state, exp.reason)
    assert "not committed" in (root / "autoresearch.toml").read_text()


def test_an_agents_commit_left_by_a_kill_is_kept_aside_not_adopted(tmp_path):
    marker = tmp_path / "committed"
    root = _workspace(tmp_path, COMMIT.replace('print("WIDTH 100, committed myself")', f"""
    open({str(marker)!r}, "w").write(str(__import__("os").getpid()))
    __import__("time").sleep(60)"""))
    branch = git(root, "symbolic-ref", "HEAD")
    daemon = spawn_daemon(root, "--max-experiments", "1")
    try:
        wait_for(marker.exists, timeout=60)
        kill9(daemon)  # the daemon dies while its agent has just committed on the branch
    finally:
        if daemon.poll() is None:
            kill9(daemon)
        if marker.exists():
            os.kill(int(marker.read_text()), signal.SIGKILL)
    agent_commit = git(root, "rev-parse", "HEAD")
    assert "WIDTH = 100" in git(root, "show", "HEAD:train.py")
    (tmp_path / "agent.py").write_text("import sys\nsys.stdin.read()\n")  # now an agent that does nothing
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]  # not refused, not adopted as the person's commit
    st = _check_restored(root, branch)
    assert not any(e.payload.get("kind") == "adopted_user_commit" for e in events(root))
    assert git(root, "rev-parse", "refs/autoresearch/rejected/1") == agent_commit
    assert st.experiments[1].interrupts == 1 and st.experiments[1].proposer == "offline"


def test_an_agents_branch_switch_left_by_a_kill_is_undone(tmp_path):
    marker = tmp_path / "switched"
    root = _workspace(tmp_path, "subprocess.run(['git', 'checkout', '-qb', 'agent-branch'], check=True)\n"
                      + textwrap.dedent(COMMIT).replace('print("WIDTH 100, committed myself")', f"""
open({str(marker)!r}, "w").write(str(__import__("os").getpid()))
__import__("time").sleep(60)"""))
    branch = git(root, "symbolic-ref", "HEAD")
    daemon = spawn_daemon(root, "--max-experiments", "1")
    try:
        wait_for(marker.exists, timeout=60)
        kill9(daemon)
    finally:
        if daemon.poll() is None:
            kill9(daemon)
        if marker.exists():
            os.kill(int(marker.read_text()), signal.SIGKILL)
    assert git(root, "symbolic-ref", "HEAD") == "refs/heads/agent-branch"
    agent_commit = git(root, "rev-parse", "HEAD")
    (tmp_path / "agent.py").write_text("import sys\nsys.stdin.read()\n")
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    _check_restored(root, branch)  # back on the workspace's own branch
    assert git(root, "rev-parse", "refs/autoresearch/rejected/1") == agent_commit
    boots = [e for e in events(root) if e.trigger == "boot"]
    assert [b.payload["branch"] for b in boots] == [branch.removeprefix("refs/heads/")] * 2
