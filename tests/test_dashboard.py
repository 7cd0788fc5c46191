"""The dashboard server from outside: a real `autoresearch dashboard` process on loopback, its HTTP API,
its stream, its guards (read-only, token, Host), and the pure views it is built on."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from autoresearch.dashboard import views
from autoresearch.dashboard.source import daemon_pid
from autoresearch.eventlog import EventLog
from dashboard_fixtures import XSS, Dashboard, build_lab, sse_messages
from daemon_fixtures import cli, make_workspace, state


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under the workspace (git and state dir included) with its content's hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("dash") / "lab")


@pytest.fixture(scope="module")
def dash(lab, tmp_path_factory):
    d = Dashboard(lab, env={"XDG_STATE_HOME": str(tmp_path_factory.mktemp("state"))})
    yield d
    d.stop()


def test_summary_is_the_fold_of_the_log(lab, dash):
    data = dash.json("/api/summary")
    st = state(lab)
    assert [r["n"] for r in data["rows"]] == sorted(st.experiments)
    assert {r["n"]: r["state"] for r in data["rows"]} == {n: e.state for n, e in st.experiments.items()}
    h = data["header"]
    assert h["seq"] == st.seq and h["best"] == st.best_metric and h["daemon"] == "stopped"
    assert h["counts"] == {"kept": 2, "discarded": 2, "crashed": 1, "rejected": 0}
    assert h["keep_rate"] == pytest.approx(2 / 5)
    assert h["gain"] == pytest.approx(st.experiments[0].metric - st.best_metric)
    assert not h["alive"] and h["slots"] == []
    rows = {r["n"]: r for r in data["rows"]}
    assert rows[2]["delta"] == pytest.approx(st.experiments[2].metric - st.experiments[1].metric)
    assert rows[3]["metric"] is None and rows[3]["charted"]
    assert [r["best"] for r in data["rows"]] == pytest.approx(
        [st.experiments[0].metric, st.experiments[1].metric, st.experiments[1].metric, st.experiments[1].metric,
         st.best_metric, st.best_metric])
    assert [t["trigger"] for t in data["timeline"]][:2] == ["boot", "prepare"]


def test_experiment_detail_diff_log_events(lab, dash):
    d = dash.json("/api/experiments/2")
    assert d["state"] == "discarded" and d["description"].endswith(XSS)
    # The diff: highlighted, with every piece of text escaped.
    assert '<span class="dl dadd">' in d["diff_html"] and "WIDTH" in d["diff_html"]
    assert "<script" not in d["diff_html"]
    # The run's output: escapes stripped, a redrawn progress line reduced to what was on screen.
    assert "\x1b" not in d["log"] and "warning <b>bold</b> <script>" in d["log"]
    assert "step 2 | loss 2.2500" in d["log"] and "loss 3.5000" not in d["log"]
    assert d["latest_loss"] == 2.25
    assert [e["trigger"] for e in d["events"]][:3] == ["start", "proposed", "commit"]
    assert all("files" not in e["payload"] and "log_tail" not in e["payload"] for e in d["events"])
    status, _, body = dash.request("GET", "/api/experiments/99")
    assert status == 404 and b"no experiment 99" in body


def test_read_only_every_method_refused_and_nothing_written(lab, dash):
    before = tree_digest(lab)
    for path in ("/", "/api/summary", "/api/experiments/1", "/api/stream", "/static/app.js", "/nope"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = dash.request(method, path, body=b"{}")
            assert status == 405, (method, path, status)
            assert headers["allow"] == "GET, HEAD"
    for path in ("/", "/api/summary", "/api/experiments/3", "/static/app.js", "/highlight.css"):
        status, headers, _ = dash.request("GET", path)
        assert status == 200, path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    assert tree_digest(lab) == before  # no byte of the workspace changed, no file (-shm, -wal) appeared


def test_dns_rebinding_host_refused(dash):
    status, _, _ = dash.request("GET", "/api/summary", headers={"Host": "attacker.example:8765"})
    assert status == 421
    status, _, _ = dash.request("GET", "/api/summary", headers={"Host": f"localhost:{dash.port}"})
    assert status == 200


def test_dashboard_takes_no_lock(lab, dash):
    """It finds out whether the daemon runs without trying the lock (a probe could fail a starting daemon)."""
    dash.json("/api/summary")
    with open("/proc/locks") as fh:  # (SQLite's own POSIX read locks on the log are expected: WAL readers)
        flocks = [line.split()[4] for line in fh if len(line.split()) > 4 and line.split()[1] == "FLOCK"]
    assert str(dash.proc.pid) not in flocks


def test_stream_pushes_new_events(tmp_path):
    root = make_workspace(tmp_path / "ws")
    d = Dashboard(root)  # before the daemon ever ran: no log yet, and that is fine
    try:
        assert d.json("/api/summary")["header"]["seq"] == 0
        (root / ".autoresearch").mkdir(exist_ok=True)
        t0 = time.monotonic()

        def append_later():  # as the daemon would (its own connection, in its own thread)
            time.sleep(0.5)
            log = EventLog.open(root / ".autoresearch" / "events.sqlite")
            log.append("daemon", "boot", "stopped", "starting", {"pid": 1})
            log.append("experiment:0", "adopt", "new", "committed",
                       {"commit": "a" * 40, "description": "baseline " + XSS})
            log.close()

        import threading
        threading.Thread(target=append_later).start()
        messages = sse_messages(d.port, until=lambda ms: any(m.get("seq", 0) >= 2 for m in ms
                                                                   if m["event"] == "update"))
        assert time.monotonic() - t0 < 2.5
        update = [m for m in messages if m["event"] == "update"][-1]
        assert update["header"]["daemon"] == "starting"
        assert [r["n"] for r in update["rows"]] == [0]
        assert [e["trigger"] for e in update["events"]][-1] == "adopt"
    finally:
        d.stop()


def test_token_required_shown_once_and_stored_hashed_outside(lab, tmp_path):
    state_home = tmp_path / "state"
    env = {"XDG_STATE_HOME": str(state_home)}
    d = Dashboard(lab, "--token", env=env)
    try:
        token = d.output.split("shown this once; its hash is kept in ")[1].split(": ", 1)[1].split()[0]
        files = list(state_home.rglob("*.token"))
        assert len(files) == 1 and not str(files[0]).startswith(str(lab))
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        assert files[0].read_text().strip() == hashlib.sha256(token.encode()).hexdigest()
        assert token not in files[0].read_text()
        assert d.request("GET", "/api/summary")[0] == 401
        assert d.request("GET", "/api/stream")[0] == 401
        assert d.request("GET", "/api/summary?token=wrong")[0] == 401
        status, headers, _ = d.request("GET", f"/?token={token}")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"].split(";")[0]
        assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
        assert d.request("GET", "/api/summary", headers={"Cookie": cookie})[0] == 200
        assert d.request("GET", "/api/summary", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        d.stop()
    again = Dashboard(lab, "--token", env=env)
    try:
        assert token not in again.output and "a token is required" in again.output
        assert again.request("GET", "/api/summary", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        again.stop()


def test_beyond_loopback_requires_a_token():
    from autoresearch.dashboard.auth import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_bad_listen_and_busy_port_are_one_line_errors(lab):
    r = cli("dashboard", str(lab), "--listen", "nonsense")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "HOST:PORT" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = cli("dashboard", str(lab), "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "cannot listen" in r.stderr  # the machine refused
    r = cli("dashboard", str(lab.parent / "missing"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1


def test_daemon_pid_read_from_proc_locks(lab):
    from autoresearch.control import WorkspaceLock

    assert daemon_pid(lab / ".autoresearch") is None
    lock = WorkspaceLock(lab / ".autoresearch")
    lock.acquire()
    try:
        assert daemon_pid(lab / ".autoresearch") == os.getpid()
    finally:
        lock.release()
    assert daemon_pid(lab / ".autoresearch") is None


# ---------------------------------------------------------------------- pure views

def test_clean_terminal_text():
    raw = "\x1b[1;32mok\x1b[0m \x1b]0;title\x07done\r\n10%\r50%\r100%\nbell\x07 nul\x00 tab\tend"
    assert views.clean_terminal_text(raw) == "ok done\n100%\nbell nul tab\tend"


def test_latest_loss():
    assert views.latest_loss("step 1 | loss 3.2\nstep 2 | loss: 2.5e-1 |\n") == 0.25
    assert views.latest_loss("val_bpb: 1.0") is None
    assert views.latest_loss("loss nan") is None


def test_diff_html_escapes_and_highlights():
    diff = ("diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n"
            "-X = '<b>'\n+X = '</script><script>alert(1)</script>'\n")
    out = views.diff_html(diff)
    assert "<script>" not in out and "&lt;/script&gt;&lt;script&gt;" in out
    assert '<span class="dl ddel">' in out and '<span class="dl dadd">' in out
    assert '<span class="n">X</span>' in out  # Python tokens, highlighted


def test_timeline_marks_a_restart_after_a_crash():
    from autoresearch.eventlog import Event

    def ev(seq, trigger, dest):
        return Event(seq, f"2026-01-01T00:00:{seq:02d}Z", "daemon", trigger, "x", dest, {}, "h")

    items = views.timeline_items([ev(1, "boot", "starting"), ev(2, "prepare", "preparing"),
                                  ev(3, "boot", "starting"), ev(4, "stop", "stopped"), ev(5, "boot", "starting")])
    assert [(i["trigger"], i.get("crashed_before")) for i in items] == [
        ("boot", False), ("prepare", None), ("boot", True), ("stop", None), ("boot", False)]


def test_a_replaced_log_starts_the_pages_over(lab, tmp_path):
    """`autoresearch repair` swaps the log file for a shorter one: the fold starts over, pages are told."""
    import shutil
    import threading

    root = tmp_path / "copy"
    shutil.copytree(lab, root)
    d = Dashboard(root)
    try:
        before = d.json("/api/summary")["header"]["seq"]
        short = tmp_path / "short.sqlite"
        log = EventLog.open(short)
        for e in list(EventLog.open(root / ".autoresearch" / "events.sqlite", create=False).events())[:5]:
            log.append(e.aggregate, e.trigger, e.source, e.dest, e.payload)
        log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.close()

        def swap():
            time.sleep(0.5)
            for suffix in ("-wal", "-shm"):
                (root / ".autoresearch" / f"events.sqlite{suffix}").unlink(missing_ok=True)
            os.replace(short, root / ".autoresearch" / "events.sqlite")

        threading.Thread(target=swap).start()
        sse_messages(d.port, until=lambda ms: any(m["event"] == "reset" for m in ms))
        after = d.json("/api/summary")
        assert before > 5 and after["header"]["seq"] == 5
        assert [r["n"] for r in after["rows"]] == [0]
    finally:
        d.stop()


def test_header_slot_clock_and_gain():
    from autoresearch.state import Experiment, State

    st = State(daemon="running", baseline_n=0, best_metric=0.9, best_n=1)
    st.experiments = {0: Experiment(0, state="kept", kind="baseline", metric=1.0),
                      1: Experiment(1, state="kept", metric=0.9),
                      2: Experiment(2, state="training", description="try")}
    h = views.header(st, now=1000.0, daemon_pid=7, boot_time="1970-01-01T00:00:00Z", budget_s=300,
                     slots=[{"n": 2, "launched": "1970-01-01T00:15:00Z", "loss": 3.25}])
    assert h["uptime_s"] == 1000.0 and h["gain"] == pytest.approx(0.1) and h["gain_pct"] == pytest.approx(10.0)
    assert h["slots"] == [{"n": 2, "kind": "experiment", "state": "training", "description": "try",
                           "elapsed_s": 100.0, "budget_s": 300, "loss": 3.25, "started": "",
                           "slot": None, "device": None}]
    assert h["keep_rate"] == 1.0 and h["finished"] == 1
    down = views.header(st, now=1000.0, daemon_pid=None, boot_time="1970-01-01T00:00:00Z", budget_s=300, slots=[])
    assert down["alive"] is False and down["uptime_s"] is None


def test_ctrl_c_with_a_page_open_stops_cleanly(lab):
    import http.client
    import signal

    d = Dashboard(lab)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request("GET", "/api/stream")
        res = conn.getresponse()
        assert res.status == 200 and res.read(4) == b"id: "  # the stream is open
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 3
        assert "Traceback" not in d.output and "ERROR" not in d.output, d.output
    finally:
        conn.close()
        d.stop()


def test_the_dashboard_never_folds_a_log_a_newer_autoresearch_wrote(tmp_path):
    """`dashboard` refuses such a log at start (test_exit_codes); its reader, too, never
    follows one (a log a newer daemon created after the page was opened)."""
    import sqlite3

    from autoresearch.dashboard.source import LogReader
    from autoresearch.eventlog import SCHEMA_VERSION

    state_dir = tmp_path / ".autoresearch"
    state_dir.mkdir()
    log = EventLog.open(state_dir / "events.sqlite")
    log.append("daemon", "boot", "stopped", "starting", {})
    log.close()
    assert len(LogReader(state_dir).poll()[0]) == 1
    conn = sqlite3.connect(state_dir / "events.sqlite")
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    conn.close()
    reader = LogReader(state_dir)
    assert reader.poll() == ([], False) and reader.state.seq == 0 and reader.conn is None
