"""sandbox.mode as a user meets it: what each run got is recorded, `run` and `status` warn while runs
are not fully contained, and "strict" refuses to start without bubblewrap."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from autoresearch import sandbox

from daemon_fixtures import cli, events, make_workspace, spawn_daemon, wait_for


def _path_without_bwrap(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "prlimit", "unshare", "sh"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def test_mode_off_is_recorded_and_warned_about(tmp_path):
    root = make_workspace(tmp_path / "ws")  # the fixtures' mode: off
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("autoresearch: WARNING: runs will not be fully contained (sandbox off")
    launches = [e for e in events(root) if e.trigger == "launch"]
    assert launches and all(e.payload["sandbox"] == "off" for e in launches)
    finish = next(e for e in events(root) if e.trigger == "finish")
    assert finish.payload["sandbox"]["kind"] == "off"
    status = cli("status", str(root)).stdout
    assert "sandbox:    WARNING: runs are not fully contained (exp 1 ran with sandbox off: sandbox.mode = off)" in status
    assert json.loads(cli("status", str(root), "--json").stdout)["sandbox"] == "off"


def test_strict_without_bubblewrap_refuses_to_start(tmp_path):
    root = make_workspace(tmp_path / "ws", sandbox={"mode": "strict"})
    out = cli("run", str(root), "--max-experiments", "1", env={"PATH": _path_without_bwrap(tmp_path)})
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "sandbox.mode = 'strict' but bubblewrap cannot run here: bwrap is not installed" in last, out.stderr
    assert not [e for e in events(root) if e.trigger == "launch"] if (root / ".autoresearch" / "events.sqlite").exists() else True


def test_auto_without_bubblewrap_falls_back_and_says_so(tmp_path):
    root = make_workspace(tmp_path / "ws", sandbox={"mode": "auto"})
    out = cli("run", str(root), "--max-experiments", "1", env={"PATH": _path_without_bwrap(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "runs will not be fully contained (sandbox fallback: bwrap is not installed" in out.stderr
    finish = next(e for e in events(root) if e.trigger == "finish")
    assert finish.payload["sandbox"]["kind"] == "fallback"
    assert "fallback: bwrap is not installed" in cli("status", str(root)).stdout


@pytest.mark.skipif(sandbox.bwrap_usable()[0] is None, reason="no bubblewrap here")
def test_auto_with_bubblewrap_is_contained_and_quiet(tmp_path):
    root = make_workspace(tmp_path / "ws", sandbox={"mode": "auto"})
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr
    assert all(e.payload["sandbox"]["kind"] == "bwrap" for e in events(root) if e.trigger == "finish")
    assert "sandbox:" not in cli("status", str(root)).stdout


def _in_dir(path: Path) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == str(path):
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        out.append(int(entry))
        except OSError:
            continue
    return out


@pytest.mark.skipif(sandbox.bwrap_usable()[0] is None, reason="no bubblewrap here")
def test_a_run_dies_with_a_daemon_killed_with_sigkill(tmp_path):
    """--die-with-parent and the PID namespace: kill -9 of the daemon takes the whole run with it
    (the fixture's "hang" forks a child), with no reconciliation needed."""
    mode = tmp_path / "modes" / "mode"
    mode.parent.mkdir()
    mode.write_text("hang")
    root = make_workspace(tmp_path / "ws", sandbox={"mode": "auto", "read_only": [str(mode.parent)]})
    proc = spawn_daemon(root, env={"AUTORESEARCH_TEST_MODE": str(mode)})
    checkout = root / ".autoresearch" / "slots" / "0"
    try:
        pids = wait_for(lambda: len(_in_dir(checkout)) >= 3 and _in_dir(checkout), timeout=60)
    finally:
        proc.kill()
        proc.wait(10)
    time.sleep(1.0)
    assert [p for p in pids if os.path.exists(f"/proc/{p}") and p in _in_dir(checkout)] == []
