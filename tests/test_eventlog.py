"""Event log: durable append, gap-free sequence, hash chain, schema version, verify, repair."""

import gc
import json
import sqlite3

import pytest
from hypothesis import given, settings, strategies as st

from autoresearch.errors import CorruptLogError
from autoresearch.eventlog import SCHEMA_VERSION, EventLog, canonical_payload, decode_payload, repair, verify_path


def _fill(path, n=10):
    log = EventLog.open(path)
    for i in range(n):
        log.append("experiment:%d" % (i // 3), "note" if i % 2 else "start", "a", "b", {"i": i, "text": "é✓"})
    log.close()


def _sql(path, statement, args=()):
    conn = sqlite3.connect(path)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def test_append_is_sequential_chained_and_readable(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path)
    log = EventLog.open(path)
    events = list(log.events())
    assert [e.seq for e in events] == list(range(1, 11))
    assert events[3].payload == {"i": 3, "text": "é✓"}
    assert events[4].experiment == 1 and events[4].aggregate == "experiment:1"
    assert len({e.hash for e in events}) == 10
    report = log.verify()
    assert report.ok and report.count == 10
    # The settings that make an append durable before it returns.
    assert log.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert log.append("daemon", "boot", "stopped", "starting", {}).seq == 11  # a reopened log continues
    log.close()
    assert verify_path(path).ok


# Any JSON the daemon can write: big integers, every float, any text (lone surrogates from
# undecodable run output included), nesting.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text() | st.builds(lambda a, c, b: a + chr(c) + b, st.text(max_size=3), st.integers(0xD800, 0xDFFF),
                            st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=8), _JSON, max_size=6))
def test_the_fast_payload_decoder_reads_back_exactly_what_json_would(payload):
    text = canonical_payload(payload)
    decoded = decode_payload(text)
    assert decoded == json.loads(text)
    assert canonical_payload(decoded) == text  # same types too (an int stays an int)


def test_replay_runs_no_garbage_collection(tmp_path):
    # Replay builds a large heap without cycles; the cyclic collector walking it over and over
    # was a third of replay time at 100,000 events (bench/eventlog.py).
    log = EventLog.open(tmp_path / "e.sqlite")
    log.db.execute("PRAGMA synchronous=OFF")  # a fast fill; replay is what is tested
    for i in range(3000):
        log.append(f"experiment:{i // 6}", "start" if i % 6 == 0 else "note", "a", "b",
                   {"files": {"train.py": "x = 1\n"}, "metrics": [i, i + 1]})
    started = []

    def watch(phase, info):
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        state = log.state()
    finally:
        gc.callbacks.remove(watch)
        log.close()
    assert started == [] and gc.isenabled()
    assert state.seq == 3000 and len(state.experiments) == 500


def test_append_rejects_bad_input_and_writes_nothing(tmp_path):
    log = EventLog.open(tmp_path / "e.sqlite")
    with pytest.raises(ValueError):
        log.append("exp 1", "start", "", "x", {})
    with pytest.raises(ValueError):
        log.append("daemon", "note", "a", "a", {"metric": float("nan")})
    assert log.last_seq == 0 and list(log.events()) == []


@pytest.mark.parametrize("column,value,problem", [
    ("payload", '{"i": 99}', "hash mismatch"),
    ("trigger", "keep", "hash mismatch"),
    ("payload", "{not json", "not valid JSON"),
    ("prev_hash", "f" * 64, "hash chain broken"),
    ("time", "yesterday", "bad time"),
])
def test_verify_names_the_first_bad_event(tmp_path, column, value, problem):
    path = tmp_path / "events.sqlite"
    _fill(path)
    _sql(path, f"UPDATE events SET {column} = ? WHERE seq = 6", [value])
    report = verify_path(path)
    assert not report.ok and report.first_bad_seq == 6 and report.count == 5
    assert problem in report.problem and "event 6" in str(report)


def test_verify_detects_a_gap(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path)
    _sql(path, "DELETE FROM events WHERE seq = 4")
    report = verify_path(path)
    assert not report.ok and report.first_bad_seq == 4 and "gap" in report.problem


def test_schema_version_is_checked_at_open(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 1)
    _sql(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CorruptLogError, match=f"schema version 99, this autoresearch reads version {SCHEMA_VERSION}"):
        EventLog.open(path)


def test_not_a_database(tmp_path):
    path = tmp_path / "events.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptLogError, match="unreadable event log"):
        EventLog.open(path)
    assert not verify_path(path).ok


def test_a_new_log_never_appears_without_its_tables(tmp_path):
    path = tmp_path / "events.sqlite"
    EventLog.open(path).close()
    conn = sqlite3.connect(path)
    assert {"events", "meta"} <= {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")] == []


def test_repair_backs_up_and_truncates_to_the_last_valid_event(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path)
    _sql(path, "UPDATE events SET payload = '{\"i\": 1000}' WHERE seq = 7")
    backup, kept, dropped = repair(path)
    assert (kept, dropped) == (6, 4)
    assert backup.exists() and not verify_path(backup).ok  # the damaged original is kept
    report = verify_path(path)
    assert report.ok and report.count == 6
    log = EventLog.open(path)
    assert log.append("daemon", "boot", "stopped", "starting", {}).seq == 7  # the chain continues
    log.close()
    assert verify_path(path).ok


def test_repair_of_a_truncated_file(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 300)
    log = EventLog.open(path)
    log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn copy, a failing disk
    assert not verify_path(path).ok
    backup, kept, dropped = repair(path)
    assert backup.exists() and kept < 300
    report = verify_path(path)
    assert report.ok and report.count == kept
