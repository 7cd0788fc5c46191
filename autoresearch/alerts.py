"""Notifications: the human's `[notify] command`, run on chosen events (a new best, blocked, ...).

(Not to be confused with notify.py, which speaks sd_notify to systemd.)

`kind_of(event)` says which notification an event is, if any (pure). `Alerts.observe`
is called by the daemon for every event it records; it only puts the notification in a
queue and returns, so a slow or hanging command never holds up the loop. One worker
thread runs the commands one after the other, each with `sh -c`, the notification as
JSON on stdin, a few AUTORESEARCH_NOTIFY_* variables for one-liners, and a deadline
after which its whole process group is killed. Outcomes go to the daemon's log (not the
event log: only the main loop writes events). At shutdown the queue is given a short
while to drain, so that "stopped" still goes out.

Delivery is at most once: a notification queued when the daemon is killed is lost.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from . import sanitize
from .report import fmt_metric, status_line
from .secrets import ENV_NAME, redact, redact_obj

log = structlog.get_logger("autoresearch.alerts")

KINDS = ("new_best", "crashed", "blocked", "exhausted", "stopped", "restarted")
DEFAULT_KINDS = ("new_best", "blocked", "exhausted", "stopped", "restarted")
QUEUE_MAX = 100  # beyond this (a command far slower than events come), notifications are dropped
SHUTDOWN_DRAIN_MAX_S = 15.0
OUTPUT_CHARS = 400
_NOT_PASSED = (ENV_NAME, "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")


def kind_of(event) -> str | None:
    """Which notification `event` is, or None."""
    if event.aggregate == "daemon":
        if event.trigger == "boot":
            return "restarted" if event.seq > 1 else None  # any start but the log's very first
        return {"block": "blocked", "exhaust": "exhausted", "stop": "stopped"}.get(event.trigger)
    if event.trigger == "keep" and event.payload.get("reason") != "baseline":
        return "new_best"
    if event.trigger == "crash":
        return "crashed"
    return None


def message(kind: str, event, state, workspace: Path) -> dict[str, Any]:
    """The notification: what happened in one line (`text`), the event, and where things stand."""
    name = Path(workspace).name
    p = event.payload
    n = event.experiment
    exp = state.experiments.get(n) if n is not None else None
    if kind == "new_best":
        base = state.experiments.get(state.baseline_n) if state.baseline_n is not None else None
        gain = ""
        if base is not None and base.metric is not None and exp is not None and exp.metric is not None:
            gain = f", {exp.metric - base.metric:+.6f} vs baseline"
        text = f"new best {fmt_metric(p.get('metric'))} (exp {n}: {exp.description if exp else ''}{gain})"
    elif kind == "crashed":
        text = f"exp {n} crashed: {p.get('reason', '')}"
    elif kind == "restarted":
        after = " after a crash (no stop recorded)" if event.source not in ("stopped", "exhausted") else ""
        text = f"daemon started again{after}"
    else:
        text = f"daemon {event.dest}: {p.get('reason', '')}".rstrip(": ")
    payload = {k: v for k, v in p.items() if k not in ("files", "log_tail")}
    return redact_obj({
        "kind": kind, "workspace": str(workspace), "text": f"autoresearch {name}: {' '.join(text.split())}",
        "status": status_line(state),
        "event": {"seq": event.seq, "time": event.time, "aggregate": event.aggregate, "trigger": event.trigger,
                  "source": event.source, "dest": event.dest, "payload": payload},
        "experiment": None if exp is None else {"n": exp.n, "description": exp.description, "metric": exp.metric,
                                                "reason": exp.reason, "commit": exp.commit},
        "best_metric": state.best_metric, "best_experiment": state.best_n,
    })


class Alerts:
    """Queue of notifications and the one thread that runs the command for each."""

    def __init__(self, settings: Callable[[], Any], workspace: Path):
        self._settings = settings  # -> config.NotifyConfig (read per event: a config reload applies)
        self.workspace = Path(workspace)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()

    def observe(self, event, state) -> None:
        """Called for every recorded event; returns at once."""
        cfg = self._settings()
        if not cfg.command:
            return
        kind = kind_of(event)
        if kind is None or kind not in cfg.events:
            return
        try:
            self._queue.put_nowait((cfg.command, cfg.timeout_seconds, message(kind, event, state, self.workspace)))
        except queue.Full:
            log.warning("notification dropped: too many waiting (the command is slower than events come)",
                        kind=kind, seq=event.seq)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="notify-command", daemon=True)
            self._thread.start()

    def close(self, wait_s: float | None = None) -> None:
        """Give queued notifications a short while to go out (the daemon is stopping)."""
        if self._thread is None:
            return
        end = time.monotonic() + (SHUTDOWN_DRAIN_MAX_S if wait_s is None else wait_s)
        while (not self._queue.empty() or self._busy.is_set()) and time.monotonic() < end:
            time.sleep(0.02)
        if not self._queue.empty() or self._busy.is_set():
            log.warning("notifications still pending at shutdown were not sent", pending=self._queue.qsize())

    def _work(self) -> None:
        while True:
            command, timeout_s, msg = self._queue.get()
            self._busy.set()
            try:
                self._run(command, timeout_s, msg)
            except Exception as exc:  # a notification must never take anything else down
                log.warning("notification command failed to start", kind=msg["kind"], error=str(exc))
            finally:
                self._busy.clear()

    def _run(self, command: str, timeout_s: float, msg: dict[str, Any]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
        env.update(AUTORESEARCH_NOTIFY_KIND=msg["kind"], AUTORESEARCH_NOTIFY_TEXT=msg["text"],
                   AUTORESEARCH_WORKSPACE=str(self.workspace))
        started = time.monotonic()
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=self.workspace, env=env, start_new_session=True)
        data = (json.dumps(msg) + "\n").encode()
        try:
            out, _ = proc.communicate(data, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: sh and what it started
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            log.warning("notification command killed at its deadline", kind=msg["kind"],
                        timeout_s=timeout_s, output=self._tail(out))
            return
        took = round(time.monotonic() - started, 3)
        if proc.returncode != 0:
            log.warning("notification command failed", kind=msg["kind"], exit_code=proc.returncode,
                        seconds=took, output=self._tail(out))
        else:
            log.info("notification sent", kind=msg["kind"], seconds=took)

    @staticmethod
    def _tail(out: bytes | None) -> str:
        return redact(sanitize.strip_controls((out or b"").decode("utf-8", "replace"))[-OUTPUT_CHARS:])
