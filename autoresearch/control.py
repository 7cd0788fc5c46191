"""The workspace's controls that work from outside the daemon process.

- the single-instance lock (an flock on ``.autoresearch/`` itself; ``daemon.lock`` holds the PID);
- the request inbox (``.autoresearch/inbox/``): ``autoresearch pause|resume|skip|stop``
  drop one JSON file per request there; the daemon's file watcher wakes it to act on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .clock import utc_iso
from .errors import LockedError

LOCK_NAME = "daemon.lock"
INBOX_NAME = "inbox"
PROBE_GRACE_S = 0.2  # how long a starting daemon waits out another process's lock before refusing


class WorkspaceLock:
    """One daemon per workspace: an flock on the state directory itself.

    A lock on a file can be defeated by deleting the file (the next daemon creates a new one
    and locks that); the state directory cannot be replaced under a running daemon without
    taking its event log with it. ``daemon.lock`` only tells readers the holder's PID.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        # A reader's lock_holder() holds a shared lock for microseconds; a daemon holds it for
        # good. So only a lock still taken after PROBE_GRACE_S means another daemon.
        give_up = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    os.close(fd)
                    raise locked_error(self.state_dir, _read_pid(self.state_dir)) from None
                time.sleep(0.01)
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """(Re)write daemon.lock with our PID, atomically (it may have been deleted)."""
        tmp = self.state_dir / f".{LOCK_NAME}.{os.getpid()}"
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; daemon.lock stays (harmless)
            self._fd = None


def locked_error(state_dir: Path, holder: int) -> LockedError:
    return LockedError(f"{Path(state_dir).parent}: another daemon (pid {holder if holder > 0 else 'unknown'}) "
                       "is running on this workspace")


def _read_pid(state_dir: Path) -> int:
    try:
        text = (Path(state_dir) / LOCK_NAME).read_text(errors="replace").strip()
    except OSError:
        return -1
    return int(text) if text.isdigit() else -1


def lock_holder(state_dir: Path) -> int | None:
    """PID of the daemon holding the workspace lock (-1: unknown), or None when none runs."""
    try:
        fd = os.open(Path(state_dir), os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read_pid(state_dir)
    finally:
        os.close(fd)


def request_path(state_dir: Path, rid: str) -> Path:
    return Path(state_dir) / INBOX_NAME / f"{rid}.json"


def submit_request(state_dir: Path, action: str, *, experiment: int | None = None,
                   seen: list[int] | None = None) -> str:
    """Write a request into the inbox atomically (tmp + rename); returns its id.

    `experiment`: the one experiment a skip is meant for (`skip lab 12`); the daemon answers
    "already ended" rather than skip another. `seen`: for a bare skip, the experiments in flight
    when it was asked: those are skipped, never one started after.
    """
    inbox = Path(state_dir) / INBOX_NAME
    inbox.mkdir(parents=True, exist_ok=True)
    # The id starts with the time in ns, so that sorting names reads requests in order.
    rid = f"{time.time_ns():019d}-{os.getpid()}-{os.urandom(3).hex()}"
    request = {"id": rid, "action": action, "time": utc_iso(precision="microseconds")}
    if experiment is not None:
        request["experiment"] = experiment
    if seen is not None:
        request["seen"] = list(seen)
    tmp = inbox / f".{rid}.tmp"
    tmp.write_text(json.dumps(request))
    os.replace(tmp, request_path(state_dir, rid))
    return rid


def withdraw_request(state_dir: Path, rid: str) -> bool:
    """Take a request back out of the inbox; False when the daemon has already taken it."""
    try:
        request_path(state_dir, rid).unlink()
    except FileNotFoundError:
        return False
    return True


def pending_requests(state_dir: Path) -> list[dict]:
    """The requests still in the inbox (not read by a daemon yet), oldest first."""
    pending = []
    for path in sorted((Path(state_dir) / INBOX_NAME).glob("*.json")):
        try:
            request = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # taken by the daemon meanwhile, or not one of ours
        if isinstance(request, dict) and "action" in request:
            pending.append(request)
    return pending
