"""A fake Anthropic Messages API on loopback, for driving the real `anthropic` SDK in tests.

    with FakeAnthropic() as api:
        api.push(tool_reply(editor("view", path="train.py")),
                 tool_reply(finish("try a bigger LR")))
        env = {"ANTHROPIC_BASE_URL": api.url, ...}   # or anthropic.Anthropic(base_url=api.url)
        ...
        api.requests[0].body["messages"]            # what the client sent

GET /v1/models/<id> answers from `models` (id -> a ModelInfo body, see `model_info`;
pre-filled with a current, a deprecated and a retired model), 404 for any other id;
those requests are recorded in `model_requests`, apart from the Messages API's.

Each POST /v1/messages takes the next scripted item from a queue. An item is a
`Reply` (status, JSON body, headers, optional delay, or `drop=True` to close
the socket without answering) or a callable ``f(request) -> Reply`` that can
look at the conversation so far (handy for end-to-end tests: see
`tweak_constant`). When the queue is empty, `default` (a callable) answers, or a
500 that names the problem. Every request is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_ids = itertools.count(1)


@dataclass
class Reply:
    status: int = 200
    body: dict | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a reply slower than the client's timeout)
    drop: bool = False  # close the connection without any response


@dataclass
class Request:
    path: str
    headers: dict  # lower-cased names
    body: dict
    at: float = 0.0  # time.monotonic() when it arrived

    @property
    def api_key(self) -> str | None:
        """The key the client sent (x-api-key, or a Bearer token in newer SDKs)."""
        auth = self.headers.get("authorization", "")
        return self.headers.get("x-api-key") or (auth[7:] if auth.startswith("Bearer ") else None)

    def text(self, index: int = -1) -> str:
        """The text of message `index` (a string, or its text blocks joined)."""
        content = self.body["messages"][index]["content"]
        if isinstance(content, str):
            return content
        return "\n".join(b.get("text", "") for b in content if b.get("type") == "text")

    def tool_results(self) -> list[dict]:
        """The tool_result blocks of the last user message."""
        last = self.body["messages"][-1]
        content = last["content"] if isinstance(last["content"], list) else []
        return [b for b in content if b.get("type") == "tool_result"]


def usage(input_tokens=100, output_tokens=20, cache_read=0, cache_write=0) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write}


def tool_use(name: str, input: dict, id: str | None = None) -> dict:
    return {"type": "tool_use", "id": id or f"toolu_{next(_ids):04d}", "name": name, "input": input}


def editor(command: str, **args) -> dict:
    """A str_replace_based_edit_tool call, e.g. editor("str_replace", path=..., old_str=..., new_str=...)."""
    return tool_use("str_replace_based_edit_tool", {"command": command, **args})


def finish(description: str) -> dict:
    return tool_use("finish", {"description": description})


def message(content: list[dict], stop_reason: str = "end_turn", use: dict | None = None,
            model: str = "claude-fake") -> dict:
    return {"id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": use or usage()}


def tool_reply(*calls: dict, text: str | None = None, use: dict | None = None) -> Reply:
    """A 200 reply whose content is optional text then the given tool_use blocks."""
    content = ([{"type": "text", "text": text}] if text else []) + list(calls)
    return Reply(body=message(content, "tool_use", use))


def text_reply(text: str, use: dict | None = None) -> Reply:
    return Reply(body=message([{"type": "text", "text": text}], "end_turn", use))


def error_reply(status: int, kind: str = "api_error", msg: str = "fake error",
                headers: dict | None = None) -> Reply:
    """An error in the API's shape: {"type": "error", "error": {"type": ..., "message": ...}}."""
    return Reply(status=status, body={"type": "error", "error": {"type": kind, "message": msg}},
                 headers=dict(headers or {}))


def tweak_constant(path: str = "train.py") -> Callable[[Request], Reply]:
    """A scripted "model" for end-to-end tests: each new proposal gets ONE reply that
    changes one UPPERCASE numeric constant of `path` (read from the prompt's copy of the
    current file; a different constant per experiment) and calls finish.

        api.default = tweak_constant()   # answers any number of experiments
    """
    def respond(req: Request) -> Reply:
        prompt = req.text(0)
        n = int(re.search(r"^# Experiment (\d+)", prompt, re.M).group(1))
        block = re.search(r"^## Current `" + re.escape(path) + r"`.*?\n\n(`{3,})\n(.*?)^\1$",
                          prompt, re.M | re.S)
        lines = list(re.finditer(r"^([A-Z][A-Z0-9_]*) = ([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\b.*$",
                                 block.group(2) if block else "", re.M))
        if not lines:
            return text_reply("I see no constant to change.")
        m = lines[n % len(lines)]
        new = float(m.group(2)) * (0.5 if n % 2 else 2.0)
        value = str(int(new)) if m.group(2).isdigit() else repr(new)
        old_line = m.group(0)
        new_line = f"{m.group(1)} = {value}" + old_line[m.end(2) - m.start(0):]
        return tool_reply(editor("str_replace", path=path, old_str=old_line, new_str=new_line),
                          finish(f"{m.group(1)} {m.group(2)} -> {value}"))
    return respond


def model_info(id: str, lifecycle: str = "active", deprecated_at: str | None = None,
               retires_at: str | None = None) -> dict:
    """A Models API ModelInfo body (dates as YYYY-MM-DD)."""
    def stamp(day):
        return f"{day}T00:00:00Z" if day else None

    return {"type": "model", "id": id, "display_name": id.replace("-", " ").title(),
            "created_at": "2026-01-01T00:00:00Z", "lifecycle": lifecycle,
            "deprecated_at": stamp(deprecated_at), "retires_at": stamp(retires_at)}


def default_models() -> dict[str, dict]:
    return {m["id"]: m for m in (
        model_info("claude-sonnet-5-5"),
        model_info("claude-sonnet-4-5", "deprecated", "2026-08-01", "2026-11-30"),
        model_info("claude-3-7-sonnet-20250219", "retired", "2025-10-28", "2026-02-19"),
    )}


class FakeAnthropic:
    def __init__(self):
        self.queue: deque = deque()
        self.requests: list[Request] = []
        self.models: dict[str, dict] = default_models()
        self.model_requests: list[Request] = []
        self.default: Callable[[Request], Reply] | None = None
        self.errors: list[str] = []  # problems of the fake itself (unscripted requests)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, {}, time.monotonic())
                fake.model_requests.append(req)
                prefix = "/v1/models/"
                info = fake.models.get(self.path[len(prefix):].split("?")[0]) if self.path.startswith(prefix) else None
                reply = Reply(body=info) if info else error_reply(404, "not_found_error", f"model: {self.path}")
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                              time.monotonic())
                reply = fake._next(req)
                if reply.delay and fake._stop.wait(reply.delay):
                    return
                if reply.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                payload = json.dumps(reply.body or {}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.send_header("request-id", f"req_{next(_ids):06d}")
                    for k, v in reply.headers.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout) before the slow reply
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="fake-anthropic")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def push(self, *items) -> "FakeAnthropic":
        with self._lock:
            self.queue.extend(items)
        return self

    def _next(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            item = self.queue.popleft() if self.queue else self.default
        if item is None:
            self.errors.append(f"unscripted request #{len(self.requests)}")
            return error_reply(500, msg="fake: no scripted reply left")
        return item(req) if callable(item) else item

    def start(self) -> "FakeAnthropic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def fake_api_for_sdk(monkeypatch, key: str):
    """A running FakeAnthropic that the SDK in this process talks to with ``key``.

    On exit, checks that the code under test sent no request beyond the script.
    """
    with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        yield fake
        assert fake.errors == [], "the proposer sent more requests than scripted"
