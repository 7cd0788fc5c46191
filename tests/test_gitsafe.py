"""Git runs no program named in the repository's config or attributes: each one points at a
canary script, then the daemon works (commit, status, reset, diff) and `show` prints a diff.
Checked from outside: the canary file never appears."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from autoresearch.workspace import Workspace

from daemon_fixtures import cli, git, make_workspace, state

# Every key that makes git run a program, each pointing at the canary.
PROGRAM_KEYS = (
    "core.fsmonitor", "core.hooksPath", "core.sshCommand", "core.pager", "core.editor",
    "core.askpass", "diff.external", "diff.evil.command", "diff.evil.textconv",
    "filter.evil.clean", "filter.evil.smudge", "filter.evil.process", "merge.evil.driver",
    "gpg.program", "sequence.editor", "credential.helper", "pager.diff", "pager.show",
)


def arm(root: Path, canary: Path) -> Path:
    script = root.parent / "evil.sh"
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {canary}\ncat\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    hooks = root.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("pre-commit", "post-commit", "post-checkout", "reference-transaction"):
        (hooks / name).write_text(script.read_text())
        (hooks / name).chmod(0o755)
    for key in PROGRAM_KEYS:
        git(root, "config", key, str(hooks) if key == "core.hooksPath" else str(script))
    git(root, "config", "commit.gpgSign", "true")
    git(root, "config", "filter.evil.required", "false")
    # Attributes route every file through the evil diff and filter drivers.
    info = Path(git(root, "rev-parse", "--git-dir"))
    info = (root / info if not info.is_absolute() else info) / "info"
    info.mkdir(exist_ok=True)
    (info / "attributes").write_text("* diff=evil filter=evil merge=evil\n")
    return script


def test_no_configured_program_runs_in_daemon_or_show(tmp_path):
    root = make_workspace(tmp_path / "ws")
    canary = tmp_path / "canary"
    arm(root, canary)
    config_before = (root / ".git" / "config").read_bytes()
    out = cli("run", str(root), "--max-experiments", "3")
    assert out.returncode == 0, out.stderr
    st = state(root)
    assert st.counts().get("kept", 0) + st.counts().get("discarded", 0) >= 1, st.counts()
    n = max(n for n, e in st.experiments.items() if e.commit and e.parent)
    show = cli("show", str(root), str(n), env={"PAGER": str(tmp_path / "evil.sh"),
                                                "GIT_EXTERNAL_DIFF": str(tmp_path / "evil.sh")})
    assert show.returncode == 0, show.stderr
    assert "--- diff ---" in show.stdout and "\n+" in show.stdout  # git's own diff, not the canary's
    ws = Workspace.open(root, ("train.py",))
    try:
        (root / "train.py").write_text((root / "train.py").read_text() + "# more\n")
        assert ws.changes().modified == ("train.py",)
        sha = ws.commit("by hand")
        ws.numstat(st.best_commit, sha)
        ws.reset_hard(st.best_commit)
    finally:
        ws.close()
    assert not canary.exists(), canary.read_text()
    assert (root / ".git" / "config").read_bytes() == config_before


def test_the_canary_does_run_for_plain_git(tmp_path):
    """The armed repository is really armed: plain git runs the canary (so the test above can fail)."""
    root = make_workspace(tmp_path / "ws")
    canary = tmp_path / "canary"
    arm(root, canary)
    (root / "train.py").write_text("x = 1\n")
    git(root, "status")
    assert canary.exists()
