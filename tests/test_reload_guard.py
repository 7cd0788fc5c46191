"""A config reload comes from the human: while a run that could have written autoresearch.toml
(fallback, no bubblewrap) is in flight, a reload that weakens the sandbox is refused; under
bubblewrap (the run cannot reach the file) the human's edit applies. Every reload records what
changed and who owns the file. A real daemon process, real SIGHUPs."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from autoresearch import sandbox

from daemon_fixtures import current, has_event, make_workspace, spawn_daemon, wait_for

needs_bwrap = pytest.mark.skipif(sandbox.bwrap_usable()[0] is None, reason="no bubblewrap here")


def _path_without_bwrap(tmp_path: Path) -> str:
    """A PATH with git, prlimit and unshare but no bwrap: the daemon then uses the fallback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "prlimit", "unshare", "sh"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _reload(proc, root: Path, old: str, new: str, kind: str, count: int):
    toml = root / "autoresearch.toml"
    toml.write_text(toml.read_text().replace(old, new))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len([1 for e in _notes(root) if e.payload.get("kind") == kind]) >= count, timeout=15)
    return [e for e in _notes(root) if e.payload.get("kind") == kind][count - 1]


def _notes(root: Path):
    from daemon_fixtures import events
    return [e for e in events(root) if e.trigger == "note"]


def _session(tmp_path, **env):
    mode = tmp_path / "modes" / "mode"
    mode.parent.mkdir()
    mode.write_text("sleep:60")
    root = make_workspace(tmp_path / "ws", sandbox={"mode": "auto", "read_only": [str(mode.parent)]})
    proc = spawn_daemon(root, env={"AUTORESEARCH_TEST_MODE": str(mode), **env})
    wait_for(lambda: current(root, "training"), timeout=60)
    return root, proc


def test_weakening_reload_is_refused_while_a_fallback_run_is_in_flight(tmp_path):
    root, proc = _session(tmp_path, PATH=_path_without_bwrap(tmp_path))
    try:
        note = _reload(proc, root, "mode = 'auto'", "mode = 'off'", "config_rejected", 1)
        assert "weakens the sandbox" in note.payload["error"] and "sandbox.mode: auto -> off" in note.payload["error"]
        assert note.payload["run_sandbox"] == "fallback" and note.payload["file_uid"] == os.getuid()
        # A change that weakens nothing applies at once, and says what it changed.
        toml = root / "autoresearch.toml"
        toml.write_text(toml.read_text().replace("mode = 'off'", "mode = 'auto'"))
        note = _reload(proc, root, "deadline_seconds = 30.0", "deadline_seconds = 31.0", "config_reloaded", 1)
        assert note.payload["changed"] == {"run.deadline_seconds": [30.0, 31.0]}
        assert current(root, "training")  # the run went on undisturbed
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@needs_bwrap
def test_the_humans_edit_applies_during_a_bubblewrap_run(tmp_path):
    root, proc = _session(tmp_path)
    try:
        note = _reload(proc, root, "mode = 'auto'", "mode = 'off'", "config_reloaded", 1)
        assert note.payload["changed"] == {"sandbox.mode": ["auto", "off"]}
        assert note.payload["run_sandbox"] == "bwrap"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
