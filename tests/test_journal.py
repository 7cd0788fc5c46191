"""journald native protocol against a fake journal: a real AF_UNIX datagram socket."""

from __future__ import annotations

import fcntl
import struct

import pytest

from autoresearch import journal
from tests.journal_fixtures import FakeJournal


@pytest.fixture
def fake_journal(tmp_path):
    j = FakeJournal(tmp_path / "journal.socket")
    yield j
    j.close()


def test_field_names_are_made_valid():
    assert journal.field_name("experiment") == "EXPERIMENT"
    assert journal.field_name("val-bpb.best") == "VAL_BPB_BEST"
    assert journal.field_name("_trusted") == "TRUSTED"
    assert journal.field_name("2nd") == "F_2ND"
    assert journal.field_name("ümlaut") == "MLAUT"
    assert journal.field_name("__") == "FIELD"
    assert len(journal.field_name("x" * 100)) == 64


def test_priorities():
    assert journal.priority("error") == 3
    assert journal.priority("warning") == 4
    assert journal.priority("debug") == 7
    assert journal.priority("whatever") == 6


def test_record_is_queryable_by_uppercased_fields(fake_journal):
    sender = journal.JournalSender(fake_journal.path)
    assert sender.available()
    sender.send("run started", priority_=6, identifier="autoresearch",
                experiment=42, state="blocked", trigger="outage", message="collides",
                skipped=None, payload={"a": [1, 2]})
    got = fake_journal.receive()
    assert not fake_journal.via_memfd
    assert got["MESSAGE"] == b"run started"
    assert got["PRIORITY"] == b"6"
    assert got["SYSLOG_IDENTIFIER"] == b"autoresearch"
    assert got["EXPERIMENT"] == b"42"
    assert got["STATE"] == b"blocked"
    assert got["TRIGGER"] == b"outage"
    assert got["AR_MESSAGE"] == b"collides"
    assert got["PAYLOAD"] == b'{"a": [1, 2]}'
    assert "SKIPPED" not in got
    sender.close()


def test_values_with_newlines_use_the_binary_encoding(fake_journal):
    sender = journal.JournalSender(fake_journal.path)
    tb = "Traceback (most recent call last):\n  File x\nValueError: y=z\n"
    sender.send("crash", exception=tb)
    got = fake_journal.receive()
    assert got["EXCEPTION"] == tb.encode()
    raw = journal.encode({"A": "1\n2"})
    assert raw == b"A\n" + struct.pack("<Q", 3) + b"1\n2\n"


def test_a_record_too_big_for_a_datagram_goes_through_a_sealed_memfd(fake_journal):
    sender = journal.JournalSender(fake_journal.path)
    big = "x" * 400_000  # over the AF_UNIX datagram limit (net.core.wmem_max, ~208 KiB)
    sender.send("big", blob=big)
    got = fake_journal.receive()
    assert fake_journal.via_memfd
    # journald refuses a memfd that could still change under it
    assert fake_journal.seals & fcntl.F_SEAL_WRITE and fake_journal.seals & fcntl.F_SEAL_SHRINK
    assert got["MESSAGE"] == b"big"
    assert got["BLOB"] == big.encode()


def test_unreachable_journal_raises_oserror(tmp_path):
    sender = journal.JournalSender(tmp_path / "nope.socket")
    assert not sender.available()
    with pytest.raises(OSError):
        sender.send("lost")
