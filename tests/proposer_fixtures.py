"""Workspaces and contexts for the proposer tests (anthropic and command)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from autoresearch.proposers.base import HistoryRow, ProposalContext

TRAIN_PY = """\
import math

LR = 0.01
BATCH = 32
WARMUP = 100

def schedule(step):
    return LR * min(1.0, step / WARMUP)

def main():
    print("val_bpb: 1.0")
    # end
    # end

if __name__ == "__main__":
    main()
"""

HARNESS_PY = "def evaluate_bpb(model):\n    return 1.0\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_workspace(tmp_path: Path) -> tuple[Path, Path]:
    """A real git workspace with train.py (editable), prepare.py (read-only) and a harness dir."""
    ws = tmp_path / "lab"
    ws.mkdir()
    (ws / "train.py").write_text(TRAIN_PY)
    (ws / "prepare.py").write_text("# read-only harness entry\nSEED = 42\n")
    (ws / "program.md").write_text("Lower val_bpb. Try learning-rate ideas first.\n")
    (ws / ".gitignore").write_text(".autoresearch/\n")
    (ws / ".autoresearch").mkdir()
    (ws / ".autoresearch" / "events.sqlite").write_text("not for agents")
    git(ws, "init", "-q")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "harness.py").write_text(HARNESS_PY)
    return ws, harness


def make_ctx(ws: Path, harness: Path | None = None, *, deadline_s: float = 30.0, n: int = 3,
             history=None, last_failure: str | None = None, **kw) -> ProposalContext:
    if history is None:
        history = (HistoryRow(0, "baseline", 1.0, "baseline"),
                   HistoryRow(1, "kept", 0.98, "LR 0.01 -> 0.02"),
                   HistoryRow(2, "crashed", None, "remove warmup"))
    args = dict(workspace=ws, n=n, program=(ws / "program.md").read_text(), editable=("train.py",),
                files={"train.py": (ws / "train.py").read_text()}, history=tuple(history),
                best_metric=0.98, direction="minimize", last_failure=last_failure,
                harness_dir=harness, deadline=time.monotonic() + deadline_s, cancel=threading.Event())
    args.update(kw)
    return ProposalContext(**args)
