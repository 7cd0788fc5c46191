"""logs.configure: JSON lines with bound context, rotation, journald fields, redaction."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap

import pytest
import structlog

from autoresearch import logs
from autoresearch.errors import ConfigError
from tests.journal_fixtures import FakeJournal


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logs.close()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_is_json_with_the_bound_context(tmp_path, monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup = logs.configure(tmp_path / "state", stream=out)
    assert setup == {"file": tmp_path / "state" / "daemon.log", "journal": False}
    log = logs.get_logger()
    structlog.contextvars.bind_contextvars(experiment=42, state="training", trigger="run_started")
    log.info("run_started", pid=1234)
    structlog.contextvars.bind_contextvars(state="judging")
    log.warning("slow", seconds=3.5)
    log.debug("hidden at info level")

    from_file = lines(tmp_path / "state" / "daemon.log")
    from_stream = [json.loads(line) for line in out.getvalue().splitlines()]
    assert from_file == from_stream
    first, second = from_file
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", first["timestamp"])
    assert first | {"timestamp": None} == {
        "timestamp": None, "level": "info", "event": "run_started", "pid": 1234,
        "experiment": 42, "state": "training", "trigger": "run_started"}
    assert second["state"] == "judging" and second["level"] == "warning"


def test_stdlib_loggers_are_json_too_and_sdk_loggers_stay_quiet(tmp_path, monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.configure(tmp_path, stream=io.StringIO(), level="debug")
    structlog.contextvars.bind_contextvars(experiment=7)
    logging.getLogger("anthropic").info("POST /v1/messages body=...")
    logging.getLogger("httpx").debug("request headers")
    logging.getLogger("autoresearch.runner").info("killed group %d", 99)
    try:
        raise ValueError("boom")
    except ValueError:
        logs.get_logger().exception("crashed")
    got = lines(tmp_path / "daemon.log")
    assert [g["event"] for g in got] == ["killed group 99", "crashed"]
    assert got[0]["experiment"] == 7
    assert "ValueError: boom" in got[1]["exception"] and got[1]["level"] == "error"


def test_redaction_applies_to_every_destination(tmp_path, monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    secret = "sk-ant-api03-abcdefghijklmnop"
    logs.configure(tmp_path, stream=out, redact=lambda s: s.replace(secret, "[REDACTED]"))
    logs.get_logger().error("auth failed", detail=f"key {secret} rejected")
    logging.getLogger("autoresearch.x").warning("header x-api-key: %s", secret)
    text = (tmp_path / "daemon.log").read_text() + out.getvalue()
    assert secret not in text
    assert text.count("[REDACTED]") == 4


def test_the_file_rotates(tmp_path):
    logs.configure(tmp_path, stream=io.StringIO(), journal="off", max_bytes=2000, backups=2)
    log = logs.get_logger()
    for i in range(100):
        log.info("tick", i=i, pad="x" * 50)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 2000
        assert all(json.loads(line)["event"] == "tick" for line in p.read_text().splitlines())
    assert lines(tmp_path / "daemon.log")[-1]["i"] == 99


def test_journal_fields_via_a_fake_journal_socket(tmp_path):
    fake = FakeJournal(tmp_path / "journal.socket")
    try:
        out = io.StringIO()
        setup = logs.configure(tmp_path / "state", stream=out, journal="on",
                               journal_socket=fake.path,
                               redact=lambda s: s.replace("hunter22", "[REDACTED]"))
        assert setup["journal"] is True
        structlog.contextvars.bind_contextvars(experiment=42, state="blocked", trigger="api_outage")
        logs.get_logger().warning("proposer unavailable", retry_in=30, reason="hunter22 503")
        got = fake.receive()
    finally:
        fake.close()
    assert got["EXPERIMENT"] == b"42"
    assert got["STATE"] == b"blocked"
    assert got["TRIGGER"] == b"api_outage"
    assert got["PRIORITY"] == b"4"
    assert got["SYSLOG_IDENTIFIER"] == b"autoresearch"
    assert got["RETRY_IN"] == b"30"
    assert got["REASON"] == b"[REDACTED] 503"
    assert got["MESSAGE"].startswith(b"proposer unavailable ")
    assert b"experiment=42" in got["MESSAGE"]
    assert out.getvalue() == ""  # journal instead of the stream, not both
    assert json.loads((tmp_path / "state" / "daemon.log").read_text())["state"] == "blocked"


def test_auto_uses_the_journal_only_under_systemd(tmp_path, monkeypatch):
    fake = FakeJournal(tmp_path / "journal.socket")
    try:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert logs.configure(None, journal_socket=fake.path)["journal"] is False
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
        assert logs.configure(None, journal_socket=fake.path)["journal"] is True
        assert logs.configure(None, journal_socket=str(tmp_path / "absent"))["journal"] is False
        monkeypatch.setenv("AUTORESEARCH_JOURNAL_SOCKET", fake.path)
        assert logs.configure(None)["journal"] is True
    finally:
        fake.close()


def test_an_unreachable_journal_falls_back_to_the_stream(tmp_path):
    out = io.StringIO()
    logs.configure(None, stream=out, journal="on", journal_socket=str(tmp_path / "gone"))
    logs.get_logger().info("still visible", n=1)
    logs.get_logger().info("again", n=2)
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [g["event"] for g in got] == ["journal_unreachable", "still visible", "again"]


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="log level"):
        logs.configure(tmp_path, level="loud")
    with pytest.raises(ConfigError, match="journal"):
        logs.configure(tmp_path, journal="maybe")


def test_a_fresh_process_logs_json_to_stdout(tmp_path):
    # The daemon's real path: configure in a new interpreter, stdout as the stream.
    code = textwrap.dedent(f"""
        import structlog
        from pathlib import Path
        from autoresearch import logs
        logs.configure(Path({str(tmp_path)!r}), journal="off")
        structlog.contextvars.bind_contextvars(experiment=3)
        logs.get_logger().info("hello", x=[1, 2], where=Path("/srv/lab"))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    got = json.loads(proc.stdout)
    assert got["event"] == "hello" and got["experiment"] == 3 and got["x"] == [1, 2]
    assert got["where"] == "/srv/lab"
    assert json.loads((tmp_path / "daemon.log").read_text()) == got


def test_fields_for_a_non_json_line():
    assert logs.fields_for_line("not json")["MESSAGE"] == "not json"


def test_the_secrets_filter_on_an_earlier_handler_keeps_structlog_events_intact(tmp_path, monkeypatch):
    # The SDK guard adds its redacting filter to whatever handlers the root logger has,
    # and a filter may rewrite the record every later handler sees. A structlog event
    # dict must stay a dict (and lose the secret) for our formatter after it.
    from autoresearch import secrets

    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    secret = "sk-ant-api03-zyxwvutsrqponmlk"
    earlier = logging.StreamHandler(io.StringIO())
    earlier.addFilter(secrets.RedactingFilter())
    root = logging.getLogger()
    root.addHandler(earlier)
    try:
        out = io.StringIO()
        logs.configure(tmp_path, stream=out, journal="off")
        logs.get_logger().error("auth failed", detail=f"key {secret} rejected")
    finally:
        root.removeHandler(earlier)
        logs.close()
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(g["event"], g["detail"]) for g in got] == [("auth failed", "key [REDACTED] rejected")]


def test_a_full_disk_under_daemon_log_is_one_line_not_a_traceback_per_line(tmp_path, capfd):
    (tmp_path / "daemon.log").symlink_to("/dev/full")  # every write: ENOSPC
    out = io.StringIO()
    logs.configure(tmp_path, stream=out, journal="off")
    log = logs.get_logger()
    for i in range(5):
        log.info("tick", i=i)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("\n") == 1 and "cannot write" in err and "No space left on device" in err, err
    assert [json.loads(line)["i"] for line in out.getvalue().splitlines()] == [0, 1, 2, 3, 4]
    # Writable again (here: the link now points at a real file): said once, lines flow again.
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logs.LogFileHandler))
    handler.close()
    (tmp_path / "daemon.log").unlink()
    log.info("tock")
    assert "writable again" in capfd.readouterr().err
    assert lines(tmp_path / "daemon.log")[-1]["event"] == "tock"
