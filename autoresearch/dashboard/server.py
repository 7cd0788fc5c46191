"""The dashboard's web server: Starlette on uvicorn, read-only, live through server-sent events.

One background task (the Hub) follows the event log (a short read-only query every
POLL_S) and the log of the run in flight, folds what is new, and pushes the changes to
every open page as server-sent events. Pages fetch one snapshot on load and apply the
pushed changes; they never poll.

Routes (GET and HEAD only; any other method is refused on every path):
  /                     the page (static/index.html; the experiment page is #/exp/N)
  /static/...           its script and styles
  /api/summary          header, every experiment's row, the timeline, the latest events
  /api/experiments/N    one experiment: diff (highlighted), reason, metrics, log tail, events
  /api/stream           server-sent events: "update" (new events: what changed), "run" (the run's latest
                        loss), "header" (the daemon's process came or went), "reset" (start over)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import config as config_mod
from ..errors import SystemRefusedError, UserError
from . import auth, views
from .. import progress
from .source import LogReader, daemon_pid, git_diff, run_log_path

STATIC = Path(__file__).with_name("static")
POLL_S = 0.25  # how often the log is read for new events (the page shows them within 2 s)
RUN_POLL_S = 1.0  # how often the run in flight's log is looked at for its latest loss
RECENT_EVENTS = 60
KEEPALIVE_S = 15.0
QUEUE_MAX = 256
DEFAULT_LISTEN = "127.0.0.1:8765"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]


class Hub:
    """The log's fold, kept current, and the pages listening for changes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state_dir = self.root / ".autoresearch"
        self.reader = LogReader(self.state_dir)
        self.daemon_events: list = []
        self.recent: list = []
        self.subscribers: set[asyncio.Queue] = set()
        self._rows: dict[int, dict] = {}
        self._loss: dict[int, float | None] = {}
        self._run_seen: dict[Path, tuple[int, int]] = {}
        self._cfg: tuple[float, config_mod.Config] | None = None
        self._pid: tuple[float, int | None] = (0.0, None)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- what the pages get

    def config(self) -> config_mod.Config:
        """The workspace's config, re-read when the file changes; defaults while it is unreadable."""
        try:
            mtime = (self.root / config_mod.CONFIG_NAME).stat().st_mtime
        except OSError:
            mtime = -1.0
        if self._cfg is None or self._cfg[0] != mtime:
            try:
                cfg = config_mod.load(self.root)
            except UserError:
                cfg = self._cfg[1] if self._cfg else config_mod.Config()
            self._cfg = (mtime, cfg)
        return self._cfg[1]

    def pid(self) -> int | None:
        now = time.monotonic()
        if now - self._pid[0] > 1.0:
            self._pid = (now, daemon_pid(self.state_dir))
        return self._pid[1]

    def slots(self) -> list[dict[str, Any]]:
        out = []
        for e in self.reader.state.in_flight():  # every experiment in flight, oldest first
            launched = self.reader.launched.get(e.n)
            out.append({"n": e.n, "launched": launched[0] if launched else "", "loss": self._loss.get(e.n),
                        "slot": e.slot if e.state in ("training", "evaluating") else None})
        return out

    def header(self) -> dict[str, Any]:
        cfg = self.config()
        return views.header(self.reader.state, now=time.time(), daemon_pid=self.pid(),
                            boot_time=self.reader.boot_time, budget_s=cfg.run.budget_seconds,
                            slots=self.slots(), direction=cfg.run.direction)

    def rows(self) -> list[dict[str, Any]]:
        return views.experiment_rows(self.reader.state, self.config().run.direction)

    def summary(self) -> dict[str, Any]:
        rows = self.rows()
        self._rows = {r["n"]: r for r in rows}
        return {"workspace": str(self.root), "header": self.header(), "rows": rows,
                "timeline": views.timeline_items(self.daemon_events),
                "events": [views.event_dict(e) for e in self.recent], "now": time.time()}

    def detail(self, n: int) -> dict[str, Any] | None:
        exp = self.reader.state.experiments.get(n)
        if exp is None:
            return None
        diff = git_diff(self.root, exp.parent, exp.commit) if exp.commit and exp.parent else ""
        launched = self.reader.launched.get(n)
        if exp.state == "training" and launched:  # in flight: what it is printing now
            path = run_log_path(self.root, n, launched[1])
            log_text, source = progress.tail(path), f"live: {path.relative_to(self.root)}"
        events = self.reader.events(aggregate=f"experiment:{n}")
        if not (exp.state == "training" and launched):
            finished = [e for e in events if e.trigger == "finish"]  # the fold keeps no tails: memory
            log_text = finished[-1].payload.get("log_tail", "") if finished else ""
            source = "recorded when the run finished" if log_text else ""
        row = next((r for r in self.rows() if r["n"] == n), None)
        return views.experiment_detail(exp, events, diff=diff, log_text=log_text, log_source=source, row=row)

    # -- following the log

    def refresh(self) -> list[dict[str, Any]]:
        """Read what is new; returns the messages to push (none when nothing changed)."""
        events, reset = self.reader.poll()
        if reset:  # the log was replaced (repair): the fold started over, and so do the pages
            self.daemon_events, self.recent, self._rows, self._loss = [], [], {}, {}
        if not events:
            return [{"type": "reset"}] if reset else []
        self.daemon_events += [e for e in events if e.aggregate == "daemon"]
        self.recent = (self.recent + events)[-RECENT_EVENTS:]
        rows = self.rows()
        changed = [r for r in rows if self._rows.get(r["n"]) != r]
        self._rows = {r["n"]: r for r in rows}
        self._pid = (0.0, None)  # a boot or a stop: look again now
        if reset:
            return [{"type": "reset"}]
        timeline = views.timeline_items(self.daemon_events)
        first = events[0].seq
        return [{"type": "update", "seq": self.reader.state.seq, "header": self.header(), "rows": changed,
                 "timeline": [t for t in timeline if t["seq"] >= first],
                 "events": [views.event_dict(e) for e in events[-RECENT_EVENTS:]]}]

    def refresh_run(self) -> list[dict[str, Any]]:
        """The latest loss printed by the run in flight, when its log grew."""
        out = []
        for slot in self.slots():
            launched = self.reader.launched.get(slot["n"])
            exp = self.reader.state.experiments[slot["n"]]
            if not launched or exp.state != "training":
                continue
            path = run_log_path(self.root, slot["n"], launched[1])
            try:
                st = path.stat()
            except OSError:
                continue
            if self._run_seen.get(path) == (st.st_size, st.st_mtime_ns):
                continue
            self._run_seen[path] = (st.st_size, st.st_mtime_ns)
            loss = views.latest_loss(progress.tail(path, 4000))
            if loss is not None and loss != self._loss.get(slot["n"]):
                self._loss[slot["n"]] = loss
                out.append({"type": "run", "n": slot["n"], "loss": loss, "header": self.header()})
        return out

    def end_streams(self) -> None:
        """The server is stopping: every open stream ends (a page's stream would otherwise hold the
        shutdown until uvicorn cancels it, with a traceback)."""
        for q in list(self.subscribers):
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)

    def publish(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            for q in list(self.subscribers):
                try:
                    q.put_nowait(message)
                except asyncio.QueueFull:  # a page that stopped reading: it starts over
                    while not q.empty():
                        q.get_nowait()
                    q.put_nowait({"type": "reset"})

    def refresh_alive(self) -> list[dict[str, Any]]:
        """The daemon's process came or went (killed, say) with no event to tell: push the header."""
        before = self._pid[1]
        self._pid = (0.0, None)
        if self.pid() != before:
            return [{"type": "header", "header": self.header()}]
        return []

    async def follow(self) -> None:
        next_run = 0.0
        while True:
            messages = self.refresh()
            if time.monotonic() >= next_run:
                messages += self.refresh_run() + self.refresh_alive()
                next_run = time.monotonic() + RUN_POLL_S
            if messages and self.subscribers:
                self.publish(messages)
            await asyncio.sleep(POLL_S)


def _sse(message: dict[str, Any]) -> str:
    data = json.dumps(message, separators=(",", ":"), allow_nan=False)
    head = f"id: {message['seq']}\n" if "seq" in message else ""
    return f"{head}event: {message['type']}\ndata: {data}\n\n"


def build_app(root: Path, *, token_digest: str | None = None, allowed_hosts: set[str] | None = None) -> Starlette:
    hub = Hub(root)
    while hub.refresh():  # the whole log, folded once, before the first page asks
        pass

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def summary(request: Request) -> Response:
        return JSONResponse(hub.summary(), headers={"cache-control": "no-store"})

    async def experiment(request: Request) -> Response:
        n = request.path_params["n"]
        detail = await asyncio.to_thread(hub.detail, n)  # git may take a moment: not on the event loop
        if detail is None:
            return JSONResponse({"error": f"no experiment {n}"}, status_code=404)
        return JSONResponse(detail, headers={"cache-control": "no-store"})

    async def highlight_css(request: Request) -> Response:
        from pygments.formatters import HtmlFormatter

        css = HtmlFormatter(style="default").get_style_defs(".code")
        return Response(css, media_type="text/css", headers={"cache-control": "max-age=3600"})

    async def stream(request: Request) -> Response:
        q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_MAX)
        hub.subscribers.add(q)

        async def events():
            try:
                yield _sse({"type": "hello", "seq": hub.reader.state.seq})
                while True:
                    try:
                        message = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if message is None:
                        return
                    yield _sse(message)
            finally:
                hub.subscribers.discard(q)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        hub.loop = asyncio.get_running_loop()
        task = asyncio.create_task(hub.follow())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            hub.reader.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/summary", summary, methods=["GET"]),
        Route("/api/experiments/{n:int}", experiment, methods=["GET"]),
        Route("/api/stream", stream, methods=["GET"]),
        Route("/highlight.css", highlight_css, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.hub = hub
    return Guard(app, token_digest=token_digest, allowed_hosts=allowed_hosts)


class Guard:
    """Read-only, the token, the Host header, and security headers on every response (pure ASGI,
    so that streaming responses pass through untouched)."""

    def __init__(self, app, *, token_digest: str | None, allowed_hosts: set[str] | None):
        self.app, self.token_digest, self.allowed_hosts = app, token_digest, allowed_hosts

    @property
    def hub(self) -> Hub:
        return self.app.state.hub

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secure(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        request = Request(scope)
        if scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("read-only: this dashboard changes nothing\n", status_code=405,
                                         headers={"allow": "GET, HEAD"})
            return await response(scope, receive, send_secure)
        if self.allowed_hosts is not None:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in self.allowed_hosts:  # DNS rebinding: a foreign name pointing at loopback
                response = PlainTextResponse("unknown host\n", status_code=421)
                return await response(scope, receive, send_secure)
        if self.token_digest is not None:
            given = request.query_params.get("token")
            if given is not None and auth.matches(given, self.token_digest):
                rest = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode())
                                  if k != "token"])
                response = Response(status_code=303, headers={
                    "location": scope["path"] + ("?" + rest if rest else ""), "cache-control": "no-store"})
                response.set_cookie(auth.COOKIE, given, httponly=True, samesite="strict", path="/")
                return await response(scope, receive, send_secure)
            bearer = request.headers.get("authorization", "")
            token = request.cookies.get(auth.COOKIE) or (bearer[7:] if bearer.lower().startswith("bearer ")
                                                          else None)
            if not auth.matches(token, self.token_digest):
                response = PlainTextResponse(
                    "this dashboard needs its token: open it with ?token=... (shown when it was created)\n",
                    status_code=401)
                return await response(scope, receive, send_secure)
        await self.app(scope, receive, send_secure)


# ---------------------------------------------------------------------- serving

def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:8765', '[::1]:8765', 'localhost:0' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8765 or 0.0.0.0:8765")
    return host, int(port)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--listen {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SystemRefusedError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(root: Path, listen: str = DEFAULT_LISTEN, *, token: bool = False, token_file: Path | None = None,
          new_token: bool = False, out=None) -> int:
    """Run the dashboard until interrupted. Prints where it listens (and a new token, once)."""
    import uvicorn

    out = out or sys.stderr
    host, port = parse_listen(listen)
    loopback = auth.is_loopback(host)
    token_digest = None
    if token or not loopback or new_token:
        path = Path(token_file) if token_file else auth.default_token_file(root)
        token_digest = None if new_token else auth.load_digest(path)
        if token_digest is None:
            secret = auth.create(path)
            token_digest = auth.digest(secret)
            print(f"dashboard: new access token (shown this once; its hash is kept in {path}): {secret}", file=out)
        else:
            print(f"dashboard: a token is required (its hash is in {path}); lost it? --new-token makes another",
                  file=out)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    allowed = {"127.0.0.1", "localhost", "::1", host.lower()} if loopback else None
    app = build_app(root, token_digest=token_digest, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    where = "loopback only" if loopback else "reachable from the network; token required"
    print(f"dashboard: http://{shown}:{bound}/ ({where}; read-only) for {root}", file=out, flush=True)
    cfg = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                         lifespan="on", server_header=False)
    hub = app.hub

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C, SIGTERM: end the pages' streams first
            if hub.loop is not None:
                hub.loop.call_soon_threadsafe(hub.end_streams)
            super().handle_exit(sig, frame)

    server = Server(cfg)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
