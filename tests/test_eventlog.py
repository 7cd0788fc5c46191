"""Event log: durable append, gap-free sequence, hash chain, schema version, verify, repair."""

import gc
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from autoresearch.errors import CorruptLogError, Exit, NewerLogError, SystemRefusedError
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


def _version(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def _files(path):
    return {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}


def test_a_new_log_has_the_current_schema_version(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 1)
    assert SCHEMA_VERSION == 2 and _version(path)["schema_version"] == "2"


def test_a_log_from_a_newer_autoresearch_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 3)
    _sql(path, "UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    before = _files(path)
    line = f"{path}: written by a newer autoresearch (schema {SCHEMA_VERSION + 1}); upgrade autoresearch"
    for opener in (EventLog.open, EventLog.open_reader, verify_path, repair):
        with pytest.raises(NewerLogError) as info:
            opener(path)
        assert str(info.value) == line and info.value.exit_code == Exit.USAGE
    after = _files(path)
    assert after["events.sqlite"] == before["events.sqlite"] and not after.get("events.sqlite-wal")
    # No backup, no rebuilt log beside it (a read-only open may leave SQLite's empty -wal / -shm).
    assert {p.name for p in tmp_path.iterdir()} <= {"events.sqlite", "events.sqlite-wal", "events.sqlite-shm"}


@pytest.mark.parametrize("value", [None, "0", "two", "-1", ""])
def test_a_missing_or_meaningless_schema_version_is_damage(tmp_path, value):
    path = tmp_path / "events.sqlite"
    _fill(path, 1)
    if value is None:
        _sql(path, "DELETE FROM meta WHERE key = 'schema_version'")
    else:
        _sql(path, "UPDATE meta SET value = ? WHERE key = 'schema_version'", [value])
    with pytest.raises(CorruptLogError, match=f"schema version {value or 'none'}, this autoresearch reads "
                                              f"versions 1 to {SCHEMA_VERSION}"):
        EventLog.open(path)
    report = verify_path(path)
    assert not report.ok and not report.corrupt  # repair would not know what to rebuild it as


def test_a_version_1_log_is_read_as_it_is_and_upgraded_by_a_writer_only(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 5)
    _sql(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")  # what every log before 2 says
    before = _files(path)["events.sqlite"]
    log = EventLog.open_reader(path)
    hashes = [e.hash for e in log.events()]
    log.close()
    assert verify_path(path).ok
    # Readers never write: not the version, nothing.
    assert _files(path)["events.sqlite"] == before and not _files(path).get("events.sqlite-wal")
    assert _version(path)["schema_version"] == "1"

    log = EventLog.open(path)  # the daemon, repair: marks it as the current version
    log.append("daemon", "boot", "stopped", "starting", {"slot": 0})
    log.close()
    meta = _version(path)
    assert meta["schema_version"] == str(SCHEMA_VERSION) and "upgraded_from_1" in meta
    log = EventLog.open_reader(path)
    events = list(log.events())
    log.close()
    assert [e.hash for e in events[:5]] == hashes and len(events) == 6  # no event rewritten
    assert verify_path(path).ok


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


def test_repair_quarantines_the_damaged_event_and_keeps_every_later_one(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 25)
    _sql(path, "UPDATE events SET payload = '{\"i\": 1000}' WHERE seq = 7")
    result = repair(path)
    assert (result.kept, result.quarantined, result.lost, result.total) == (24, [7], [], 25)
    assert "kept 24 of 25 events, quarantined 1 (7;" in str(result)
    assert result.backup.exists() and not verify_path(result.backup).ok  # the damaged original is kept
    report = verify_path(path)
    assert report.ok and report.count == 24
    [damage] = report.damage
    assert (damage.first, damage.last, damage.kind) == (7, 7, "quarantined")
    assert "hash mismatch" in damage.reason and json.loads(damage.raw)[6] == '{"i": 1000}'  # raw, kept
    log = EventLog.open(path)
    assert [e.seq for e in log.events()] == [s for s in range(1, 26) if s != 7]
    assert log.state().gaps == [(7, 7)]  # the fold copes with the hole and says where it is
    assert log.append("daemon", "boot", "stopped", "starting", {}).seq == 26  # the chain continues
    log.close()
    assert verify_path(path).ok


def test_a_gap_not_recorded_by_repair_still_fails(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 10)
    _sql(path, "UPDATE events SET payload = '{}' WHERE seq = 3")
    repair(path)
    _sql(path, "DELETE FROM events WHERE seq = 6")
    report = verify_path(path)
    assert not report.ok and report.first_bad_seq == 6 and "gap" in report.problem


def test_anchors_catch_a_log_cut_short_and_repair_records_the_loss(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 20)
    log = EventLog.open(path)
    anchors = [(e.seq, e.hash) for e in log.events() if e.seq in (12, 20)]
    log.close()
    assert verify_path(path, anchors).ok
    _sql(path, "DELETE FROM events WHERE seq > 14")  # the newest rows gone
    report = verify_path(path, anchors)
    assert not report.ok and report.corrupt
    assert "log ends at event 14, its anchor in git says 20: events 15-20 are gone" in str(report)
    result = repair(path, anchors)
    assert (result.kept, result.quarantined, result.lost, result.total) == (14, [], [(15, 20)], 20)
    assert verify_path(path, anchors).ok
    log = EventLog.open(path)
    assert log.append("daemon", "boot", "stopped", "starting", {}).seq == 21  # never reuses 15-20
    log.close()


def test_an_anchor_with_another_hash_is_not_ok(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 5)
    report = verify_path(path, [(4, "0" * 64)])
    assert not report.ok and not report.corrupt and "not the one the daemon wrote" in report.problem


def test_repair_of_a_truncated_file_reports_true_counts(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 300)
    log = EventLog.open(path)
    log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])  # the last page cut: a torn copy, a failing disk
    assert not verify_path(path).ok
    result = repair(path, [(300, "x" * 64)])  # the anchor knows how many there were
    lost = sum(b - a + 1 for a, b in result.lost)
    assert result.total == 300 and result.kept + lost + len(result.quarantined) == 300
    assert 0 < lost < 300 and result.kept > 0
    report = verify_path(path)
    assert report.ok and report.count == result.kept


def test_a_reader_on_a_log_it_cannot_write(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 3)
    log = EventLog.open_reader(path)  # no -wal/-shm needed, none created by the daemon's absence
    assert [e.seq for e in log.events()] == [1, 2, 3]
    log.close()


def test_checkpoint_puts_everything_in_the_main_file(tmp_path):
    path = tmp_path / "events.sqlite"
    log = EventLog.open(path)
    for i in range(5):
        log.append("daemon", "note", "a", "a", {"i": i})
    assert log.checkpoint()
    Path(f"{path}-wal").unlink()  # what a person's `rm` does while the daemon runs
    log.append("daemon", "note", "a", "a", {"i": 5})  # written to the deleted -wal
    with pytest.raises(SystemRefusedError, match="events.sqlite-wal is missing"):
        EventLog.open_reader(path).state()
    assert log.checkpoint()  # copies it into the main file and starts a visible -wal
    reader = EventLog.open_reader(path)
    assert reader.state().seq == 6
    reader.close()
    log.append("daemon", "note", "a", "a", {"i": 6})
    reader = EventLog.open_reader(path)
    assert reader.state().seq == 7
    reader.close()
    log.close()


def test_a_byte_that_breaks_utf8_is_quarantined_with_its_raw_bytes(tmp_path):
    path = tmp_path / "events.sqlite"
    _fill(path, 6)
    data = bytearray(path.read_bytes())
    at = data.index(b'"i":3')
    data[at + 1] = 0xFF  # no longer UTF-8
    path.write_bytes(bytes(data))
    report = verify_path(path)
    assert not report.ok and report.corrupt
    result = repair(path)
    assert result.kept == 5 and len(result.quarantined) == 1 and result.lost == []
    [damage] = verify_path(path).damage
    assert "not valid UTF-8" in damage.reason and "\\xff" in damage.raw


def test_an_experiment_whose_end_was_quarantined_is_not_in_flight(tmp_path):
    path = tmp_path / "events.sqlite"
    log = EventLog.open(path)
    for n, end in ((1, "discard"), (2, "keep")):
        agg = f"experiment:{n}"
        log.append(agg, "start", "new", "proposing", {"kind": "experiment"})
        log.append(agg, end, "judging", "discarded" if end == "discard" else "kept", {"metric": 1.0 + n})
    log.close()
    _sql(path, "UPDATE events SET payload = '{\"metric\": 9}' WHERE seq = 2")  # experiment 1's end
    repair(path)
    st = EventLog.open_reader(path).state()
    assert st.gaps == [(2, 2)] and st.experiments[1].state == "proposing"
    assert st.current() is None and st.next_n() == 3  # not taken for the experiment in flight
