"""autoresearch.clock: the one place UTC times are written and read."""

import re
import time
from datetime import datetime, timezone

import pytest

from autoresearch.clock import parse_utc, utc_iso, utc_stamp


def test_event_times_keep_todays_exact_format():
    # The event log's hash chain covers the time text: microseconds and a Z, byte for byte.
    assert utc_iso(1764424611.000123, "microseconds") == "2025-11-29T13:56:51.000123Z"
    assert utc_iso(1764424611.0, "microseconds") == "2025-11-29T13:56:51.000000Z"
    now = utc_iso(precision="microseconds")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", now)
    assert abs(parse_utc(now) - time.time()) < 5


def test_seconds_and_file_stamps():
    assert utc_iso(1764424611.9) == "2025-11-29T13:56:51Z"
    assert utc_stamp(1764424611.9) == "20251129T135651Z"
    assert re.fullmatch(r"\d{8}T\d{6}Z", utc_stamp())


def test_parse_round_trips_and_reads_offsets():
    for ts in (0.0, 1764424611.0, 1764424611.25):
        assert parse_utc(utc_iso(ts, "microseconds")) == ts
    assert parse_utc("2025-11-29T14:56:51+01:00") == 1764424611.0
    # No offset is UTC, never the machine's local time.
    assert parse_utc("2025-11-29T13:56:51") == 1764424611.0
    assert parse_utc("2025-11-29T13:56:51Z") == datetime(2025, 11, 29, 13, 56, 51,
                                                         tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("bad", ["", "yesterday", "2025-13-01T00:00:00Z", "12:00"])
def test_parse_refuses_what_is_not_a_time(bad):
    with pytest.raises(ValueError):
        parse_utc(bad)
