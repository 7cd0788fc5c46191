"""The read-only side of a workspace, as the dashboard sees it.

Nothing here writes to the workspace or takes a lock the daemon could trip on:
- the event log is opened with SQLite's read-only mode, and every read is a short
  statement (a read transaction held open would keep the daemon's WAL from being
  checkpointed);
- whether the daemon is alive is read from /proc/locks (who holds the flock on
  the state directory), never by trying the lock ourselves: a probe, however brief, could make
  a daemon starting at that instant believe another one is running;
- diffs come from `git diff` between two commits, without optional locks and with
  repository-supplied programs (external diff, textconv, hooks) disabled.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

from .. import gitsafe
from ..control import LOCK_NAME
from ..errors import UserError
from ..eventlog import Event, schema_version
from ..state import State, apply

EVENTS_NAME = "events.sqlite"
DIFF_MAX_BYTES = 2_000_000
_SELECT = ("SELECT seq, time, aggregate, trigger, source, dest, payload, hash FROM events "
           "WHERE seq > ? ORDER BY seq LIMIT ?")


def _event(row) -> Event:
    seq, time, aggregate, trigger, source, dest, payload, digest = row
    return Event(seq=seq, time=time, aggregate=aggregate, trigger=trigger, source=source, dest=dest,
                 payload=json.loads(payload), hash=digest)


class LogReader:
    """Follows the event log read-only and keeps its fold up to date.

    `poll()` returns the events appended since the last call. When the log is replaced
    (`autoresearch repair`) or shrinks, the fold starts over and `poll()` says so.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / EVENTS_NAME
        self.conn: sqlite3.Connection | None = None
        self.state = State()
        self.launched: dict[int, tuple[str, int]] = {}  # experiment -> (time, attempt) of its latest run
        self.boot_time = ""  # the daemon's latest boot
        self._ino: int | None = None

    def _open(self) -> bool:
        try:
            ino = os.stat(self.path).st_ino
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        except (OSError, sqlite3.Error):
            return False  # not there yet (the daemon has not run)
        try:
            conn.execute("PRAGMA query_only=1")
            conn.execute("SELECT 1 FROM events LIMIT 1").fetchall()
            schema_version(conn, self.path)  # never fold a log a newer autoresearch wrote
        except (sqlite3.Error, UserError):
            conn.close()
            return False  # being created, or not ours to read
        self.conn, self._ino = conn, ino
        return True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _replaced(self) -> bool:
        try:
            if os.stat(self.path).st_ino != self._ino:
                return True
            if self.state.seq:
                row = self.conn.execute("SELECT hash FROM events WHERE seq = ?", [self.state.seq]).fetchone()
                return row is None or row[0] != self.state.hash
        except (OSError, sqlite3.Error):
            return True
        return False

    def poll(self, limit: int = 500) -> tuple[list[Event], bool]:
        """(new events, whether the fold was reset first). At most `limit` events per call."""
        reset = False
        if self.conn is not None and self._replaced():
            self.close()
            self.state, self.launched, self.boot_time, reset = State(), {}, "", True
        if self.conn is None and not self._open():
            return [], reset
        try:
            rows = self.conn.execute(_SELECT, [self.state.seq, limit]).fetchall()
        except sqlite3.Error:
            self.close()
            return [], reset
        events = []
        for row in rows:
            event = _event(row)
            apply(self.state, event)
            n = event.experiment
            if n is not None:
                # Kept flat: the page shows git's diff, and reads a log tail from the log when asked.
                exp = self.state.experiments[n]
                exp.files, exp.log_tail = None, ""
                if event.trigger in ("launch", "rerun"):
                    self.launched[n] = (event.time, int(event.payload.get("attempt") or 1))
            elif event.trigger == "boot":
                self.boot_time = event.time
            events.append(event)
        return events, reset

    def events(self, *, aggregate: str | None = None) -> list[Event]:
        """Events read afresh (one experiment's, or the daemon's): for pages, not for following."""
        if self.conn is None:
            return []
        sql = "SELECT seq, time, aggregate, trigger, source, dest, payload, hash FROM events"
        args: list = []
        if aggregate is not None:
            sql += " WHERE aggregate = ?"
            args.append(aggregate)
        try:
            rows = self.conn.execute(sql + " ORDER BY seq", args).fetchall()
        except sqlite3.Error:
            return []
        return [_event(row) for row in rows]


def daemon_pid(state_dir: Path) -> int | None:
    """PID of the daemon holding the workspace lock (an flock on the state directory itself, see
    control.WorkspaceLock), found without touching the lock."""
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return None
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            locks = fh.read().splitlines()
    except OSError:
        return _pid_from_file(Path(state_dir) / LOCK_NAME)  # no /proc (macOS): the PID it wrote, if alive
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a waiter)
        if len(fields) >= 6 and "->" not in fields and fields[1] == "FLOCK" and fields[5] == wanted:
            return int(fields[4]) if fields[4].isdigit() else -1
    return None


def _pid_from_file(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def run_log_path(root: Path, n: int, attempt: int) -> Path:
    """Where the daemon writes the output of experiment n's run number `attempt` (see daemon._start_run)."""
    name = f"{n}.log" if attempt <= 1 else f"{n}-{attempt}.log"
    return Path(root) / ".autoresearch" / "runs" / name


def git_diff(root: Path, a: str, b: str) -> str:
    """`git diff a b` read-only (no optional locks, no repository-supplied program: gitsafe);
    '' when git cannot say (a commit was garbage-collected, say)."""
    for sha in (a, b):
        if not sha or not all(c in "0123456789abcdef" for c in sha):
            return ""
    try:
        proc = gitsafe.run(["--no-optional-locks", "diff", *gitsafe.DIFF_FLAGS, a, b, "--"], root,
                           capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    if proc.returncode != 0:
        return ""
    return proc.stdout[:DIFF_MAX_BYTES].decode("utf-8", errors="replace")
