"""Nothing a run produced is stored or printed raw: secrets redacted, terminal controls stripped,
in the run's log file, the `finish` event's log_tail, `show` and `tail`."""

from __future__ import annotations

import sqlite3
import textwrap

from autoresearch import secrets
from autoresearch.sanitize import clean, strip_controls

from daemon_fixtures import TRAIN, cli, make_workspace

SECRET = "hunter2-credential-value-7781"
SHAPED = "sk-ant-api03-" + "Q" * 40


def test_strip_controls_removes_escapes_and_keeps_final_progress_state():
    raw = ("\x1b[31mred\x1b[0m plain\n\x1b]0;title\x07step 1\rstep 2\rstep 3\nbell\x07 nul\x00 end\r\n"
           "\x1bP+q\x1b\\dcs \x9b2Jc1 \u202eevil\u202c\n")
    assert strip_controls(raw) == "red plain\nstep 3\nbell nul end\ndcs c1 evil\n"


def test_credentials_directory_and_secret_env_values_are_redacted(tmp_path):
    (tmp_path / "db_password").write_text("line-one-secret-x\nline-two-secret-y\n")
    secrets.remember_environment({"CREDENTIALS_DIRECTORY": str(tmp_path), "MY_TOKEN": "tok-12345678"})
    text = clean("a line-two-secret-y b tok-12345678 c ghp_" + "a" * 36 + " \x1b[2J")
    assert "secret" not in text and "tok-" not in text and "ghp_" not in text and "\x1b" not in text


def test_a_run_printing_secrets_and_escapes_is_stored_clean(tmp_path):
    """The run prints a credential (read from where a careless setup left it), a key-shaped
    string split across two writes, and escapes. Checked in every place it could land."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "anthropic_api_key").write_text(SECRET + "\n")
    leak = tmp_path / "leak.txt"
    leak.write_text(SECRET)
    train = TRAIN.replace('print("training...")', textwrap.dedent(f'''\
        import sys as _s
        print("leak:", open({str(leak)!r}).read())
        _s.stdout.write("shaped: {SHAPED[:20]}"); _s.stdout.flush(); time.sleep(0.05)
        print("{SHAPED[20:]} done")
        print("\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x1b[0m")
        print("training...")'''))
    root = make_workspace(tmp_path / "ws", train=train)
    out = cli("run", str(root), "--max-experiments", "1", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert out.returncode == 0, out.stderr
    runs = list((root / ".autoresearch" / "runs").glob("*.log"))
    assert runs
    stored = [p.read_bytes().decode() for p in runs]
    db = sqlite3.connect(root / ".autoresearch" / "events.sqlite")
    stored += [row[0] for row in db.execute("SELECT * FROM events") for row in [tuple(map(str, row))]]
    db.close()
    shown = cli("show", str(root), "0").stdout
    tailed = cli("tail", str(root), "-n", "1000").stdout
    for text in stored + [shown, tailed]:
        assert SECRET not in text and SHAPED[:20] not in text and "Q" * 20 not in text
        assert "\x1b" not in text and "\x07" not in text
    assert "leak: [REDACTED]" in shown and "red" in shown
    assert any("leak: [REDACTED]" in s for s in stored)
