"""autoresearch tail: history, filtering, pretty/JSON output, following across rotation."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest

from autoresearch import tail as tail_mod
from autoresearch.errors import UserError


def event(i: int, **kw) -> str:
    rec = {"timestamp": f"2026-01-02T03:04:{i % 60:02d}.000000Z", "level": "info",
           "event": f"e{i}", **kw}
    return json.dumps(rec) + "\n"


def write(path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


class Capture(io.StringIO):
    """A sink that tail may write to from its own thread while the test reads it."""

    def __init__(self, tty: bool = False):
        super().__init__()
        self.tty = tty
        self.lock = threading.Lock()

    def isatty(self):
        return self.tty

    def write(self, s):
        with self.lock:
            return super().write(s)

    def text(self):
        with self.lock:
            return self.getvalue()


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_last_lines_as_json_filtered_by_experiment(tmp_path):
    log = tmp_path / "daemon.log"
    write(log, "".join(event(i, experiment=i % 3) for i in range(30)))
    write(log, event(99))  # no experiment: excluded by the filter
    out = Capture()
    tail_mod.tail(tmp_path, follow=False, as_json=True, experiment=1, lines=4, out=out)
    got = [json.loads(line) for line in out.text().splitlines()]
    assert [g["event"] for g in got] == ["e19", "e22", "e25", "e28"]
    assert out.text().splitlines()[0] == event(19, experiment=1).rstrip("\n")


def test_pretty_lines_plain_and_colored(tmp_path):
    log = tmp_path / "daemon.log"
    write(log, event(1, level="warning", experiment=42, state="training",
                     trigger="run_started", note="two words"))
    write(log, "not json at all\n")
    write(log, event(2, exception="Traceback...\n  File x\nValueError: bad"))
    out = Capture()
    tail_mod.tail(tmp_path, out=out)
    first, raw, third = out.text().splitlines()
    assert "\x1b[" not in out.text()
    fields = first.split()
    assert fields[1:5] == ["WARNI", "#42", "training", "e1"]
    assert 'trigger=run_started note="two words"' in first
    assert raw == "not json at all"
    assert third.endswith('exception="ValueError: bad [...]"')
    colored = Capture(tty=True)
    tail_mod.tail(tmp_path, out=colored)
    assert "\x1b[33mWARNI\x1b[0m" in colored.text()


def test_history_includes_the_rotated_backup_when_the_current_file_is_short(tmp_path):
    write(tmp_path / "daemon.log.1", "".join(event(i) for i in range(5)))
    write(tmp_path / "daemon.log", event(5))
    out = Capture()
    tail_mod.tail(tmp_path, as_json=True, lines=3, out=out)
    assert [json.loads(x)["event"] for x in out.text().splitlines()] == ["e3", "e4", "e5"]


def test_missing_log_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no daemon log"):
        tail_mod.tail(tmp_path, follow=False)


def test_follow_sees_appends_rotation_and_truncation_then_stops(tmp_path):
    log = tmp_path / "daemon.log"
    write(log, event(0, experiment=1))
    out, stop = Capture(), threading.Event()
    t = threading.Thread(target=tail_mod.tail, args=(tmp_path,),
                         kwargs=dict(follow=True, as_json=True, out=out, stop_event=stop,
                                     poll_interval=0.02, experiment=1))
    t.start()
    try:
        assert wait_for(lambda: '"e0"' in out.text())
        write(log, event(1, experiment=1) + event(2, experiment=2))
        assert wait_for(lambda: '"e1"' in out.text())
        # A partial line is held back until its newline arrives.
        line = event(3, experiment=1)
        write(log, line[:10])
        time.sleep(0.1)
        assert '"e3"' not in out.text()
        write(log, line[10:])
        assert wait_for(lambda: '"e3"' in out.text())
        # Rotation: the last line of the old file and the new file's lines both show.
        write(log, event(4, experiment=1))
        os.rename(log, tmp_path / "daemon.log.1")
        write(log, event(5, experiment=1))
        assert wait_for(lambda: '"e5"' in out.text())
        # Truncation in place (noticed because the file is now shorter than what was read).
        with open(log, "w") as fh:
            fh.write('{"event": "e6", "experiment": 1}\n')
        assert wait_for(lambda: '"e6"' in out.text())
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    got = [json.loads(x)["event"] for x in out.text().splitlines()]
    assert got == ["e0", "e1", "e3", "e4", "e5", "e6"]


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path):
    out, stop = Capture(), threading.Event()
    t = threading.Thread(target=tail_mod.tail, args=(tmp_path,),
                         kwargs=dict(follow=True, as_json=True, out=out, stop_event=stop,
                                     poll_interval=0.02))
    t.start()
    try:
        time.sleep(0.1)
        write(tmp_path / "daemon.log", event(7))
        assert wait_for(lambda: '"e7"' in out.text())
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_keyboard_interrupt_propagates_after_closing_the_file(tmp_path, monkeypatch):
    write(tmp_path / "daemon.log", event(0))
    closed = []
    real_close = tail_mod._Follower.close

    def spy_close(self):
        closed.append(True)
        real_close(self)

    class Interrupting(threading.Event):
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    monkeypatch.setattr(tail_mod._Follower, "close", spy_close)
    with pytest.raises(KeyboardInterrupt):
        tail_mod.tail(tmp_path, follow=True, out=Capture(), stop_event=Interrupting())
    assert closed
