"""Logging: every event is one JSON object, to a rotated file and to stdout or journald.

structlog renders through the stdlib ``logging`` machinery (so third-party
loggers come out as the same JSON). Context bound with
``structlog.contextvars.bind_contextvars(experiment=42, state="training",
trigger="run_started")`` lands on every line. Destinations:

- ``<state_dir>/daemon.log``: JSON lines, rotated (read by ``autoresearch tail``);
- journald via its native protocol when running under systemd (fields queryable:
  ``journalctl -u autoresearch@lab EXPERIMENT=42 STATE=blocked``), otherwise
  ``stream``: JSON lines, or (``fmt="human"``) the lines ``autoresearch tail`` prints.

``redact`` (str -> str) is applied to every rendered line before it leaves the
process, whatever the destination.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

import structlog

from . import journal as journal_mod
from .errors import ConfigError

LOG_NAME = "daemon.log"
IDENTIFIER = "autoresearch"
# Chatty libraries: their INFO lines (every HTTP request, every file event) are noise here,
# and the SDK's DEBUG lines carry whole prompts.
QUIET_LOGGERS = ("anthropic", "httpx", "httpx2", "httpcore", "httpcore2", "watchdog", "git",
                 "urllib3", "filelock")
# The first keys of every line, in this order: easy to read with `tail` or `jq`.
_FIRST = ("timestamp", "level", "event")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}

Redactor = Callable[[str], str]


def _identity(line: str) -> str:
    return line


def _order_keys(_logger: object, _name: str, event: dict) -> dict:
    ordered = {k: event.pop(k) for k in _FIRST if k in event}
    ordered.update(event)
    return ordered


def _dumps(obj: object, **kw: object) -> str:
    # str(), not repr(), for Paths and the like; keep non-ASCII text readable.
    kw.update(default=str, ensure_ascii=False)
    return json.dumps(obj, **kw)


_PRE_CHAIN = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders a record to one JSON line, then redacts it."""

    def __init__(self, redact: Redactor = _identity) -> None:
        super().__init__(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _order_keys,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
            foreign_pre_chain=_PRE_CHAIN,
        )
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """daemon.log, rotated. A failed write (a full disk) is one line on stderr, not a
    traceback per log line; lines are dropped until writing works again, which is said too.
    The event log, not this file, is the record: the daemon carries on either way."""

    _failing = False
    _failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)  # catches the error and calls handleError
        if self._failing and not self._failed_now:
            self._failing = False
            sys.stderr.write(f"autoresearch: {self.baseFilename} is writable again\n")

    def close(self) -> None:
        try:
            super().close()  # closes the file even when its last flush fails
        except OSError:
            pass  # lines a full disk would not take: dropped, as said on stderr

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if not self._failing:
            self._failing = True
            exc = sys.exc_info()[1]
            sys.stderr.write(f"autoresearch: cannot write {self.baseFilename} ({exc}); "
                             "its lines are dropped until it works again\n")


class JournalHandler(logging.Handler):
    """Sends each rendered (and redacted) JSON line to journald as structured fields.

    The line is parsed back so that redaction has already happened on everything
    we send. If journald cannot be reached, the line goes to ``fallback`` instead.
    """

    def __init__(self, sender: journal_mod.JournalSender, fallback: IO[str] | None) -> None:
        super().__init__()
        self.sender = sender
        self.fallback = fallback
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the daemon
            self.handleError(record)
            return
        try:
            self.sender.send_fields(fields_for_line(line))
        except OSError as exc:
            self._write_fallback(line, exc)

    def _write_fallback(self, line: str, exc: OSError) -> None:
        if self.fallback is None:
            return
        if not self._failed:
            self._failed = True
            self.fallback.write(_dumps({"level": "warning", "event": "journal_unreachable",
                                        "error": str(exc)}) + "\n")
        self.fallback.write(line + "\n")
        self.fallback.flush()

    def close(self) -> None:
        self.sender.close()
        super().close()


def fields_for_line(line: str) -> dict[str, object]:
    """Journal fields for one rendered JSON line.

    MESSAGE is the event followed by its context as ``key=value`` (readable in a
    plain ``journalctl``); every key is also its own upper-cased field.
    """
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return journal_mod.record(line, identifier=IDENTIFIER)
    rest = {k: v for k, v in event.items() if k not in ("timestamp", "level", "event")}
    parts = [str(event.get("event", ""))]
    parts += [f"{k}={_short(v)}" for k, v in rest.items() if k != "exception" and v is not None]
    message = " ".join(p for p in parts if p)
    if "exception" in rest:
        message += "\n" + str(rest["exception"])
    return journal_mod.record(message, priority_=journal_mod.priority(event.get("level")),
                              identifier=IDENTIFIER, **rest)


def _short(value: object) -> str:
    text = value if isinstance(value, str) else _dumps(value)
    return text if " " not in text else _dumps(text)


def under_systemd(environ: dict[str, str] | os._Environ | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def journal_socket_path() -> str:
    # Overridable so that a daemon started by a test can talk to a fake journal.
    return os.environ.get("AUTORESEARCH_JOURNAL_SOCKET") or journal_mod.JOURNAL_SOCKET


_installed: list[logging.Handler] = []

LogFormat = Literal["json", "human"]


class HumanStream:
    """A stream that prints each JSON log line as `autoresearch tail` shows it (one rendering of
    an event for a person), coloured only on a terminal without NO_COLOR."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._color = hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ

    def write(self, text: str) -> int:
        from .tail import render  # tail reads our LOG_NAME: import here, not at the top

        for line in text.splitlines(keepends=True):
            self._stream.write(render(line, as_json=False, color=self._color)
                               + ("\n" if line.endswith("\n") else ""))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def configure(
    state_dir: Path | None,
    *,
    stream: IO[str] | None = None,
    journal: Literal["auto", "on", "off"] = "auto",
    level: str = "info",
    redact: Redactor | None = None,
    fmt: LogFormat = "json",
    journal_socket: str | None = None,
    max_bytes: int = 10_000_000,
    backups: int = 5,
) -> dict[str, object]:
    """Configure structlog + stdlib logging; call again to reconfigure.

    ``state_dir``: where daemon.log goes (None: no file, e.g. for short CLI
    commands: only the daemon should write and rotate daemon.log).
    ``stream``: where lines go when not using the journal (default: stdout), as JSON or,
    with ``fmt="human"``, as `autoresearch tail` prints them (the file and the journal get JSON).
    ``journal``: "auto" = the native protocol when running under systemd
    (INVOCATION_ID/JOURNAL_STREAM set) and the socket exists; "on"; "off".
    ``redact``: applied to every rendered line, whatever the destination.
    Returns what was set up: ``{"file": path|None, "journal": bool}``.
    """
    if level.lower() not in _LEVELS:
        raise ConfigError(f"unknown log level {level!r} (use one of: {', '.join(_LEVELS)})")
    if journal not in ("auto", "on", "off"):
        raise ConfigError(f"journal must be auto, on or off, not {journal!r}")
    if fmt not in ("json", "human"):
        raise ConfigError(f"log format must be json or human, not {fmt!r}")
    stream = sys.stdout if stream is None else stream
    if fmt == "human":
        stream = HumanStream(stream)
    formatter = JsonFormatter(redact or _identity)

    handlers: list[logging.Handler] = []
    log_path = None
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        log_path = state_dir / LOG_NAME
        handlers.append(LogFileHandler(log_path, maxBytes=max_bytes, backupCount=backups,
                                       encoding="utf-8"))

    sock_path = journal_socket or journal_socket_path()
    use_journal = journal == "on" or (
        journal == "auto" and under_systemd() and journal_mod.socket_exists(sock_path))
    if use_journal:
        handlers.append(JournalHandler(journal_mod.JournalSender(sock_path), fallback=stream))
    else:
        handlers.append(logging.StreamHandler(stream))

    close()
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
        _installed.append(handler)
    root.setLevel(_LEVELS[level.lower()])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_PRE_CHAIN,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return {"file": log_path, "journal": use_journal}


def close() -> None:
    """Remove and close the handlers installed by ``configure`` (releases daemon.log)."""
    root = logging.getLogger()
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()


def get_logger(name: str = "autoresearch", **initial: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **initial)
