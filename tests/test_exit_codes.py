"""One exit-code scheme for every command (autoresearch/errors.py), as docs/CLI.md lists it.

Each command is run for real against workspaces in the situations that matter: fine, not a
workspace, never run, damaged log, a daemon running, none running. Every command of the
parser must appear in the table below, so a new command cannot skip the scheme.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from autoresearch.cli import build_parser
from autoresearch.errors import MEANING, NO_RESTART, Exit
from autoresearch.eventlog import SCHEMA_VERSION

from daemon_fixtures import REPO, cli, current, make_workspace, spawn_daemon, wait_for

OK, FAILED, USAGE, BUSY, CORRUPT, SYSTEM, DECLINED = (
    Exit.OK, Exit.FAILED, Exit.USAGE, Exit.BUSY, Exit.CORRUPT, Exit.SYSTEM, Exit.DECLINED)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """fresh: a workspace where the daemon never ran; lab: one finished experiment and stopped;
    corrupt: a log that is not a database; running: a daemon training (a 60 s run); plain: no workspace."""
    base = tmp_path_factory.mktemp("codes")
    lab = make_workspace(base / "lab")
    assert cli("run", str(lab), "--max-experiments", "1").returncode == 0
    corrupt = base / "corrupt"
    shutil.copytree(lab, corrupt)
    (corrupt / ".autoresearch" / "events.sqlite").write_bytes(b"this is not an event log" * 100)
    for suffix in ("-wal", "-shm"):
        (corrupt / ".autoresearch" / f"events.sqlite{suffix}").unlink(missing_ok=True)
    newer = base / "newer"  # as a later autoresearch (a higher schema version) would leave it
    shutil.copytree(lab, newer)
    conn = sqlite3.connect(newer / ".autoresearch" / "events.sqlite")
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    conn.close()
    running = make_workspace(base / "running")
    mode = base / "mode"
    mode.write_text("sleep:60")
    daemon = spawn_daemon(running, env={"AUTORESEARCH_TEST_MODE": str(mode)})
    plain = base / "plain"
    plain.mkdir()
    try:
        wait_for(lambda: current(running, "training"), timeout=60)
        yield {"fresh": make_workspace(base / "fresh"), "lab": lab, "corrupt": corrupt, "running": running,
               "plain": plain, "missing": base / "missing", "base": base, "newer": newer}
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


# (command line with {place} placeholders, expected code). Every command appears at least once.
CASES = [
    ("init {base}/new --profile cpu", OK),
    ("init {lab}", USAGE),
    ("init", USAGE),                                   # argparse: the directory is required
    ("run {missing}", USAGE),
    ("run {plain}", USAGE),
    ("run {corrupt}", CORRUPT),
    ("run {running}", BUSY),
    ("status {lab}", OK),
    ("status {running}", OK),
    ("status {fresh}", USAGE),
    ("status {plain}", USAGE),
    ("status {corrupt}", CORRUPT),
    ("results {lab}", OK),
    ("results {fresh}", USAGE),
    ("results {corrupt}", CORRUPT),
    ("history {lab}", OK),
    ("history {fresh}", USAGE),
    ("history {corrupt}", CORRUPT),
    ("history {lab} --experiment 999", USAGE),
    ("show {lab} 1", OK),
    ("show {lab} 999", USAGE),
    ("show {fresh} 0", USAGE),
    ("show {corrupt} 0", CORRUPT),
    ("verify {lab}", OK),
    ("verify {fresh}", USAGE),
    ("verify {corrupt}", CORRUPT),
    ("repair {lab}", OK),
    ("repair {fresh}", USAGE),
    ("repair {running}", BUSY),
    ("plot {lab} -o {base}/p.png", OK),
    ("plot {fresh} -o {base}/p.png", USAGE),
    ("plot {corrupt} -o {base}/p.png", CORRUPT),
    ("plot {lab} -o /sys/p.png", SYSTEM),              # the kernel refuses the file
    ("tail {lab}", OK),
    ("tail {fresh}", USAGE),
    ("pause {plain}", USAGE),
    ("pause {fresh}", BUSY),                           # nothing to queue it for: no daemon, no log
    ("resume {running}", DECLINED),                    # not paused
    ("skip {lab}", BUSY),
    ("stop {lab}", BUSY),
    ("dashboard {plain}", USAGE),
    ("dashboard {lab} --listen nonsense", USAGE),
    ("service install {lab} --print", OK),
    ("service install {plain} --print", USAGE),
    ("service status {lab} --name never-installed-here", USAGE),
]


@pytest.mark.parametrize("line, code", CASES)
def test_exit_code(places, line, code):
    args = [part.format(**places) for part in line.split()]
    out = cli(*args)
    assert out.returncode == code, (line, out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    # argparse's usage error is two lines; verify's diagnosis of a damaged log is its report, not a mistake.
    if code not in (OK, DECLINED) and not out.stderr.startswith("usage:") and args[0] != "verify":
        assert out.stderr.startswith("autoresearch: error: ") and out.stderr.count("\n") == 1, out.stderr


# Every command that reads or writes the event log, on a log a newer autoresearch wrote.
NEWER = ["run {newer}", "status {newer}", "status {newer} --json", "results {newer}", "history {newer}",
         "show {newer} 1", "verify {newer}", "repair {newer}", "plot {newer} -o {base}/newer.png",
         "pause {newer}", "resume {newer}", "skip {newer}", "stop {newer}", "dashboard {newer} --listen 127.0.0.1:0"]


@pytest.mark.parametrize("line", NEWER)
def test_a_log_from_a_newer_autoresearch_is_refused(places, line):
    path = places["newer"] / ".autoresearch" / "events.sqlite"
    before = path.read_bytes()
    out = cli(*[part.format(**places) for part in line.split()], timeout=30)
    assert out.returncode == USAGE, (line, out.returncode, out.stdout, out.stderr)
    assert out.stderr == (f"autoresearch: error: {path}: written by a newer autoresearch "
                          f"(schema {SCHEMA_VERSION + 1}); upgrade autoresearch\n")
    assert path.read_bytes() == before and not list((places["newer"] / ".autoresearch" / "inbox").iterdir())
    assert not list(path.parent.glob("events.sqlite.bak-*"))


def test_service_without_systemd_is_the_machine_refusing(tmp_path):
    root = make_workspace(tmp_path / "lab")
    out = cli("service", "install", str(root), "--user", env={"PATH": str(tmp_path)})  # no systemctl
    assert out.returncode == SYSTEM, out.stderr
    assert "systemctl not found" in out.stderr and out.stderr.count("\n") == 1


def test_every_command_is_in_the_table_and_the_docs():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = sorted(sub.choices)
    covered = {line.split()[0] for line, _ in CASES}
    assert set(commands) <= covered, set(commands) - covered
    cli_md = (REPO / "docs" / "CLI.md").read_text()
    readme = (REPO / "README.md").read_text()
    for command in commands:
        assert re.search(rf"^\$ autoresearch {command}\b", cli_md, re.M), f"docs/CLI.md has no example of {command}"
        assert re.search(rf"^\| .*`{command}`.* \|", readme, re.M), f"README's command table lacks {command}"


def test_the_docs_list_the_codes_of_errors_py():
    cli_md = (REPO / "docs" / "CLI.md").read_text()
    section = cli_md.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M))
    assert {int(k): v for k, v in rows.items()} == {int(code): text for code, text in MEANING.items()}
    restart = sorted(int(c) for c in NO_RESTART)
    for unit in (REPO / "autoresearch" / "systemd_units").rglob("*.service"):
        line = re.search(r"^RestartPreventExitStatus=(.*)$", unit.read_text(), re.M).group(1)
        assert sorted(int(c) for c in line.split()) == restart, unit
    assert FAILED == 1  # what Python itself exits with on an uncaught exception
