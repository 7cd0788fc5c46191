"""The event log: an append-only, hash-chained SQLite table (via sqlite-utils).

The log is the truth (DESIGN.md, principle 1). Every transition is appended
and committed with `synchronous=FULL` before anything acts on it. Each row
carries a SHA-256 over its own content and the previous row's hash, so any
edit, deletion or reordering is detectable by `verify()`, which names the
first bad event. State is never stored: it is `fold(events)` (see state.py).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import msgspec
import sqlite_utils

from .errors import CorruptLogError, WorkspaceError
from .state import State, fold  # noqa: F401  (re-exported: the fold belongs to the log's API)

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
AGGREGATE_RE = re.compile(r"^(daemon|experiment:\d+)$")
COLUMNS = ("seq", "time", "aggregate", "trigger", "source", "dest", "payload", "prev_hash", "hash")
INSERT_SQL = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Event(NamedTuple):
    """One event as read back. A named tuple: replay makes one per event, and a tuple is
    built several times faster than a frozen dataclass."""

    seq: int
    time: str  # UTC, ISO 8601 with microseconds
    aggregate: str  # "daemon" or "experiment:N"
    trigger: str
    source: str
    dest: str
    payload: dict[str, Any]
    hash: str

    @property
    def experiment(self) -> int | None:
        aggregate = self.aggregate
        return int(aggregate[11:]) if aggregate.startswith("experiment:") else None


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    count: int  # events checked (valid prefix length when not ok)
    first_bad_seq: int | None = None
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.count} events, sequence gap-free, hash chain intact"
        return f"event {self.first_bad_seq}: {self.problem} ({self.count} valid events before it)"


def canonical_payload(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def event_hash(seq: int, time: str, aggregate: str, trigger: str, source: str, dest: str,
               payload_text: str, prev_hash: str) -> str:
    material = json.dumps([seq, time, aggregate, trigger, source, dest, payload_text, prev_hash],
                          separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


_decode = msgspec.json.Decoder().decode


def decode_payload(text: str) -> dict[str, Any]:
    """`json.loads` of a stored payload, about twice as fast (msgspec: same values, big
    integers and floats exact). The one thing json.dumps writes that msgspec refuses, a lone
    surrogate escape (e.g. from undecodable run output), goes to json itself."""
    try:
        return _decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")



def no_log_error(path: Path) -> WorkspaceError:
    """A missing log is a usage problem (wrong directory, or the daemon never ran), not damage."""
    return WorkspaceError(f"{path}: no event log (the daemon has not run in this workspace yet)")

class EventLog:
    """Append-only store. Only the daemon appends; readers may open it concurrently (WAL)."""

    def __init__(self, path: Path, db: sqlite_utils.Database):
        self.path = Path(path)
        self.db = db
        row = db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        self._last_seq, self._last_hash = (row[0], row[1]) if row else (0, GENESIS_HASH)

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> "EventLog":
        path = Path(path)
        if not path.exists():
            if not create:
                raise no_log_error(path)
            cls._create_file(path)
        try:
            db = sqlite_utils.Database(str(path))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            cls._check_schema(db, path)
            return cls(path, db)
        except sqlite3.DatabaseError as exc:
            raise CorruptLogError(
                f"{path}: unreadable event log ({exc}); run `autoresearch verify` then `autoresearch repair`"
            ) from None

    @classmethod
    def _create_file(cls, path: Path) -> None:
        """Build a new, empty log beside `path` and rename it into place, so that a
        reader never sees a database file without its tables."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        tmp.unlink(missing_ok=True)
        db = sqlite_utils.Database(str(tmp))
        db.execute("PRAGMA journal_mode=WAL")
        cls._create_schema(db)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.conn.close()
        for suffix in ("-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        os.replace(tmp, path)

    @staticmethod
    def _create_schema(db: sqlite_utils.Database) -> None:
        with db.conn:
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["meta"].insert_all([
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "created", "value": utc_now()},
                {"key": "app", "value": "autoresearch"},
            ])
            db["events"].create(
                {"seq": int, "time": str, "aggregate": str, "trigger": str, "source": str,
                 "dest": str, "payload": str, "prev_hash": str, "hash": str},
                pk="seq", not_null=set(COLUMNS),
            )
            db["events"].create_index(["aggregate", "seq"])

    @staticmethod
    def _check_schema(db: sqlite_utils.Database, path: Path) -> None:
        tables = db.table_names()
        if "meta" not in tables or "events" not in tables:
            raise CorruptLogError(f"{path}: not an autoresearch event log (no meta/events table)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = row[0] if row else "none"
            raise CorruptLogError(
                f"{path}: event log schema version {found}, this autoresearch reads version {SCHEMA_VERSION}"
            )
        missing = set(COLUMNS) - set(db["events"].columns_dict)
        if missing:
            raise CorruptLogError(f"{path}: events table lacks columns {sorted(missing)}")

    def close(self) -> None:
        self.db.conn.close()

    # -- writing -----------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def append(self, aggregate: str, trigger: str, source: str, dest: str,
               payload: dict[str, Any] | None = None) -> Event:
        """Append one event; returns only after the transaction is committed (and synced)."""
        if not AGGREGATE_RE.match(aggregate):
            raise ValueError(f"bad aggregate {aggregate!r}")
        payload = payload or {}
        text = canonical_payload(payload)
        seq, time = self._last_seq + 1, utc_now()
        digest = event_hash(seq, time, aggregate, trigger, source, dest, text, self._last_hash)
        row = (seq, time, aggregate, trigger, source, dest, text, self._last_hash, digest)
        # One transaction per event: COMMIT with synchronous=FULL fsyncs the WAL.
        # A failure (disk full, I/O error) rolls back whole: no partial event.
        # The hot path is one prepared INSERT on sqlite-utils' connection: its
        # table.insert() issues about six statements per row (introspection),
        # which halves the durable append rate.
        with self.db.conn:
            self.db.conn.execute(INSERT_SQL, row)
        self._last_seq, self._last_hash = seq, digest
        return Event(seq, time, aggregate, trigger, source, dest, json.loads(text), digest)

    # -- reading -----------------------------------------------------------------

    def events(self, since: int = 0) -> Iterator[Event]:
        cursor = self.db.execute(
            "SELECT seq, time, aggregate, trigger, source, dest, payload, hash FROM events "
            "WHERE seq > ? ORDER BY seq", [since])
        for seq, time, aggregate, trigger, source, dest, payload, digest in cursor:
            yield Event(seq, time, aggregate, trigger, source, dest, decode_payload(payload), digest)

    def state(self) -> State:
        # Replay builds a large heap without cycles in one go: the cyclic garbage collector
        # would walk it again and again for nothing (a third of the time at 100,000 events).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fold(self.events())
        finally:
            if enabled:
                gc.enable()

    # -- checking ------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        return verify_rows(self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM events ORDER BY seq"))


def _check_row(row: tuple, expected_seq: int, prev_hash: str) -> str:
    """Return what is wrong with one raw row, or '' when it is good."""
    seq, time, aggregate, trigger, source, dest, payload, prev, digest = row
    if seq != expected_seq:
        return f"sequence gap: expected seq {expected_seq}, found {seq}"
    for name, value in zip(COLUMNS[1:], row[1:]):
        if not isinstance(value, str):
            return f"column {name} is {type(value).__name__}, expected text"
    if not AGGREGATE_RE.match(aggregate):
        return f"bad aggregate {aggregate!r}"
    try:
        datetime.fromisoformat(time.replace("Z", "+00:00"))
    except ValueError:
        return f"bad time {time!r}"
    try:
        parsed = json.loads(payload)
    except ValueError:
        return "payload is not valid JSON"
    if not isinstance(parsed, dict):
        return "payload is not a JSON object"
    if prev != prev_hash:
        return "hash chain broken: prev_hash does not match the previous event"
    if event_hash(seq, time, aggregate, trigger, source, dest, payload, prev) != digest:
        return "hash mismatch: the event was modified after it was written"
    return ""


def verify_rows(rows) -> VerifyReport:
    count, prev_hash, expected = 0, GENESIS_HASH, 1
    try:
        for row in rows:
            problem = _check_row(row, expected, prev_hash)
            if problem:
                return VerifyReport(False, count, expected if "gap" in problem else row[0], problem)
            count, prev_hash, expected = count + 1, row[8], expected + 1
    except sqlite3.DatabaseError as exc:
        return VerifyReport(False, count, expected, f"database error while reading: {exc}")
    return VerifyReport(True, count)


def verify_path(path: Path) -> VerifyReport:
    """Verify a log file, including one too damaged to open as an EventLog."""
    path = Path(path)
    if not path.exists():
        raise no_log_error(path)
    try:
        log = EventLog.open(path, create=False)
    except CorruptLogError as exc:
        return VerifyReport(False, 0, 1, str(exc).split(": ", 1)[-1])
    try:
        quick = log.db.execute("PRAGMA quick_check").fetchone()[0]
        report = log.verify()
        if quick != "ok" and report.ok:  # rows read fine but pages are damaged: name the end
            return VerifyReport(False, report.count, report.count + 1, f"sqlite quick_check: {quick}")
        return report
    except sqlite3.DatabaseError as exc:
        return VerifyReport(False, 0, 1, f"database error: {exc}")
    finally:
        log.close()


def _salvage_rows(path: Path) -> list[tuple]:
    """Read rows in seq order until the first unreadable or invalid one."""
    rows: list[tuple] = []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM events ORDER BY seq")
            prev, expected = GENESIS_HASH, 1
            for row in cursor:
                if _check_row(row, expected, prev):
                    break
                rows.append(row)
                prev, expected = row[8], expected + 1
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        pass  # keep what was read before the damage
    return rows


def _count_rows(path: Path, fallback: int) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return fallback


def repair(path: Path) -> tuple[Path, int, int]:
    """Back up the log, then rebuild it from its valid prefix.

    Returns (backup path, events kept, events dropped). The rebuilt log is
    written beside the original and renamed over it, so a crash during
    repair leaves either the old file or the new one, never half of each
    (and the backup either way).
    """
    path = Path(path)
    if not path.exists():
        raise no_log_error(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            shutil.copy2(src, str(backup) + suffix)
    rows = _salvage_rows(path)
    total = _count_rows(path, len(rows))
    fresh = path.with_name(path.name + ".repair")
    for suffix in ("", "-wal", "-shm"):
        Path(str(fresh) + suffix).unlink(missing_ok=True)
    log = EventLog.open(fresh, create=True)
    with log.db.conn:
        log.db["events"].insert_all([dict(zip(COLUMNS, r)) for r in rows])
    log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.close()
    # The old WAL must not be replayed into the new file: remove it first (it is backed up).
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
        Path(str(fresh) + suffix).unlink(missing_ok=True)
    os.replace(fresh, path)
    return backup, len(rows), max(total - len(rows), 0)
