"""The event log: an append-only, hash-chained SQLite table (via sqlite-utils).

The log is the truth (DESIGN.md, principle 1). Every transition is appended
and committed with `synchronous=FULL` before anything acts on it. Each row
carries a SHA-256 over its own content and the previous row's hash, so any
edit, deletion or reordering is detectable by `verify()`, which names the
first bad event. State is never stored: it is `fold(events)` (see state.py).

Damage that `repair` could not undo is recorded in the `damage` table: an event
whose own hash fails is *quarantined* (its raw columns kept there), an event
that could not be read at all is *lost*. `verify` accepts a sequence gap only
where `damage` accounts for it, and shows every damage record. The log's head
is also anchored outside SQLite (git, see workspace.py): `verify` checks the
log against those anchors, so a log cut short or restored from an old copy is
never "ok".
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
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import msgspec
import sqlite_utils

from .clock import parse_utc, utc_iso, utc_stamp
from .errors import CorruptLogError, NewerLogError, SystemRefusedError, WorkspaceError
from .state import State, fold  # noqa: F401  (re-exported: the fold belongs to the log's API)

# The log's format version. Kept in the `meta` table (key `schema_version`), not in PRAGMA
# user_version: every log ever written has that row, and every release so far refuses a value
# it does not know, so an older autoresearch refuses a newer log instead of misreading it
# (user_version is 0 in old logs and no older release reads it).
#   1: the first format.
#   2: the same tables and the same event columns; events may carry `slot` and `device`
#      (launch), `parent` / `parents` (start, proposed), `kind = "merge"` (start), and several
#      experiments may be in flight at once. A version-1 log is a valid version-2 log: opening
#      one for writing only changes the meta row (no event is rewritten: the hash chain stays).
SCHEMA_VERSION = 2
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
class Damage:
    """One record of the `damage` table: what `repair` could not keep."""
    first: int
    last: int
    kind: str  # "quarantined" (raw columns kept in `raw`) | "lost" (unreadable)
    reason: str
    time: str
    raw: str = ""

    def __str__(self) -> str:
        span = f"event {self.first}" if self.first == self.last else f"events {self.first}-{self.last}"
        return f"{span} {self.kind} by repair at {self.time}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    count: int  # events checked (valid prefix length when not ok)
    first_bad_seq: int | None = None
    problem: str = ""
    damage: tuple[Damage, ...] = ()  # recorded by earlier repairs: not a failure, always shown
    last_seq: int = 0
    corrupt: bool = True  # when not ok: a proven bad or missing event (what `repair` is for)

    def __str__(self) -> str:
        if self.ok:
            if not self.damage:
                return f"ok: {self.count} events, sequence gap-free, hash chain intact"
            lost = sum(d.last - d.first + 1 for d in self.damage)
            return (f"ok: {self.count} events, hash chain intact, sequence gap-free but for "
                    f"{lost} event{'s' if lost > 1 else ''} recorded as damaged by repair (below)")
        if self.first_bad_seq is None:
            return self.problem
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



def schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version stored in a log's meta table; refuses one newer than this code knows
    (NewerLogError) and one that is missing or not a version at all (CorruptLogError)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    found = row[0] if row else None
    if not (isinstance(found, str) and found.isdigit() and int(found) >= 1):
        raise CorruptLogError(f"{path}: event log schema version {found or 'none'}, "
                              f"this autoresearch reads versions 1 to {SCHEMA_VERSION}")
    if int(found) > SCHEMA_VERSION:
        raise NewerLogError(f"{path}: written by a newer autoresearch (schema {found}); upgrade autoresearch")
    return int(found)


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
        # Numbers recorded as lost by repair are never reused: the next event comes after them.
        self._last_seq = max(self._last_seq, max((d.last for d in self.damage()), default=0))

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> "EventLog":
        """Open for appending (the daemon, repair). Readers use `open_reader`."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise no_log_error(path)
            cls._create_file(path)
        try:
            db = sqlite_utils.Database(str(path))
        except sqlite3.DatabaseError as exc:
            raise open_error(path, exc) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            if cls._check_schema(db, path) < SCHEMA_VERSION:
                cls._upgrade(db)
            return cls(path, db)
        except sqlite3.DatabaseError as exc:
            db.conn.close()
            raise open_error(path, exc) from None
        except BaseException:
            db.conn.close()  # refused (a newer or foreign log): leave it as it was, -wal and all
            raise

    @classmethod
    def open_reader(cls, path: Path) -> "EventLog":
        """Open read-only: never creates, never writes, never asks for more than read access.

        SQLite's `mode=ro` still needs to create or write the `-shm` (and open the `-wal`) of a
        WAL database. Where it cannot (a read-only mount, another user's workspace) and no
        daemon is writing (no `-wal` with content), `immutable=1` reads the main file alone,
        which then holds every event (the daemon checkpoints when it stops).
        """
        path = Path(path)
        if not path.exists():
            raise no_log_error(path)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
            except sqlite3.DatabaseError:
                conn.close()
                raise
        except sqlite3.DatabaseError as exc:
            if not (_access_denied(exc) and _quiescent(path)):
                raise open_error(path, exc) from None
            try:
                conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
            except sqlite3.DatabaseError as exc2:
                raise open_error(path, exc2) from None
        db = sqlite_utils.Database(conn)
        try:
            cls._check_schema(db, path)
            return cls(path, db)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise open_error(path, exc) from None
        except BaseException:
            conn.close()
            raise

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
                {"key": "created", "value": utc_iso(precision="microseconds")},
                {"key": "app", "value": "autoresearch"},
            ])
            db["events"].create(
                {"seq": int, "time": str, "aggregate": str, "trigger": str, "source": str,
                 "dest": str, "payload": str, "prev_hash": str, "hash": str},
                pk="seq", not_null=set(COLUMNS),
            )
            db["events"].create_index(["aggregate", "seq"])

    @staticmethod
    def _check_schema(db: sqlite_utils.Database, path: Path) -> int:
        """The log's schema version, once it is one this code reads (any up to SCHEMA_VERSION)."""
        tables = db.table_names()
        if "meta" not in tables or "events" not in tables:
            raise CorruptLogError(f"{path}: not an autoresearch event log (no meta/events table)")
        version = schema_version(db.conn, path)
        missing = set(COLUMNS) - set(db["events"].columns_dict)
        if missing:
            raise CorruptLogError(f"{path}: events table lacks columns {sorted(missing)}")
        return version

    @staticmethod
    def _upgrade(db: sqlite_utils.Database) -> None:
        """Mark an older log as SCHEMA_VERSION (only writers do: readers never write). Each
        version so far is a superset of the one before, so the events stay as they are."""
        with db.conn:
            found = db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            db.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            db.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            [f"upgraded_from_{found}", utc_iso()])

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
        seq, time = self._last_seq + 1, utc_iso(precision="microseconds")
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

    def checkpoint(self) -> bool:
        """Copy the WAL into the main database file and empty it (TRUNCATE).

        Called at every experiment's outcome and at stop, so that losing the `-wal` file
        loses at most the experiment in flight. Returns False when a reader kept part of
        the WAL from being copied (the next checkpoint copies it).

        When the `-wal` was deleted while we hold it open, SQLite keeps writing the
        unlinked file and every reader fails on the mismatch: after this checkpoint the
        main file holds everything, so reconnecting starts a fresh, visible `-wal`.
        """
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if _wal_unlinked(self.path):
            self.db.conn.close()
            self.db = sqlite_utils.Database(str(self.path))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
        return busy == 0

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

    def damage(self) -> list[Damage]:
        if "damage" not in self.db.table_names():
            return []
        return [Damage(*row) for row in self.db.execute(
            "SELECT first, last, kind, reason, time, raw FROM damage ORDER BY first")]

    def verify(self, anchors: list[tuple[int, str]] = ()) -> VerifyReport:
        return verify_rows(self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM events ORDER BY seq"),
                           self.damage(), anchors)


def _row_problem(row: tuple) -> str:
    """What is wrong with one raw row on its own (types, format, its own hash), or ''."""
    seq, time, aggregate, trigger, source, dest, payload, prev, digest = row
    if not isinstance(seq, int):
        return f"column seq is {type(seq).__name__}, expected integer"
    for name, value in zip(COLUMNS[1:], row[1:]):
        if not isinstance(value, str):
            return f"column {name} is {type(value).__name__}, expected text"
    if not AGGREGATE_RE.match(aggregate):
        return f"bad aggregate {aggregate!r}"
    try:
        parse_utc(time)
    except ValueError:
        return f"bad time {time!r}"
    try:
        parsed = json.loads(payload)
    except ValueError:
        return "payload is not valid JSON"
    if not isinstance(parsed, dict):
        return "payload is not a JSON object"
    if event_hash(seq, time, aggregate, trigger, source, dest, payload, prev) != digest:
        return "hash mismatch: the event was modified after it was written"
    return ""


def _check_row(row: tuple, expected_seq: int, prev_hash: str | None) -> str:
    """Return what is wrong with one raw row in its place in the chain, or '' when it is good.
    `prev_hash` None: the previous event is recorded as damaged, so the link cannot be checked."""
    if row[0] != expected_seq:
        return f"sequence gap: expected seq {expected_seq}, found {row[0]}"
    problem = _row_problem(row)
    if problem.startswith("hash mismatch") and prev_hash is not None and row[7] != prev_hash:
        problem = ""  # name the broken link below: it is the more precise finding
    if problem:
        return problem
    if prev_hash is not None and row[7] != prev_hash:
        return "hash chain broken: prev_hash does not match the previous event"
    return ""


def verify_rows(rows, damage: list[Damage] = (), anchors: list[tuple[int, str]] = ()) -> VerifyReport:
    """Check the chain (accepting gaps only where `damage` accounts for them), then the anchors.

    `anchors`: (seq, hash) of the log's head as recorded outside the database at each
    experiment's outcome; the log must reach every anchor and agree with it.
    """
    damage = tuple(damage)
    covered: dict[int, Damage] = {}
    for d in damage:
        for s in range(d.first, d.last + 1):
            covered[s] = d
    count, prev_hash, expected = 0, GENESIS_HASH, 1
    hashes: dict[int, str] = {}
    try:
        for row in rows:
            while expected in covered and row[0] != expected:
                expected, prev_hash = expected + 1, None  # recorded damage: skip, unlinked
            problem = _check_row(row, expected, prev_hash)
            if problem:
                bad = expected if "gap" in problem else row[0]
                return VerifyReport(False, count, bad, problem, damage, bad - 1)
            hashes[row[0]] = row[8]
            count, prev_hash, expected = count + 1, row[8], expected + 1
    except sqlite3.DatabaseError as exc:
        return VerifyReport(False, count, expected, f"database error while reading: {exc}", damage,
                            expected - 1)
    last = expected - 1
    while last + 1 in covered:
        last += 1
    for seq, digest in sorted(anchors, reverse=True):
        if seq > last:
            return VerifyReport(
                False, count, None,
                f"log ends at event {last}, its anchor in git says {seq}: "
                f"{_span(last + 1, seq)} {'is' if seq == last + 1 else 'are'} gone", damage, last)
        if seq in hashes and hashes[seq] != digest:
            return VerifyReport(
                False, count, seq,
                f"differs from its anchor in git (hash {hashes[seq][:12]}, anchored {digest[:12]}): "
                "this log is not the one the daemon wrote (restored from another copy?)", damage, last,
                corrupt=False)
        break  # the newest anchor is reached and agrees: the older ones are behind it
    return VerifyReport(True, count, damage=damage, last_seq=last)


def _span(first: int, last: int) -> str:
    return f"event {first}" if first == last else f"events {first}-{last}"


# ---------------------------------------------------------------------- errors when opening

_ACCESS_CODES = {"SQLITE_READONLY", "SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_RECOVERY",
                 "SQLITE_READONLY_CANTINIT", "SQLITE_READONLY_CANTLOCK", "SQLITE_CANTOPEN",
                 "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CANTOPEN_ISDIR"}


def _access_denied(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") in _ACCESS_CODES


def _quiescent(path: Path) -> bool:
    """No writer can be mid-way: no `-wal` with content (the daemon empties it when it stops)."""
    try:
        return os.stat(str(path) + "-wal").st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _wal_unlinked(path: Path) -> bool:
    """Whether this process holds `path`'s -wal open although it was deleted (Linux /proc)."""
    target = f"{path}-wal (deleted)"
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _cannot(path: Path, verb: str = "read") -> str:
    """Why this process may not read/write `path`'s directory: a read-only mount or permissions."""
    folder = path.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except OSError:
        pass
    return f"permission denied for user {os.getuid()} (owner of {folder}: uid {folder.stat().st_uid})"


def open_error(path: Path, exc: sqlite3.DatabaseError) -> Exception:
    """The one-line error for a log SQLite could not open or read, naming its cause.

    Only a database SQLite itself proves damaged is called corrupt (and sent to `verify`);
    permissions, a read-only mount, a deleted `-wal` or an I/O error are named as such.
    """
    name = getattr(exc, "sqlite_errorname", "") or ""
    wal = Path(f"{path}-wal")
    if _access_denied(exc):
        return SystemRefusedError(f"{path}: cannot open the event log: {_cannot(path)} "
                           f"(SQLite: {exc}); the log itself was not checked")
    if name.startswith("SQLITE_IOERR"):
        shm = Path(f"{path}-shm")
        if shm.exists() and (not wal.exists() or wal.stat().st_size == 0):
            return SystemRefusedError(
                f"{path}: cannot read the event log: its write-ahead file {wal.name} is missing "
                "(deleted while the daemon was writing it); the daemon still holds it and writes "
                "it back into the log at the next experiment's outcome or when it stops")
        return SystemRefusedError(f"{path}: cannot read the event log: I/O error ({exc})")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return SystemRefusedError(f"{path}: the event log is locked by another process ({exc}); try again")
    return CorruptLogError(f"{path}: unreadable event log ({exc}); run `autoresearch verify`")


# ---------------------------------------------------------------------- whole-file checks

def verify_path(path: Path, anchors: list[tuple[int, str]] = ()) -> VerifyReport:
    """Verify a log file, including one too damaged to open as an EventLog.

    Raises SystemRefusedError when the file cannot be read for a reason that is not damage
    (permissions, a read-only mount without a clean shutdown, a deleted `-wal`).
    """
    path = Path(path)
    if not path.exists():
        raise no_log_error(path)
    try:
        log = EventLog.open_reader(path)
    except CorruptLogError as exc:
        problem = str(exc).split(": ", 1)[-1]
        return VerifyReport(False, 0, None, problem, corrupt="schema version" not in problem)
    try:
        quick = log.db.execute("PRAGMA quick_check").fetchone()[0]
        report = log.verify(anchors)
        if quick != "ok" and report.ok:  # rows read fine but pages are damaged: name the end
            return VerifyReport(False, report.count, report.last_seq + 1, f"sqlite quick_check: {quick}",
                                report.damage, report.last_seq)
        return report
    except sqlite3.DatabaseError as exc:
        if _access_denied(exc) or getattr(exc, "sqlite_errorname", "").startswith("SQLITE_IOERR"):
            raise open_error(path, exc) from None
        return VerifyReport(False, 0, None, f"database error: {exc}")
    finally:
        log.close()


# ---------------------------------------------------------------------- repair

@dataclass(frozen=True)
class RepairReport:
    backup: Path | None  # None: there was no file to back up
    kept: int
    quarantined: list[int]
    lost: list[tuple[int, int]]  # (first, last) ranges no byte of which could be read
    total: int  # events the log should hold: the highest number the file or an anchor knows
    earlier: int = 0  # numbers an earlier repair already recorded as damaged

    def __str__(self) -> str:
        parts = [f"kept {self.kept} of {self.total} events"]
        parts.append(f"quarantined {len(self.quarantined)}"
                     + (f" ({', '.join(map(str, self.quarantined[:10]))}"
                        f"{' ...' if len(self.quarantined) > 10 else ''}; raw bytes kept, "
                        "shown by `autoresearch verify`)" if self.quarantined else ""))
        lost = sum(b - a + 1 for a, b in self.lost)
        parts.append(f"lost {lost}" + (f" ({', '.join(_span(a, b) for a, b in self.lost)})" if lost else ""))
        if self.earlier:
            parts.append(f"{self.earlier} recorded as damaged by an earlier repair")
        saved = f"backed up to {self.backup}" if self.backup else "no log file to back up"
        return f"{saved}; " + ", ".join(parts)


def _try(conn, sql: str, args=()):
    try:
        return conn.execute(sql, args).fetchone()
    except sqlite3.DatabaseError:
        return None


def _read_rows(path: Path, upper_hint: int) -> tuple[dict[int, tuple], int, list[Damage]]:
    """Every row SQLite can still read, by seq; the highest seq the file shows; earlier damage.

    A scan stops at the first damaged page; past it, rows are looked up one seq at a
    time (a lookup only touches the pages on its own path), up to the highest seq the
    table, its index or the anchors know.
    """
    rows: dict[int, tuple] = {}
    damage: list[Damage] = []
    try:
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    except sqlite3.DatabaseError:
        return rows, 0, damage
    conn.text_factory = bytes  # a flipped byte may leave text that is not UTF-8: decoded per row below
    select = f"SELECT {', '.join(COLUMNS)} FROM events"
    try:
        try:
            for row in conn.execute(f"{select} ORDER BY seq"):
                rows[row[0]] = row
        except sqlite3.DatabaseError:
            pass
        highest = max(rows, default=0)
        for sql in ("SELECT max(seq) FROM events", "SELECT max(seq) FROM events INDEXED BY "
                    "idx_events_aggregate_seq"):
            found = _try(conn, sql)
            if found and isinstance(found[0], int):
                highest = max(highest, found[0])
        upper = max(highest, upper_hint)
        for seq in range(max(rows, default=0) + 1, upper + 1):
            row = _try(conn, f"{select} WHERE seq = ?", (seq,))
            if row is not None:
                rows[seq] = row
        for seq in range(1, max(rows, default=0)):
            if seq not in rows:  # a hole behind the scan's end (the scan stopped at damage)
                row = _try(conn, f"{select} WHERE seq = ?", (seq,))
                if row is not None:
                    rows[seq] = row
        try:
            damage = [Damage(*_decoded(r)[0]) for r in conn.execute(
                "SELECT first, last, kind, reason, time, raw FROM damage ORDER BY first")]
        except sqlite3.DatabaseError:
            pass
    finally:
        conn.close()
    return rows, highest, damage


def _decoded(row: tuple) -> tuple[tuple, str]:
    """The row with its text columns decoded, and what could not be decoded ('' when all)."""
    out, problem = [], ""
    for name, value in zip(COLUMNS, row):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                problem = problem or f"column {name} is not valid UTF-8"
        out.append(value)
    return tuple(out), problem


def repair(path: Path, anchors: list[tuple[int, str]] = ()) -> RepairReport:
    """Back up the log, then rebuild it from every event that proves itself.

    An event whose own hash verifies is kept, in its place, with its number; one that
    does not is quarantined (its raw columns kept in the `damage` table); numbers no row
    can be read for are recorded as lost, up to the highest number the file or an
    anchor knows, so that they are never reused. The rebuilt log is written beside the
    original and renamed over it: a crash during repair leaves the old file or the new
    one, never half of each (and the backup either way).
    """
    path = Path(path)
    if not path.exists() and not anchors:
        raise no_log_error(path)
    _refuse_newer(path)  # rebuilt by this code, it would silently become an older format
    stamp = utc_stamp()
    # A log deleted outright, but anchored: a new log that records every anchored number as lost.
    backup = path.with_name(f"{path.name}.bak-{stamp}") if path.exists() else None
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if backup is not None and src.exists():
            shutil.copy2(src, str(backup) + suffix)
    # Read a scratch copy, never the original in place nor the backup: its WAL is folded
    # into it first (the rows are then read with immutable=1, which ignores any WAL).
    scratch = path.with_name(path.name + ".read")
    try:
        for suffix in ("", "-wal"):
            src = Path(str(path) + suffix)
            if src.exists():
                shutil.copyfile(src, str(scratch) + suffix)
        _fold_wal(scratch)
        _pad_to_header_size(scratch)
        rows, highest, damage = _read_rows(scratch, max((s for s, _ in anchors), default=0))
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(scratch) + suffix).unlink(missing_ok=True)
    now = utc_iso(precision="microseconds")
    known = {s for d in damage for s in range(d.first, d.last + 1)}
    kept, quarantined, lost_seqs, earlier = [], [], [], 0
    upper = max(highest, max(rows, default=0), max((s for s, _ in anchors), default=0),
                max(known, default=0))
    for seq in range(1, upper + 1):
        if seq in known and seq not in rows:
            earlier += 1  # recorded by an earlier repair
            continue
        row = rows.get(seq)
        if row is None:
            lost_seqs.append(seq)
            continue
        row, problem = _decoded(row)
        problem = problem or _row_problem(row)
        if problem:
            quarantined.append(seq)
            raw = json.dumps([v if isinstance(v, (int, str)) or v is None else repr(v) for v in row])
            damage.append(Damage(seq, seq, "quarantined", problem, now, raw))
        else:
            kept.append(row)
    lost = _ranges(lost_seqs)
    damage += [Damage(a, b, "lost", "no readable row (cut short, deleted, or on a damaged page)", now) for a, b in lost]
    fresh = path.with_name(path.name + ".repair")
    for suffix in ("", "-wal", "-shm"):
        Path(str(fresh) + suffix).unlink(missing_ok=True)
    log = EventLog.open(fresh, create=True)
    with log.db.conn:
        log.db.conn.executemany(INSERT_SQL, kept)
        _write_damage(log.db.conn, damage)
    log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.close()
    # The old WAL must not be replayed into the new file: remove it first (it is backed up).
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
        Path(str(fresh) + suffix).unlink(missing_ok=True)
    os.replace(fresh, path)
    return RepairReport(backup, len(kept), quarantined, lost, upper, earlier)


def _refuse_newer(path: Path) -> None:
    """NewerLogError when `path` says a newer autoresearch wrote it; anything else (no file, a
    damaged one, no readable version) is repair's to handle."""
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    except sqlite3.DatabaseError:
        return
    try:
        schema_version(conn, path)
    except (CorruptLogError, sqlite3.DatabaseError):
        pass
    finally:
        conn.close()


def _fold_wal(copy: Path) -> None:
    """Fold a copied WAL into its copied database file (best effort: it may be damaged too)."""
    if not Path(f"{copy}-wal").exists():
        return
    try:
        conn = sqlite3.connect(str(copy))
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        pass


def _pad_to_header_size(path: Path) -> None:
    """A file cut short (a torn copy, a full disk) makes SQLite refuse every read; with the
    missing pages back as zeros, only the rows on those pages are unreadable."""
    with open(path, "r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        size = f.seek(0, os.SEEK_END)
        if page_size and pages * page_size > size:
            f.truncate(size // page_size * page_size)
            f.truncate(pages * page_size)  # extends with zeros


def _write_damage(conn: sqlite3.Connection, damage: list[Damage]) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS damage (first INTEGER NOT NULL, last INTEGER NOT NULL, "
                 "kind TEXT NOT NULL, reason TEXT NOT NULL, time TEXT NOT NULL, raw TEXT NOT NULL)")
    conn.executemany("INSERT INTO damage VALUES (?, ?, ?, ?, ?, ?)",
                     [(d.first, d.last, d.kind, d.reason, d.time, d.raw) for d in damage])


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
