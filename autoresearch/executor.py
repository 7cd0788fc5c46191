"""Where runs execute: the seam between the coordinator and the processes that train.

The coordinator describes a run as a ``RunSpec`` (plain values, so that it pickles and can
cross a process boundary: a remote executor sends it to another machine), submits it under a
key of its own (the experiment number, say), and learns of its end through ``poll``. Nothing
here blocks: ``submit`` starts the run and returns, ``poll`` and ``cancel`` only look or signal.

``LocalExecutor`` runs each spec as a ``runner.Run`` on this machine, at most ``slots`` at once.
A run stays counted (in ``capacity`` and ``running``) until ``poll`` has handed out its result,
so the coordinator's picture changes only through its own calls. Its ``wake`` Event, when given,
is set as soon as any run ends: the coordinator waits on it rather than polling on a timer. One caller (the coordinator's
thread) drives an executor: it is not meant to be shared between threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from . import sandbox
from .config import SandboxConfig
from .runner import Run, RunResult

RUN_TAG = "AUTORESEARCH_RUN_TAG"  # runner.kill_tagged finds a run's processes by it


@dataclass(frozen=True)
class RunSpec:
    """One run, as plain values."""

    argv: tuple[str, ...]
    cwd: str
    log_path: str
    deadline_s: float
    log_max_bytes: int
    sandbox: SandboxConfig
    layout: sandbox.Layout | None  # what a bubblewrap run sees; None: cwd as its checkout
    metric_regex: str
    memory_regex: str | None
    env: dict[str, str]  # the base environment (the runner scrubs it)
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for this run (None: leave the base env's)
    tag: str = ""  # AUTORESEARCH_RUN_TAG, per run: "<workspace tag>.<n>" ("" leaves the base env's)

    def run_env(self) -> dict[str, str]:
        """The base environment with this run's GPU and tag."""
        env = dict(self.env)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
            # gpus.py names GPUs as nvidia-smi does (PCI bus order); CUDA's default order is
            # fastest first, so an index would mean another card to CUDA without this.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if self.tag:
            env[RUN_TAG] = self.tag
        return env


@dataclass(frozen=True)
class RunInfo:
    """A submitted run whose result has not been handed out yet."""

    started: float  # time.monotonic() at submit
    log_path: str
    gpu: str | None
    pid: int  # its process group leader; 0 when it could not start
    tag: str = ""


class Executor(Protocol):
    slots: int  # runs it takes at once (a remote executor's changes as its nodes come and go)
    prepares_nodes: bool  # True: it runs run.prepare_command on each node itself (the caller must not)

    def capacity(self) -> int:
        """How many more runs ``submit`` accepts now."""

    def submit(self, key: Hashable, spec: RunSpec) -> None:
        """Start a run; never blocks. Beyond capacity, or a key in use: RuntimeError."""

    def poll(self) -> list[tuple[Hashable, RunResult]]:
        """Finished runs, each handed out once; never blocks."""

    def cancel(self, key: Hashable, reason: str) -> None:
        """Ask a run to end (its result says ``killed=reason``, via poll); never blocks."""

    def running(self) -> dict[Hashable, RunInfo]:
        """Every submitted run not yet handed out by poll."""

    def shutdown(self, reason: str, timeout: float = 10.0) -> list[tuple[Hashable, RunResult]]:
        """Cancel every run, wait (at most ``timeout``) until their processes are gone, and
        return the results not handed out yet; a run still going after ``timeout`` stays in
        ``running``. Accepts no run afterwards."""


class LocalExecutor:
    """Runs on this machine, each a ``runner.Run``: at most ``slots`` at once."""

    prepares_nodes = False  # run.prepare_command is the coordinator's to run (RayExecutor: per node)

    def __init__(self, slots: int, wake: threading.Event | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.slots = slots
        self._wake = wake  # set whenever a run ends, so that its owner polls at once
        self._runs: dict[Hashable, tuple[Run, RunInfo]] = {}
        self._closed = False

    def capacity(self) -> int:
        return 0 if self._closed else self.slots - len(self._runs)

    def submit(self, key: Hashable, spec: RunSpec) -> None:
        if self._closed:
            raise RuntimeError(f"run {key!r} submitted after shutdown")
        if key in self._runs:
            raise RuntimeError(f"run {key!r} submitted while it is still running")
        if self.capacity() <= 0:
            raise RuntimeError(f"run {key!r} submitted beyond capacity ({self.slots} slots in use)")
        started = time.monotonic()
        # A command that cannot start comes back as a finished run (exit 127), handed out by poll.
        run = Run.start(spec.argv, spec.cwd, spec.log_path, spec.deadline_s, spec.log_max_bytes,
                        spec.sandbox, spec.layout, spec.metric_regex, spec.memory_regex,
                        env=spec.run_env())
        self._runs[key] = (run, RunInfo(started, spec.log_path, spec.gpu, run.pid, spec.tag))
        if self._wake is not None:
            run.on_end = self._wake.set
            if run.poll() is not None:  # ended before the hook was in place (or never started)
                self._wake.set()

    def poll(self) -> list[tuple[Hashable, RunResult]]:
        done = [(key, run.poll()) for key, (run, _) in self._runs.items() if run.poll() is not None]
        for key, _ in done:
            del self._runs[key]
        return done

    def cancel(self, key: Hashable, reason: str) -> None:
        if key in self._runs:  # unknown or already handed out: nothing left to end
            self._runs[key][0].kill(reason)

    def running(self) -> dict[Hashable, RunInfo]:
        return {key: info for key, (_, info) in self._runs.items()}

    def shutdown(self, reason: str, timeout: float = 10.0) -> list[tuple[Hashable, RunResult]]:
        self._closed = True
        for run, _ in self._runs.values():
            run.kill(reason)
        end = time.monotonic() + timeout
        results: list[tuple[Hashable, RunResult]] = []
        while True:
            results += self.poll()
            if not self._runs or time.monotonic() >= end:
                return results
            time.sleep(0.01)


def make(cfg, slots: int, wake: threading.Event | None = None,
         prepare: tuple[list[str], dict[str, bytes], dict[str, str]] = ([], {}, {})) -> Executor:
    """The executor ``[executor] kind`` names: ``LocalExecutor(slots)``, or a ``RayExecutor``
    (imported only then: a daemon without the ``ray`` extra never imports Ray), whose slots are
    what the cluster offers. ``prepare``: run.prepare_command, the files it runs among and its
    environment, for a RayExecutor to run once on each node."""
    if cfg.executor.kind == "ray":
        try:
            from .ray_executor import RayExecutor
        except ImportError as exc:
            from .errors import ConfigError
            raise ConfigError(f"executor.kind = 'ray' needs Ray: pip install 'autoresearch[ray]' ({exc})") from None
        return RayExecutor(cfg.ray, wake, prepare=prepare)
    return LocalExecutor(slots, wake=wake)
