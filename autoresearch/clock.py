"""UTC times as the project writes and reads them: ISO 8601 with a ``Z``.

Event times keep microseconds (``utc_iso(precision="microseconds")``): the event log's hash
chain covers their exact text, so this format must never change. Everything else shown to a
person (a retry time, a status line) is to the second.
"""

from __future__ import annotations

from datetime import datetime, timezone


def utc_iso(ts: float | None = None, precision: str = "seconds") -> str:
    """``ts`` (epoch seconds; now when None) as ``2026-11-29T13:56:51Z``.

    ``precision`` is datetime.isoformat's timespec: "seconds", "milliseconds", "microseconds"...
    """
    dt = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return dt.isoformat(timespec=precision).replace("+00:00", "Z")


def utc_stamp(ts: float | None = None) -> str:
    """``20261129T135651Z``: a UTC time for a file name (no colons)."""
    dt = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y%m%dT%H%M%SZ")


def parse_utc(text: str) -> float:
    """Epoch seconds of an ISO 8601 time (``Z`` or an offset; none means UTC).

    Raises ValueError for text that is not such a time.
    """
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
