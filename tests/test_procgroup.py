"""procgroup.GroupSupervisor: real process groups, real signals, checked from /proc."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from autoresearch.procgroup import GroupSupervisor


def start(tmp_path: Path, body: str) -> subprocess.Popen:
    script = tmp_path / "leader.py"
    script.write_text("import os, signal, subprocess, sys, time\n" + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def supervise(group: GroupSupervisor, stop_at: float | None = None, reason: str = "asked",
              sig: int = signal.SIGTERM) -> tuple[int, float]:
    """The owner's loop, as the runner and the command proposer run it: (return code, seconds)."""
    t0 = time.monotonic()
    while not group.tick():
        if stop_at is not None and time.monotonic() - t0 >= stop_at:
            group.stop(reason, sig)
        time.sleep(0.01)
    return group.finish(), time.monotonic() - t0


CHILD = """
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
"""


def test_the_deadline_terms_the_group(tmp_path):
    proc = start(tmp_path, "print(os.getpid(), flush=True); time.sleep(60)\n")
    proc.stdout.readline()
    group = GroupSupervisor(proc, deadline=time.monotonic() + 0.3, grace_s=5.0)
    code, took = supervise(group)
    assert group.reason == "deadline" and code == -signal.SIGTERM
    assert 0.3 <= took < 3.0


def test_a_leader_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    proc = start(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                           "time.sleep(60)\n")
    proc.stdout.readline()
    group = GroupSupervisor(proc, deadline=time.monotonic() + 60, grace_s=0.5)
    code, took = supervise(group, stop_at=0.1)
    assert group.reason == "asked" and code == -signal.SIGKILL
    assert 0.6 <= took < 3.0  # not before the grace, not long after it


def test_sigkill_at_once_gets_no_grace(tmp_path):
    proc = start(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                           "time.sleep(60)\n")
    proc.stdout.readline()
    group = GroupSupervisor(proc, deadline=time.monotonic() + 60, grace_s=30.0)
    code, took = supervise(group, stop_at=0.0, reason="memory", sig=signal.SIGKILL)
    assert group.reason == "memory" and code == -signal.SIGKILL and took < 2.0


def test_children_left_behind_after_a_normal_exit_die_before_the_leader_is_reaped(tmp_path):
    proc = start(tmp_path, CHILD + "sys.exit(3)\n")
    child = int(proc.stdout.readline())
    group = GroupSupervisor(proc, deadline=time.monotonic() + 60, grace_s=5.0)
    code, _ = supervise(group)
    assert code == 3 and group.reason is None
    deadline = time.monotonic() + 3
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child)


def test_finish_waits_for_the_members_it_is_given(tmp_path):
    proc = start(tmp_path, CHILD + "sys.exit(0)\n")
    child = int(proc.stdout.readline())
    group = GroupSupervisor(proc, deadline=time.monotonic() + 60, grace_s=5.0)
    while not group.tick():
        time.sleep(0.01)
    assert group.finish(members=lambda: [child] if alive(child) else []) == 0
    assert not alive(child)  # gone by the time finish returned, not merely signalled


def test_the_first_reason_wins_and_nothing_is_stopped_once_finishing(tmp_path):
    proc = start(tmp_path, "print('ready', flush=True); time.sleep(60)\n")
    proc.stdout.readline()
    sent = []
    group = GroupSupervisor(proc, deadline=time.monotonic() + 60, grace_s=5.0,
                            send=lambda sig: (sent.append(sig), proc.send_signal(sig)))
    assert group.stop("skip") is True
    assert group.stop("deadline") is False and group.reason == "skip"
    while not group.tick():
        time.sleep(0.01)
    assert group.finish() == -signal.SIGTERM
    assert group.stop("late") is False and group.reason == "skip"
    assert sent == [signal.SIGTERM, signal.SIGKILL]  # the request, then finish's sweep of the group
