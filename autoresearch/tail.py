"""`autoresearch tail`: show (and follow) the daemon's JSON log, pretty on a terminal.

Reads ``<state_dir>/daemon.log`` (and its newest rotated backup, so that a
rotation just before the call does not hide recent history). While following,
a rotation (the file renamed and a new one created) or a truncation is noticed
and the new file is read from its start, after what was left of the old one.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .clock import parse_utc
from .errors import UserError
from .logs import LOG_NAME
from .sanitize import clean

_COLORS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m",
           "error": "\x1b[31m", "critical": "\x1b[1;31m"}
_DIM, _BOLD, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
_SHOWN = ("timestamp", "level", "event", "experiment", "state")


def _parse(line: str) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def matches(event: dict | None, experiment: int | None) -> bool:
    if experiment is None:
        return True
    if event is None or event.get("experiment") is None:
        return False
    try:
        return int(event["experiment"]) == experiment
    except (TypeError, ValueError):
        return False


def _local_time(stamp: object) -> str:
    try:
        when = parse_utc(str(stamp))
    except ValueError:
        return str(stamp)
    return time.strftime("%H:%M:%S", time.localtime(when))


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # One line per event, always: a traceback shows as its last line.
    if "\n" in text:
        text = text.strip().splitlines()[-1] + " [...]"
    return json.dumps(text) if " " in text else text


def pretty(event: dict, *, color: bool) -> str:
    """One line: time, level, experiment, state, event, then key=value for the rest."""
    level = str(event.get("level", "info"))
    exp = event.get("experiment")
    parts = [
        _local_time(event.get("timestamp", "")),
        level.upper()[:5].ljust(5),
        f"#{exp}" if exp is not None else "-",
        str(event.get("state", "-")),
        str(event.get("event", "")),
    ]
    extra = " ".join(f"{k}={_value(v)}" for k, v in event.items() if k not in _SHOWN)
    # The log's values may carry a run's or an agent's text: print no escapes, no secrets
    # (colours are ours, added after).
    parts = [clean(p) for p in parts]
    extra = clean(extra)
    if color:
        parts[0] = _DIM + parts[0] + _RESET
        parts[1] = _COLORS.get(level, "") + parts[1] + _RESET
        parts[4] = _BOLD + parts[4] + _RESET
        if extra:
            extra = _DIM + extra + _RESET
    return " ".join(parts + ([extra] if extra else []))


def render(line: str, *, as_json: bool, color: bool) -> str:
    line = line.rstrip("\n")
    if as_json:
        return line
    event = _parse(line)
    return clean(line) if event is None else pretty(event, color=color)


def _backup_lines(path: Path) -> Iterator[str]:
    try:
        with path.with_name(path.name + ".1").open(encoding="utf-8", errors="replace") as fh:
            yield from (line for line in fh if line.endswith("\n"))
    except FileNotFoundError:
        return


class _Follower:
    """Yields complete new lines of ``path``, reopening it after rotation or truncation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: IO[str] | None = None
        self.ino: int | None = None
        self.partial = ""
        self._open()

    def _open(self) -> None:
        try:
            fh = self.path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        self.fh, self.ino = fh, os.fstat(fh.fileno()).st_ino

    def _drain(self) -> Iterator[str]:
        assert self.fh is not None
        while True:
            chunk = self.fh.readline()
            if not chunk:
                return
            self.partial += chunk
            if self.partial.endswith("\n"):
                line, self.partial = self.partial, ""
                yield line

    def poll(self) -> Iterator[str]:
        if self.fh is None:
            self._open()
            if self.fh is None:
                return
        yield from self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # mid-rotation: the new file is not there yet
        if st.st_ino != self.ino:
            # Rotated: what the old file still had was drained above; start the new one.
            self.close()
            self._open()
            if self.fh is not None:
                yield from self._drain()
        elif st.st_size < self.fh.tell():
            # Truncated in place (only noticed when the file got shorter than what we read).
            self.fh.seek(0)
            self.partial = ""
            yield from self._drain()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.partial = ""


def _write(out: IO[str], lines: Iterable[str], *, as_json: bool, color: bool) -> None:
    for line in lines:
        out.write(render(line, as_json=as_json, color=color) + "\n")
    out.flush()


def tail(
    state_dir: Path,
    *,
    follow: bool = False,
    as_json: bool = False,
    experiment: int | None = None,
    out: IO[str] | None = None,
    lines: int = 50,
    stop_event: threading.Event | None = None,
    poll_interval: float = 0.25,
    color: bool | None = None,
) -> None:
    """Print the last ``lines`` events (of ``experiment`` only, if given), then follow.

    ``follow`` runs until ``stop_event`` is set or KeyboardInterrupt (which
    propagates, after the file is closed, for the CLI to turn into exit 130).
    Without ``follow``, a missing log is a UserError; with it, tail waits for it.
    """
    out = sys.stdout if out is None else out
    path = Path(state_dir) / LOG_NAME
    if color is None:
        color = (not as_json and hasattr(out, "isatty") and out.isatty()
                 and "NO_COLOR" not in os.environ)
    if not follow and not path.exists():
        raise UserError(f"no daemon log at {path} (has the daemon run in this workspace?)")

    # History and following share one open file, so nothing written in between is lost.
    follower = _Follower(path)
    try:
        recent: collections.deque[str] = collections.deque(maxlen=max(lines, 0))
        if follower.fh is not None:
            first = [line for line in follower.poll() if matches(_parse(line), experiment)]
            if len(first) < lines:  # a rotation just happened: the backup has the rest
                recent.extend(line for line in _backup_lines(path)
                              if matches(_parse(line), experiment))
            recent.extend(first)
        _write(out, recent, as_json=as_json, color=color)
        stop = stop_event or threading.Event()
        while follow and not stop.is_set():
            new = [line for line in follower.poll() if matches(_parse(line), experiment)]
            if new:
                _write(out, new, as_json=as_json, color=color)
            else:
                stop.wait(poll_interval)
    finally:
        follower.close()
