"""Supervising one process group, from its start to its leader reaped.

Shared by a training run (runner.Run) and an agent CLI (proposers.command). The leader
was started with ``start_new_session=True``, so its pid is the group's id. The group gets
SIGTERM at its deadline or on a stop request (SIGKILL at once for a machine at risk), SIGKILL
once the grace has passed, and, after the leader's exit, SIGKILL for whatever is left of it
(children it left behind) *before* the leader is reaped: an unreaped zombie keeps its pid, so
the group id cannot have been reused by a stranger when the signal is sent.

A process that leaves the group on purpose (setsid) is beyond reach here: the runner also
kills by PID namespace, and systemd's control group catches the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Callable


def killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class GroupSupervisor:
    """The deadline, the stop requests and the SIGTERM -> SIGKILL escalation of one group.

    The owner calls :meth:`tick` in its own loop until it returns True (the leader has
    exited), then :meth:`finish`. :meth:`stop` may be called from any thread.
    ``send(sig)`` signals the group (default: killpg; the runner routes signals into its
    PID namespace).
    """

    def __init__(self, proc: subprocess.Popen, *, deadline: float, grace_s: float,
                 send: Callable[[int], object] | None = None):
        self.proc = proc
        self.pgid = proc.pid
        self.deadline = deadline  # time.monotonic() at which the group gets SIGTERM ("deadline")
        self.grace_s = grace_s
        self._send = send or (lambda sig: killpg(self.pgid, sig))
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._term_at: float | None = None
        self._finishing = False

    @property
    def reason(self) -> str | None:
        """Why the group was stopped ("deadline", or what stop() was given); None if it was not."""
        return self._reason

    def stop(self, reason: str, sig: int = signal.SIGTERM) -> bool:
        """Stop the group: ``sig`` now, SIGKILL after the grace. The first reason wins; False
        when the group is already stopping or its leader is being reaped. Never blocks."""
        with self._lock:
            if self._reason is not None or self._finishing:
                return False
            self._reason, self._term_at = reason, time.monotonic()
        self._send(sig)
        return True

    def exited(self) -> bool:
        """True once the leader has exited, WITHOUT reaping it (the zombie keeps the pgid ours)."""
        try:
            return os.waitid(os.P_PID, self.pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def tick(self) -> bool:
        """One look: True once the leader has exited; before that, the deadline and the grace
        are enforced."""
        if self.exited():
            return True
        now = time.monotonic()
        if now >= self.deadline:
            self.stop("deadline")
        term_at = self._term_at
        if term_at is not None and now - term_at > self.grace_s:
            self._send(signal.SIGKILL)
        return False

    def finish(self, members: Callable[[], list[int]] | None = None, settle_s: float = 2.0) -> int:
        """Once the leader has exited: SIGKILL what is left of the group, wait (up to
        ``settle_s``) until ``members()`` lists nobody, reap the leader. Its return code."""
        with self._lock:
            self._finishing = True
        self._send(signal.SIGKILL)
        if members is not None:
            end = time.monotonic() + settle_s
            while members() and time.monotonic() < end:
                time.sleep(0.01)
        return self.proc.wait()
