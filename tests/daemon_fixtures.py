"""Fixture workloads and helpers for the daemon tests.

The fixture train.py computes its metric from its UPPERCASE constants in a
few milliseconds, so a whole propose-commit-run-judge cycle is cheap. Its
behaviour can be switched from outside via a mode file named by
AUTORESEARCH_TEST_MODE (AUTORESEARCH_* variables pass the run's scrubbed
environment): "sleep:N" sleeps N seconds before printing, "hang" hangs with
a forked child, "crash" exits 1.
"""

from __future__ import annotations

import hashlib
import os
import threading
import socket
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch import config as config_mod
from autoresearch.eventlog import EventLog
from autoresearch.proposers.base import NoEdit, Proposal
from autoresearch.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]

TRAIN = '''"""fixture workload: the metric is a smooth function of the constants."""
import math, os, sys, time
LEARNING_RATE = 0.04
WIDTH = 64
WARMUP = 0.1
mode_file = os.environ.get("AUTORESEARCH_TEST_MODE", "")
mode = open(mode_file).read().strip() if mode_file and os.path.exists(mode_file) else ""
if mode.startswith("sleep:"):
    time.sleep(float(mode.split(":")[1]))
elif mode == "hang":
    if os.fork() == 0:
        time.sleep(600)
    time.sleep(600)
elif mode == "crash":
    sys.exit(1)
loss = (math.log(LEARNING_RATE) - math.log(0.1)) ** 2 + (math.log(WIDTH) - math.log(128)) ** 2 / 10 + WARMUP
print("training...")
print(f"val_bpb:          {1.0 + loss:.6f}")
print("peak_vram_mb:     512.0")
'''

PROGRAM = "# program\nMake val_bpb lower.\n"


def make_workspace(root: Path, *, train: str = TRAIN, **overrides) -> Path:
    """A git workspace with the fixture workload; `overrides` are config tables, e.g. run={...}."""
    tables = {
        "run": {"command": "python train.py", "budget_seconds": 1.0, "deadline_seconds": 30.0},
        "sandbox": {"mode": "off"},
    }
    for name, values in overrides.items():
        tables.setdefault(name, {}).update(values)
    if "workload" in overrides and "eval" not in overrides:
        # A [workload] profile means the built-in evaluator, which wants an exported model the
        # fixture train.py never makes: its own evaluation step stands in (it prints the figure again).
        tables["eval"] = {"command": "python train.py"}
    defaults = config_mod.Config()
    cfg = config_mod.Config(**{
        name: type(getattr(defaults, name))(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in values.items()})
        for name, values in tables.items()})
    Workspace.create(root, {"train.py": train, "program.md": PROGRAM}, "test", config_mod.render(cfg),
                     editable=cfg.run.editable)
    return root


def _log(root: Path) -> EventLog:
    return EventLog.open(root / ".autoresearch" / "events.sqlite", create=False)


def events(root: Path):
    log = _log(root)
    try:
        return list(log.events())
    finally:
        log.close()


def state(root: Path):
    log = _log(root)
    try:
        return log.state()
    finally:
        log.close()


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def git(root: Path, *args: str) -> str:
    """git in `root` (with an identity of its own: CI machines may have none configured)."""
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_IDENTITY}).stdout.strip()


def cli(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `autoresearch ...` as a user would (a real subprocess)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "autoresearch.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kw)


def spawn_daemon(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "autoresearch.cli", "run", str(root), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full_env)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def has_event(root: Path, trigger: str, aggregate: str | None = None, dest: str | None = None, kind=None):
    if not (root / ".autoresearch" / "events.sqlite").exists():
        return None
    for e in events(root):
        if e.trigger == trigger and aggregate in (None, e.aggregate) and dest in (None, e.dest) \
                and kind in (None, e.payload.get("kind")):
            return e
    return None


def current(root: Path, state_name: str | None = None, n: int | None = None):
    """The experiment in flight, if it matches (for waiting on a daemon process)."""
    if not (root / ".autoresearch" / "events.sqlite").exists():
        return None
    cur = state(root).current()
    if cur is None or state_name not in (None, cur.state) or n not in (None, cur.n):
        return None
    return cur


def tagged_processes(root: Path) -> list[int]:
    """PIDs still alive (not zombies) that belong to this workspace's runs, by the run tag."""
    tag = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16]
    needle = f"AUTORESEARCH_RUN_TAG={tag}".encode()
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle not in f.read():
                        continue
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(int(entry))
            except OSError:
                pass
    return alive


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def kill_runs(root: Path) -> None:
    """Clean up runs a test left orphaned on purpose (by kill -9 of their daemon)."""
    for pid in tagged_processes(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ScriptedProposer:
    """A proposer that returns prepared edits in order (our own interface, not a library mock).

    Each item: a dict {path: new text} (an in-memory proposal), a callable(ctx) that edits the
    worktree itself and returns a description (like an agent CLI), or an exception to raise.
    """

    name = "scripted"

    def __init__(self, items):
        self.items = list(items)
        self.contexts = []

    @property
    def edits_worktree(self) -> bool:
        """Like an agent CLI while a worktree edit is next: the daemon runs one such at a time."""
        return bool(self.items) and callable(self.items[0]) and not isinstance(self.items[0], BaseException)

    def propose(self, ctx):
        self.contexts.append(ctx)
        if not self.items:
            raise NoEdit("script exhausted")
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            return Proposal(description=item(ctx), files=None, proposer="scripted")
        return Proposal(description=f"scripted edit {len(self.contexts)}", files=dict(item),
                        proposer="scripted")


def factory(proposer):
    """A proposer_factory for Daemon: the scripted proposer, and the real offline one as fallback."""
    from autoresearch.daemon import make_proposer

    def make(cfg, kind=None):
        return make_proposer(cfg, "offline") if kind == "offline" else proposer

    return make


def edited(text: str, **constants) -> str:
    """`text` with some top-level constants replaced."""
    out = []
    for line in text.splitlines(keepends=True):
        name = line.split(" = ")[0]
        if name in constants:
            line = f"{name} = {constants[name]!r}\n"
        out.append(line)
    return "".join(out)


def editable_install(clone: Path) -> Path:
    """The README's install (`python3 -m venv .venv && .venv/bin/pip install -e .`) in `clone`,
    offline: this checkout's package source copied to clone/autoresearch, a venv at clone/.venv
    that imports it from there through a .pth (a path-based editable install) and finds the
    dependencies in this environment through another; returns its console script."""
    shutil.copytree(REPO / "autoresearch", clone / "autoresearch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # .pth files are read in name order: the editable source first, then the dependencies.
    (purelib / "__editable__.autoresearch.pth").write_text(f"{clone}\n")
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (purelib / "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    script = venv / "bin" / "autoresearch"
    script.write_text(f"#!{python}\nimport sys\nfrom autoresearch.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def mode(tmp_path):
    """A file that switches the fixture workload's behaviour (see the module's docstring)."""
    path = tmp_path / "mode"
    path.write_text("")
    return path


def mode_env(mode, **extra):
    """The environment that points a run at the `mode` file."""
    return {"AUTORESEARCH_TEST_MODE": str(mode), **extra}


class NotifySink:
    """A fake systemd notify socket: collects (arrival time, datagram)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self):
        while not self._done.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(65536).decode()))
            except socket.timeout:
                pass

    def close(self):
        self._done.set()
        self._thread.join(timeout=5)
        self.sock.close()
