"""A dashboard server as a real subprocess, and a small HTTP client for it (loopback only)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon_fixtures import REPO

URL_RE = re.compile(r"dashboard: (http://127\.0\.0\.1:(\d+)/)")


class Dashboard:
    def __init__(self, root: Path, *args: str, env: dict | None = None, timeout: float = 30.0):
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autoresearch.cli", "dashboard", str(root), "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if URL_RE.search(line):
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(timeout)
        m = next((URL_RE.search(line) for line in self.lines if URL_RE.search(line)), None)
        if m is None or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("dashboard did not start:\n" + "".join(self.lines))
        self.url, self.port = m.group(1), int(m.group(2))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            return res.status, dict(res.getheaders()), res.read()
        finally:
            conn.close()

    def json(self, path: str, headers: dict | None = None):
        status, _, body = self.request("GET", path, headers)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sse_messages(port: int, *, until, timeout: float = 10.0, headers: dict | None = None) -> list[dict]:
    """Read /api/stream until `until(messages)` is true; returns the parsed messages."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", "/api/stream", headers=headers or {})
    res = conn.getresponse()
    assert res.status == 200, res.status
    messages, kind, end = [], None, time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            line = res.fp.readline().decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                messages.append({"event": kind, **json.loads(line[6:])})
                if until(messages):
                    return messages
    finally:
        conn.close()
    raise AssertionError(f"stream: condition not met in {timeout}s: {messages}")


XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
LOUD_TRAIN_LINES = (  # what the "loud" experiment's run prints: HTML, script, colours, a progress bar
    'print("\\x1b[1;31mwarning\\x1b[0m <b>bold</b> ' + XSS.replace('"', '\\"') + '")\n'
    'print("step 1 | loss 3.5000\\rstep 2 | loss 2.2500")\n'
)


def build_lab(root: Path) -> Path:
    """A workspace with a real history: baseline, kept, discarded (with HTML in its description and its
    output), crashed, kept, discarded. Made by the real daemon, in-process, with scripted proposals."""
    import structlog

    from autoresearch.daemon import Daemon
    from daemon_fixtures import TRAIN, ScriptedProposer, make_workspace

    make_workspace(root, slots={"lookahead": 0})  # each proposal from the latest best: a known story
    better = TRAIN.replace("LEARNING_RATE = 0.04", "LEARNING_RATE = 0.1")
    loud = better.replace("WIDTH = 64", "WIDTH = 40").replace('print("training...")\n',
                                                                'print("training...")\n' + LOUD_TRAIN_LINES)

    def edit(text: str, description: str):
        def apply(ctx):  # edits the worktree like an agent CLI, and says what it tried
            (ctx.workspace / "train.py").write_text(text)
            return description
        return apply

    crash = better.replace('print("training...")', 'print("\\x1b[31mboom\\x1b[0m"); sys.exit(3)')
    best = better.replace("WIDTH = 64", "WIDTH = 128")
    worse = best.replace("WARMUP = 0.1", "WARMUP = 0.9")
    script = ScriptedProposer([edit(better, "LEARNING_RATE 0.04 -> 0.1"), edit(loud, "WIDTH 64 -> 40 " + XSS),
                               edit(crash, "print a coloured message, then exit 3"),
                               edit(best, "WIDTH 64 -> 128"), edit(worse, "WARMUP 0.1 -> 0.9")])
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    Daemon(root, max_experiments=5, proposer_factory=lambda cfg, kind=None: script).run()
    return root
