"""Notifications ([notify] command) from outside: a real daemon process runs the command on the chosen
events, with the event as JSON on stdin, within its deadline, without ever holding up the loop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from autoresearch import config as config_mod
from autoresearch.alerts import kind_of
from autoresearch.clock import parse_utc
from autoresearch.errors import ConfigError
from autoresearch.eventlog import Event
from daemon_fixtures import cli, events, make_workspace


def notes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_new_best_exhausted_and_restarted_reach_the_command(tmp_path):
    out, env_seen = tmp_path / "notes.jsonl", tmp_path / "env.txt"
    command = (f"cat >> {out}; printf '%s|%s|%s\\n' \"$AUTORESEARCH_NOTIFY_KIND\" \"$AUTORESEARCH_NOTIFY_TEXT\" "
               f"\"${{ANTHROPIC_API_KEY:-no key}}\" >> {env_seen}")
    root = make_workspace(tmp_path / "lab", notify={"command": command}, limits={"max_experiments": 3})
    key = "sk-ant-api03-" + "x" * 40
    r = cli("run", str(root), env={"ANTHROPIC_API_KEY": key})
    assert r.returncode == 0, r.stderr
    got = notes(out)
    kept = [e for e in events(root) if e.trigger == "keep" and e.payload.get("reason") != "baseline"]
    assert [m["kind"] for m in got] == ["new_best"] * len(kept) + ["exhausted"]
    assert kept, "the fixture's offline search finds at least one improvement in 3 experiments"
    first = got[0]
    assert first["event"]["seq"] == kept[0].seq and first["event"]["trigger"] == "keep"
    assert first["text"].startswith("autoresearch lab: new best ") and "vs baseline" in first["text"]
    assert first["experiment"]["n"] == kept[0].experiment and first["best_metric"] is not None
    assert "exhausted" in got[-1]["text"] and "max_experiments 3 reached" in got[-1]["text"]
    lines = env_seen.read_text().splitlines()
    assert lines[0].split("|")[0] == "new_best" and lines[0].split("|")[1] == first["text"]
    assert all(line.endswith("|no key") for line in lines)  # the API key is not the command's
    assert key not in out.read_text()
    # Started again: "restarted" (and the cap is still reached: "exhausted" again).
    r = cli("run", str(root))
    assert [m["kind"] for m in notes(out)][len(got):] == ["restarted", "exhausted"]


def test_blocked_and_stopped(tmp_path):
    out = tmp_path / "notes.jsonl"
    root = make_workspace(tmp_path / "lab", notify={"command": f"cat >> {out}"},
                         run={"prepare_command": "sh -c 'echo no data >&2; exit 1'"})
    r = cli("run", str(root), "--for", "2s")
    assert r.returncode == 0, r.stderr
    got = notes(out)
    assert [m["kind"] for m in got] == ["blocked", "stopped"]
    assert "prepare failed" in got[0]["event"]["payload"]["reason"] and got[0]["event"]["payload"]["retry_at"]


def test_a_hanging_command_never_holds_up_the_loop_and_is_killed_at_its_deadline(tmp_path):
    marker = f"{31 + os.getpid() % 1000}.4242"
    root = make_workspace(tmp_path / "lab", notify={"command": f"sleep {marker}", "timeout_seconds": 2.0,
                                                   "events": ["new_best", "stopped", "crashed"]})
    t0 = time.monotonic()
    r = cli("run", str(root), "--max-experiments", "6")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    evs = events(root)
    kept = [e for e in evs if e.trigger == "keep" and e.payload.get("reason") != "baseline"]
    assert kept
    for e in kept:  # the next event came at once: the loop did not wait for the (hanging) command
        nxt = next(x for x in evs if x.seq == e.seq + 1)
        gap = (parse_utc(nxt.time) - parse_utc(e.time))
        assert gap < 1.0, (e.seq, gap)  # waiting for the command would take its whole 2 s deadline
    # Each notification is killed at its 2 s deadline; the last ("stopped") had at most 15 s to go out.
    assert took < 45
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    assert leftovers == []
    log = (root / ".autoresearch" / "daemon.log").read_text()
    assert "notification command killed at its deadline" in log


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_kind_of():
    def ev(seq, aggregate, trigger, source="x", dest="y", **payload):
        return Event(seq, "2026-01-01T00:00:00Z", aggregate, trigger, source, dest, payload, "h")

    assert kind_of(ev(1, "daemon", "boot", "stopped", "starting")) is None  # the very first start
    assert kind_of(ev(9, "daemon", "boot", "running", "starting")) == "restarted"
    assert kind_of(ev(9, "daemon", "block", reason="r")) == "blocked"
    assert kind_of(ev(9, "daemon", "exhaust")) == "exhausted"
    assert kind_of(ev(9, "daemon", "stop")) == "stopped"
    assert kind_of(ev(9, "daemon", "pause")) is None
    assert kind_of(ev(9, "experiment:0", "keep", reason="baseline")) is None
    assert kind_of(ev(9, "experiment:3", "keep", reason="improved")) == "new_best"
    assert kind_of(ev(9, "experiment:3", "crash")) == "crashed"
    assert kind_of(ev(9, "experiment:3", "discard")) is None


def test_config_refuses_an_unknown_event():
    with pytest.raises(ConfigError, match="notify.events: unknown event 'new-best'"):
        config_mod.parse('[run]\ncommand = "python train.py"\n[notify]\ncommand = "true"\nevents = ["new-best"]\n')
    with pytest.raises(ConfigError, match="timeout_seconds must be positive"):
        config_mod.parse('[run]\ncommand = "python train.py"\n[notify]\ntimeout_seconds = 0\n')
