"""The workspace's controls that work from outside the daemon process.

- the single-instance lock (``.autoresearch/daemon.lock``: an flock, the holder's PID inside);
- the request inbox (``.autoresearch/inbox/``): ``autoresearch pause|resume|skip|stop``
  drop one JSON file per request there; the daemon's file watcher wakes it to act on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .errors import LockedError
from .eventlog import utc_now

LOCK_NAME = "daemon.lock"
INBOX_NAME = "inbox"


class WorkspaceLock:
    """An flock on .autoresearch/daemon.lock holding our PID: one daemon per workspace."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{self.path.parent.parent}: another daemon (pid {holder}) is running "
                              "on this workspace") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless)
            self._fd = None


def lock_holder(state_dir: Path) -> int | None:
    """PID of the daemon holding the workspace lock, or None when none runs."""
    try:
        fd = os.open(Path(state_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def submit_request(state_dir: Path, action: str) -> str:
    """Write a request into the inbox atomically (tmp + rename); returns its id."""
    inbox = Path(state_dir) / INBOX_NAME
    inbox.mkdir(parents=True, exist_ok=True)
    rid = f"{int(time.time() * 1000)}-{os.getpid()}-{os.urandom(3).hex()}"
    tmp = inbox / f".{rid}.tmp"
    tmp.write_text(json.dumps({"id": rid, "action": action, "time": utc_now()}))
    os.replace(tmp, inbox / f"{rid}.json")
    return rid
