"""The command line as a user meets it: real processes, one-line errors, real outputs."""

import argparse
import json
import os
import pty
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from autoresearch.cli import build_parser
from autoresearch.control import WorkspaceLock
from autoresearch.eventlog import GENESIS_HASH, event_hash

from daemon_fixtures import (GIT_IDENTITY, REPO, cli, current, events, git, make_workspace, spawn_daemon, state,
                             wait_for)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A workspace with a few finished experiments."""
    root = make_workspace(tmp_path_factory.mktemp("cli") / "lab")
    out = cli("run", str(root), "--max-experiments", "4")
    assert out.returncode == 0, out.stderr
    return root


def one_line_error(out, code=2):
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("autoresearch: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_results_is_autoresearch_tsv(lab):
    out = cli("results", str(lab))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 5 and all(len(r) == 5 for r in rows)
    assert rows[0][3:] == ["keep", "baseline"] and rows[0][2] == "0.5"
    st = state(lab)
    assert {r[3] for r in rows[1:]} <= {"keep", "discard", "crash", "reject"}
    assert rows[1][0] == st.experiments[1].commit[:7] and float(rows[1][1]) == round(st.experiments[1].metric, 6)
    assert "4 experiments" in out.stderr and "cost $0.0000" in out.stderr


def test_status_history_show_plot(lab, tmp_path):
    out = cli("status", str(lab))
    assert out.returncode == 0 and "daemon:     stopped (not running)" in out.stdout and "best:" in out.stdout
    data = json.loads(cli("status", str(lab), "--json").stdout)
    assert data["daemon"] == "stopped" and data["running"] is False and sum(data["counts"].values()) == 4
    history = cli("history", str(lab)).stdout.splitlines()
    assert "boot" in history[0] and "stopped -> starting" in history[0] and len(history) == state(lab).seq
    exp1 = cli("history", str(lab), "--experiment", "1").stdout.splitlines()
    assert exp1 and all("experiment:1" in line for line in exp1)
    show = cli("show", str(lab), "1")
    assert show.returncode == 0 and "--- diff ---" in show.stdout and "+" in show.stdout
    png = tmp_path / "progress.png"
    out = cli("plot", str(lab), "-o", str(png))
    assert out.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(cli("show", str(lab), "99"))


def test_verify_ok(lab):
    out = cli("verify", str(lab))
    assert out.returncode == 0 and "hash chain intact" in out.stdout and "every transition legal" in out.stdout


@pytest.mark.parametrize("args", [
    ("status", "/nonexistent/dir"),
    ("run", "/nonexistent/dir"),
    ("results", "/tmp"),
    ("init", "/proc/self"),
])
def test_bad_paths_are_one_line(args):
    one_line_error(cli(*args))


def test_bad_config_is_one_line_and_touches_nothing(tmp_path):
    root = make_workspace(tmp_path / "ws")
    (root / "autoresearch.toml").write_text("[run]\ncommand = 3\n")
    out = cli("run", str(root))
    one_line_error(out)
    assert "run.command must be a string" in out.stderr
    assert not (root / ".autoresearch" / "events.sqlite").exists()


def test_init_on_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "lab").write_text("")
    out = cli("init", str(tmp_path / "lab"))
    one_line_error(out)
    assert "is a file, not a directory" in out.stderr and "not empty" not in out.stderr


def test_a_plain_directory_with_a_config_gets_advice_that_works(tmp_path):
    root = make_workspace(tmp_path / "ws")
    shutil.rmtree(root / ".git")
    out = cli("run", str(root))
    one_line_error(out)
    assert "is not a git repository" in out.stderr and "`autoresearch init`" not in out.stderr.split(";")[0]
    advice = out.stderr.split("make it one: ", 1)[1].split(" (")[0]
    assert advice.startswith("cd ") and "git init" in advice
    subprocess.run(advice, shell=True, check=True, capture_output=True, env={**os.environ, **GIT_IDENTITY})
    assert not (root / ".autoresearch").exists()  # the refusal left nothing behind
    assert cli("run", str(root), "--max-experiments", "1").returncode == 0  # the advice was enough


@pytest.mark.parametrize("trouble", ["config", "locked", "dirty", "editable"])
def test_a_refused_run_is_fast_and_leaves_nothing(tmp_path, trouble):
    root = make_workspace(tmp_path / "ws")
    lock = None
    if trouble == "config":
        (root / "autoresearch.toml").write_text("[run]\ncommand = 3\n")
    elif trouble == "locked":
        (root / ".autoresearch").mkdir()
        lock = WorkspaceLock(root / ".autoresearch")
        lock.acquire()
    elif trouble == "dirty":
        (root / "notes.txt").write_text("mine")
    else:
        text = (root / "autoresearch.toml").read_text().replace("editable = ['train.py']", "editable = ['trian.py']")
        (root / "autoresearch.toml").write_text(text)
    try:
        # -X importtime lists every module the refusal loaded, on stderr before the error line.
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoresearch.cli", "run", str(root)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        if lock is not None:
            lock.release()
    lines = out.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    error = [line for line in lines if not line.startswith("import time:")]
    assert out.returncode == (3 if trouble == "locked" else 2) and len(error) == 1, out.stderr[-2000:]
    assert error[0].startswith("autoresearch: error: ")
    if trouble == "locked":
        assert sorted(p.name for p in (root / ".autoresearch").iterdir()) == ["daemon.lock"]
    else:
        assert not (root / ".autoresearch").exists()  # not even an empty state directory
    if trouble in ("config", "locked"):  # refused before the heavy imports (measured: 1.4 s -> 0.2 s)
        assert not imported & {"anthropic", "optuna", "torch", "git", "sqlite_utils", "autoresearch.daemon"}


def test_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep me")
    one_line_error(cli("init", str(tmp_path / "x")))
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep me"


def test_a_corrupted_row_is_named_and_run_refuses(tmp_path):
    root = make_workspace(tmp_path / "ws")
    assert cli("run", str(root), "--max-experiments", "1").returncode == 0
    db = root / ".autoresearch" / "events.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE events SET payload = '{\"metric\": 0.001}' WHERE seq = 6")
    conn.commit()
    conn.close()
    out = cli("verify", str(root))
    assert out.returncode == 4 and "event 6: hash mismatch" in out.stderr
    out = cli("run", str(root))
    one_line_error(out, 4)
    assert "corrupt at event 6" in out.stderr
    total = len(events(root))
    out = cli("repair", str(root))
    assert out.returncode == 0, out.stderr
    assert f"kept {total - 1} of {total} events, quarantined 1 (6;" in out.stdout and "lost 0" in out.stdout
    out = cli("verify", str(root))
    assert out.returncode == 0 and "event 6 quarantined by repair" in out.stdout and "0.001" in out.stdout
    assert list(db.parent.glob("events.sqlite.bak-*"))  # the damaged log is kept
    out = cli("run", str(root), "--max-experiments", "1")  # resumes from the valid prefix
    assert out.returncode == 0, out.stderr
    assert cli("verify", str(root)).returncode == 0


def test_verify_catches_an_illegal_transition_with_a_valid_chain(tmp_path):
    root = make_workspace(tmp_path / "ws")
    assert cli("run", str(root), "--max-experiments", "1").returncode == 0
    db = root / ".autoresearch" / "events.sqlite"
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT seq, time, aggregate, trigger, source, dest, payload FROM events ORDER BY seq").fetchall()
    # Forge a whole new chain in which experiment 0 jumps straight to kept.
    conn.execute("DELETE FROM events")
    prev = GENESIS_HASH
    for seq, time, aggregate, trigger, source, dest, payload in rows:
        if aggregate == "experiment:0" and trigger == "launch":
            trigger, dest = "keep", "training"
        digest = event_hash(seq, time, aggregate, trigger, source, dest, payload, prev)
        conn.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                     (seq, time, aggregate, trigger, source, dest, payload, prev, digest))
        prev = digest
    conn.commit()
    conn.close()
    out = cli("verify", str(root))
    assert out.returncode == 4 and "not the one the daemon wrote" in out.stderr  # the anchors see it
    assert "repair" not in out.stderr  # repair cannot make it the daemon's log
    git(root, "update-ref", "-d", "refs/autoresearch/log")  # without anchors: the tables see it
    out = cli("verify", str(root))
    assert out.returncode == 4 and "illegal transition" in out.stderr and "'keep' is not allowed" in out.stderr


def test_service_print_renders_the_unit(tmp_path):
    root = make_workspace(tmp_path / "lab")
    out = cli("service", "install", str(root), "--print")
    assert out.returncode == 0
    assert "Type=notify" in out.stdout and "WatchdogSec=" in out.stdout and str(root) in out.stdout
    # Options before the directory, as docs/SERVICE.md writes it (`install --user ~/lab`).
    user = cli("service", "install", "--user", "--print", str(root))
    assert user.returncode == 0, user.stderr
    assert "WantedBy=default.target" in user.stdout and str(root) in user.stdout


def test_help_has_an_example_for_every_command():
    top = cli("--help").stdout
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices:
        assert command in top
        assert "example:\n  autoresearch " + command in cli(command, "--help").stdout


def _run_on_a_terminal(root, *extra):
    """`autoresearch run` with its stdout on a pseudo-terminal, as a person starts it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", "run", str(root), "--max-experiments", "1",
                             *extra], stdout=follower, stderr=subprocess.PIPE,
                            env={k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO)}.items() if k != "NO_COLOR"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return b"".join(chunks).decode()


def test_log_format(tmp_path):
    """auto: JSON into a pipe or file (for jq), human lines on a terminal; --log-format forces either."""
    piped = cli("run", str(make_workspace(tmp_path / "a")), "--max-experiments", "1")
    lines = piped.stdout.splitlines()
    assert piped.returncode == 0 and lines and all(json.loads(line)["event"] for line in lines)
    human = cli("run", str(make_workspace(tmp_path / "b")), "--max-experiments", "1", "--log-format", "human")
    lines = human.stdout.splitlines()
    assert human.returncode == 0 and lines and not any(line.startswith("{") for line in lines)
    assert any(re.match(r"^\d\d:\d\d:\d\d INFO  #0 kept experiment:0 keep: judging -> kept ", line) for line in lines)
    assert "\x1b" not in human.stdout  # no colours into a file
    terminal = _run_on_a_terminal(make_workspace(tmp_path / "c"))
    assert "\x1b[32mINFO " in terminal and '{"timestamp"' not in terminal
    forced = _run_on_a_terminal(make_workspace(tmp_path / "d"), "--log-format", "json")
    assert all(json.loads(line)["event"] for line in forced.splitlines() if line.strip())
    # Whatever is printed, daemon.log holds JSON.
    log = (tmp_path / "b" / ".autoresearch" / "daemon.log").read_text().splitlines()
    assert log and all(json.loads(line) for line in log)


# The fixture run prints a progress line (with a terminal escape a person must never get raw), then works.
PROGRESSING = '''import os, time
print("step 7 | loss 2.5000 \\x1b]0;pwned\\x07| 0.5/1s", flush=True)
time.sleep(float(os.environ.get("AUTORESEARCH_TEST_SLEEP", "2.5")))
WIDTH = 64
print(f"val_bpb: {1.0 + abs(WIDTH - 100) / 100}")
'''


def test_the_run_in_flight_is_shown_live_on_a_terminal(tmp_path):
    screen = _run_on_a_terminal(make_workspace(tmp_path / "ws", train=PROGRESSING))
    # The live line: redrawn in place (\r, erase line), dimmed, under the log lines.
    live = [part for part in screen.split("\r\x1b[K") if part.startswith("\x1b[2m") and "\n" not in part]
    assert any("training" in p and "/0:01 step 7 · loss 2.5000" in p for p in live), screen[-3000:]
    assert "pwned" not in screen and "\x1b]0" not in screen  # the run's own escapes never reach the terminal
    tail = screen.rsplit("\n", 1)[-1]
    assert tail == "" or tail.endswith("\r\x1b[K"), repr(tail)  # and erased when the daemon ends


def test_status_shows_the_run_in_flight(tmp_path):
    root = make_workspace(tmp_path / "ws", train=PROGRESSING)
    proc = spawn_daemon(root, env={"AUTORESEARCH_TEST_SLEEP": "60"})
    try:
        wait_for(lambda: current(root, "training"), timeout=60)
        text = wait_for(lambda: (lambda s: s if "step 7" in s else None)(cli("status", str(root)).stdout), timeout=30)
        assert re.search(r"now: +baseline \(exp 0\) training \d:\d\d/0:01 step 7 · loss 2\.5000 · best -", text), text
        run = json.loads(cli("status", str(root), "--json").stdout)["current"]["run"]
        assert run["elapsed_s"] > 0 and run["budget_s"] == 1.0 and run["step"] == 7 and run["loss"] == 2.5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
