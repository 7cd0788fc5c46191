"""CommandProposer with small Python scripts standing in for an agent CLI: real processes,
real process groups, real signals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from autoresearch.config import CommandConfig
from autoresearch.proposers.base import NoEdit, ProposerUnavailable
from autoresearch.proposers.command import CommandProposer, agent_env
from tests.proposer_fixtures import make_ctx, make_workspace


@pytest.fixture
def lab(tmp_path):
    return make_workspace(tmp_path)


def agent(tmp_path: Path, body: str, name: str = "agent.py") -> list[str]:
    script = tmp_path / name
    script.write_text("import os, sys, time, signal, subprocess, json\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def alive(pid: int) -> bool:
    """True if pid runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def run(argv, ctx, deadline=20.0, **kw):
    cfg = CommandConfig(argv=tuple(argv), deadline_seconds=deadline)
    return CommandProposer(cfg, kill_grace=0.3, **kw).propose(ctx)


def test_agent_edits_train_py(lab, tmp_path, monkeypatch):
    ws, harness = lab
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-agent-needs-this")
    argv = agent(tmp_path, f"""
        prompt = sys.stdin.read()
        json.dump({{"env": sorted(os.environ), "cwd": os.getcwd(), "prompt": prompt,
                    "key": os.environ.get("ANTHROPIC_API_KEY")}}, open({str(tmp_path / "seen.json")!r}, "w"))
        src = open("train.py").read()
        open("train.py", "w").write(src.replace("LR = 0.01", "LR = 0.02"))
        print("thinking...", file=sys.stderr)
        print("I looked at the schedule.")
        print("\\x1b[1mRaise LR to 0.02\\x1b[0m")
        print("")
    """)
    prop = run(argv, make_ctx(ws, harness, n=7))
    assert prop.proposer == "command" and prop.files is None
    assert prop.description == "Raise LR to 0.02"  # last non-empty stdout line, ANSI stripped
    assert prop.meta["exit_code"] == 0 and prop.meta["changed"] == ["train.py"]
    assert "LR = 0.02" in (ws / "train.py").read_text()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert Path(seen["cwd"]).resolve() == ws.resolve()
    assert "NOTIFY_SOCKET" not in seen["env"] and "WATCHDOG_USEC" not in seen["env"]
    assert seen["key"] == "sk-ant-api03-agent-needs-this"
    assert "# Experiment 7" in seen["prompt"] and "LR = 0.01" in seen["prompt"]
    assert "Try learning-rate ideas first." in seen["prompt"]
    log = (ws / ".autoresearch" / "proposals" / "7.log").read_text()
    assert "thinking..." in log and "I looked at the schedule." in log and "exit status 0" in log


def test_agent_that_changes_nothing_is_no_edit(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "sys.stdin.read(); print('nothing worth trying')\n")
    with pytest.raises(NoEdit) as info:
        run(argv, make_ctx(ws, harness))
    assert "without changing any file" in info.value.reason


def test_agent_failure_is_no_edit_with_its_last_words(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "print('error: not logged in', file=sys.stderr); sys.exit(3)\n")
    with pytest.raises(NoEdit) as info:
        run(argv, make_ctx(ws, harness))
    assert "status 3" in info.value.reason and "not logged in" in info.value.reason


def test_edit_outside_scope_is_returned_for_the_daemon_to_judge(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, """
        sys.stdin.read()
        open("prepare.py", "a").write("SEED = 0\\n")
        open("notes.txt", "w").write("hi\\n")
        print("also tweak the harness")
    """)
    prop = run(argv, make_ctx(ws, harness))
    assert prop.files is None and prop.description == "also tweak the harness"
    assert sorted(prop.meta["changed"]) == ["notes.txt", "prepare.py"]
    assert "SEED = 0" in (ws / "prepare.py").read_text()  # left for the scope guard to roll back


def test_description_falls_back_to_the_changed_files(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "open('train.py', 'a').write('# x\\n')\n")
    prop = run(argv, make_ctx(ws, harness))
    assert prop.description == "edit train.py"


def test_hang_past_deadline_kills_the_whole_group(lab, tmp_path):
    ws, harness = lab
    pids = tmp_path / "pids"
    argv = agent(tmp_path, f"""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a stubborn agent
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        open("train.py", "a").write("# half-done edit\\n")
        while True:
            time.sleep(1)
    """)
    started = time.monotonic()
    with pytest.raises(NoEdit) as info:
        run(argv, make_ctx(ws, harness), deadline=2.0)
    elapsed = time.monotonic() - started
    assert "deadline" in info.value.reason
    assert 2.0 <= elapsed < 5.0
    leader, child = map(int, pids.read_text().split())
    assert not alive(leader)
    assert wait_dead(child), "a process of the agent's group survived the deadline kill"


def test_the_context_deadline_also_bounds_the_agent(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "time.sleep(30)\n")
    started = time.monotonic()
    with pytest.raises(NoEdit):
        run(argv, make_ctx(ws, harness, deadline_s=0.5), deadline=600)
    assert time.monotonic() - started < 3.0


def test_processes_left_behind_after_a_normal_exit_are_killed(lab, tmp_path):
    ws, harness = lab
    pidfile = tmp_path / "bg"
    argv = agent(tmp_path, f"""
        bg = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # inherits stdout
        open({str(pidfile)!r}, "w").write(str(bg.pid))
        open("train.py", "a").write("# edit\\n")
        print("edit with a background helper")
    """)
    started = time.monotonic()
    prop = run(argv, make_ctx(ws, harness))
    assert time.monotonic() - started < 5.0, "the proposer waited on a pipe held by a stray child"
    assert prop.description == "edit with a background helper"
    assert wait_dead(int(pidfile.read_text()))


def test_cancel_kills_the_agent_promptly(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "time.sleep(60)\n")
    ctx = make_ctx(ws, harness)
    threading.Timer(0.3, ctx.cancel.set).start()
    started = time.monotonic()
    with pytest.raises(ProposerUnavailable) as info:
        run(argv, ctx)
    assert "cancelled" in info.value.reason and time.monotonic() - started < 3.0


def test_missing_agent_binary_blocks_with_a_clear_reason(lab):
    ws, harness = lab
    with pytest.raises(ProposerUnavailable) as info:
        run(["/nonexistent/agent-cli", "-p"], make_ctx(ws, harness))
    assert "/nonexistent/agent-cli" in info.value.reason


def test_log_is_capped_and_redacted(lab, tmp_path, monkeypatch):
    ws, harness = lab
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-should-not-be-logged")
    argv = agent(tmp_path, """
        print("my key is", os.environ["ANTHROPIC_API_KEY"])
        for i in range(5000):
            print("x" * 60)
        open("train.py", "a").write("# e\\n")
        print("done")
    """)
    prop = run(argv, make_ctx(ws, harness, n=4), log_max_bytes=20_000)
    log = (ws / ".autoresearch" / "proposals" / "4.log").read_text()
    assert len(log) < 21_000 and "truncated" in log and prop.meta["log_truncated"]
    assert "sk-ant-api03-should-not-be-logged" not in log and "[REDACTED]" in log
    assert prop.description == "done"


def test_agent_env_exports_the_systemd_credential(tmp_path):
    (tmp_path / "anthropic_api_key").write_text("sk-ant-from-credential-123\n")
    env = agent_env({"PATH": "/usr/bin", "CREDENTIALS_DIRECTORY": str(tmp_path), "NOTIFY_SOCKET": "x",
                     "WATCHDOG_PID": "1"})
    assert env["ANTHROPIC_API_KEY"] == "sk-ant-from-credential-123"
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_PID" not in env and env["PATH"] == "/usr/bin"


def test_an_agent_that_commits_itself_is_caught(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, """
        sys.stdin.read()
        src = open("train.py").read()
        open("train.py", "w").write(src.replace("LR = 0.01", "LR = 0.03"))
        subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qam", "mine"], check=True)
        print("LR 0.03, committed")
    """)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    prop = run(argv, make_ctx(ws, harness))  # the tree is clean afterwards: still a proposal
    moved = prop.meta["head_moved"]
    assert moved["from"] == head and moved["to"] != head and moved["branch_to"] == moved["branch_from"]
    assert prop.meta["changed"] == ["train.py"] and prop.description == "LR 0.03, committed"


def test_a_branch_switch_is_caught(lab, tmp_path):
    ws, harness = lab
    argv = agent(tmp_path, "subprocess.run(['git', 'checkout', '-qb', 'elsewhere'], check=True)\n")
    prop = run(argv, make_ctx(ws, harness))
    assert prop.meta["head_moved"]["branch_to"] == "refs/heads/elsewhere"


def test_the_persons_uncommitted_edits_are_not_the_agents(lab, tmp_path):
    ws, harness = lab
    with open(ws / "program.md", "a") as f:
        f.write("A line the person has not committed.\n")
    (ws / "scratch.txt").write_text("the person's untracked notes\n")
    idle = agent(tmp_path, "sys.stdin.read(); print('nothing worth trying')\n")
    with pytest.raises(NoEdit) as info:
        run(idle, make_ctx(ws, harness))
    assert "without changing any file" in info.value.reason
    # An edit of a path that was already dirty is the agent's change all the same.
    touch = agent(tmp_path, "open('program.md', 'a').write('agent was here\\n')\n", name="touch.py")
    assert run(touch, make_ctx(ws, harness)).meta["changed"] == ["program.md"]


def test_a_rename_the_agent_stages_names_both_paths(lab, tmp_path):
    # `git mv` shows in `git status` as one rename entry: the source it deleted is a change too.
    ws, harness = lab
    argv = agent(tmp_path, "sys.stdin.read(); subprocess.run(['git', 'mv', 'train.py', 'model.py'], check=True)\n")
    assert run(argv, make_ctx(ws, harness)).meta["changed"] == ["model.py", "train.py"]
