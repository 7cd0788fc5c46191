"""Runs on a Ray cluster: the daemon, its event log and its git repository stay on this machine.

Imported only when ``[executor] kind = "ray"`` (executor.make): a daemon without the ``ray``
extra never imports Ray.

Each run is one Ray task, a streaming generator pinned to a node we chose
(``NodeAffinitySchedulingStrategy``, soft=False) with ``num_gpus`` from [ray] and
``max_retries=0``: the daemon owns retries through its own events. What the run needs travels
with it: its checkout (RunSpec.cwd, the slot worktree, packed as a size-capped tar) and the
RunSpec. The worker unpacks it into a temporary directory and runs the same ``runner.Run``
(the same sandbox settings, hard deadline and limits) there, and yields the run's log as it
grows; a thread per run here appends it to RunSpec.log_path, so `tail`, `show` and the metric
regex see a remote run as a local one. A training run's checkout comes back when it ends (the
evaluation step reads its outputs), size-capped too.

A run ends in one of three ways:
  * its result (the runner's RunResult, plus ``where``: node id, address, GPU ids);
  * cancelled by us (skip, stop, the daemon-side deadline): ``killed`` says why;
  * lost: the node or the worker died, the head became unreachable: ``lost`` says so, and the
    coordinator interrupts the experiment (not counted against the agent) and runs it again.

Nodes are checked before use, when first seen: the node's autoresearch version must be the
daemon's, and the workload's data is prepared there (once per node: cached, under a lock). A
node that fails either is not used; each verdict is handed to the coordinator (``notes``),
which records it as a daemon ``note`` (kind = "node"), so that `status` and `show` say why.

Capacity: what the usable nodes offer, counted here rather than asked of Ray's scheduler so
that a run never waits in a queue behind another's: ``floor(GPU / num_gpus)`` runs per node,
or one run per node (1 CPU reserved) when ``num_gpus = 0`` (a time-budgeted CPU run should not
share its cores).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import math
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Hashable
from pathlib import Path

import ray
import ray.exceptions as rex
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import __version__, sandbox
from .errors import ClusterUnreachableError
from .config import RayConfig
from .executor import RunInfo, RunSpec
from .runner import GRACE_S, RECORDED_TAIL_CHARS, Run, RunResult, parse_metric, scrubbed_env

VERSION_ENV = "AUTORESEARCH_NODE_VERSION"  # the version a node reports instead of its own (tests)
PACK_MAX_BYTES = 256 * 2**20  # a checkout bigger than this (gzipped) is not shipped
CHUNK_BYTES = 1 << 20  # log bytes per streamed message at most
DAEMON_GRACE_S = 30.0  # past deadline + this, the daemon cancels the task itself (force)
START_TIMEOUT_S = 600.0  # a task not started by then is given up as lost
NODES_EVERY_S = 2.0  # how often the node list is read again
RECHECK_AFTER_S = 10.0  # a node that lost a run but still shows as alive is checked again after this
# Names that describe the machine, not the run: a worker keeps its own.
_MACHINE_ENV = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
                "CONDA_PREFIX", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                "AUTORESEARCH_CACHE_DIR"}


# ---------------------------------------------------------------------- packing
def pack(directory: str | Path, max_bytes: int = PACK_MAX_BYTES) -> bytes:
    """The directory's files as a gzipped tar (its .git link left out); ValueError over max_bytes."""
    buf = io.BytesIO()
    root = Path(directory)
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for entry in sorted(root.iterdir()):
            if entry.name == ".git":
                continue
            tar.add(entry, arcname=entry.name)
            if buf.tell() > max_bytes:
                break
    if buf.tell() > max_bytes:
        raise ValueError(f"{directory} is over {max_bytes // 2**20} MiB packed")
    return buf.getvalue()


def unpack(data: bytes, directory: str | Path, replace: bool = False) -> None:
    """Unpack ``pack``'s output into directory (tarfile's "data" filter: no links out, no
    devices); ``replace``: what was there (but .git) is removed first."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if replace:
        for entry in root.iterdir():
            if entry.name == ".git":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(root, filter="data")


# ---------------------------------------------------------------------- on the worker
def node_version() -> str:
    return os.environ.get(VERSION_ENV) or __version__


def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
            "host": os.uname().nodename, "gpus": [str(g) for g in ray.get_gpu_ids()]}


def _worker_cache_dir() -> Path:
    from .trainer.settings import cache_dir
    return cache_dir().absolute()


def shipped(spec: RunSpec) -> RunSpec:
    """The RunSpec as it leaves this machine: the worker's own interpreter for ours, and only the
    environment a run may see (scrubbed here, before it is pickled into Ray's object store: no API
    key, token or credential of the daemon's travels to the cluster)."""
    argv = list(spec.argv)
    if argv and argv[0] == sys.executable:
        argv[0] = "python"  # the worker's own interpreter (runner.Run maps it)
    return dataclasses.replace(spec, argv=tuple(argv), env=scrubbed_env(spec.env))


def _worker_env(spec_env: dict[str, str]) -> dict[str, str]:
    """This machine's environment, with the run's own settings (its tag, the workload's
    variables) from the daemon's; the GPUs are the ones Ray gave this task."""
    env = dict(os.environ)
    env.update({k: v for k, v in spec_env.items() if k not in _MACHINE_ENV and not k.startswith("XDG_")})
    env["AUTORESEARCH_CACHE_DIR"] = str(_worker_cache_dir())
    return env


def _worker_layout(layout: sandbox.Layout | None, checkout: Path, daemon_cache: str | None) -> sandbox.Layout:
    """The daemon's Layout for this machine: the temporary checkout; the daemon's data cache
    paths mapped to this node's; hidden or read-only only what exists here."""
    if layout is None:
        return sandbox.Layout(checkout=checkout, home=os.environ.get("HOME") or "/tmp/home")
    mine = _worker_cache_dir()

    def here(paths) -> tuple[Path, ...]:
        out = []
        for p in paths:
            p = Path(p)
            if daemon_cache and (p == Path(daemon_cache) or Path(daemon_cache) in p.parents):
                p = mine / p.relative_to(daemon_cache)
            if p.exists():
                out.append(p)
        return tuple(out)

    return sandbox.Layout(checkout=checkout, hide=here(layout.hide), read_only=here(layout.read_only),
                          conceal=here(layout.conceal), writable=layout.writable,
                          home=os.environ.get("HOME") or "/tmp/home")


def remote_run(spec: RunSpec, packed: bytes, bring_back: bool):
    """The task: the run in a temporary checkout, its log yielded as it grows, then its result.

    Messages: {"where"} once started, {"out": bytes} ..., {"checkout": bytes} (bring_back),
    {"result": dict}. Cancelled (KeyboardInterrupt) or dropped: the run is killed before the
    task ends, so that nothing of it outlives the task."""
    tmp = Path(tempfile.mkdtemp(prefix="autoresearch-run-"))
    run = None
    try:
        checkout = tmp / "checkout"
        unpack(packed, checkout)
        log_path = tmp / "run.log"
        argv = list(spec.argv)
        run = Run.start(argv, checkout, log_path, spec.deadline_s, spec.log_max_bytes, spec.sandbox,
                        _worker_layout(spec.layout, checkout, spec.env.get("AUTORESEARCH_CACHE_DIR")),
                        spec.metric_regex, spec.memory_regex, env=_worker_env(spec.run_env()))
        yield {"where": _where()}
        pos = 0
        while True:
            result = run.poll()  # before reading: the log is complete once the result is there
            try:
                with open(log_path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read(CHUNK_BYTES)
            except FileNotFoundError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                yield {"out": chunk}
                continue
            if result is not None:
                break
            time.sleep(0.05)
        if bring_back:
            try:
                yield {"checkout": pack(checkout)}
            except ValueError as exc:
                yield {"out": f"[autoresearch] the run's checkout is not brought back: {exc}\n".encode()}
        yield {"result": dataclasses.asdict(result)}
    finally:  # also on KeyboardInterrupt (ray.cancel) and GeneratorExit
        if run is not None and run.poll() is None:
            run.kill("cancelled")
            run.wait(GRACE_S + 5)
        shutil.rmtree(tmp, ignore_errors=True)


def check_node(prepare_argv: list[str], files: dict[str, bytes], env: dict[str, str]) -> dict:
    """On one node: its version, and the workload's data prepared (once per node: a marker in
    the node's cache directory, written under a lock, says it was done for this config)."""
    out = {"version": node_version(), "python": sys.version.split()[0], "prepared": "", "error": ""}
    if out["version"] != __version__ or not prepare_argv:
        return out
    cache = _worker_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(repr((prepare_argv, sorted(files.items()), __version__)).encode()).hexdigest()[:16]
    marker = cache / f".prepared-{key}"
    with open(cache / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one preparation per node at a time, whoever asks
        if marker.exists():
            out["prepared"] = "cached"
            return out
        with tempfile.TemporaryDirectory(prefix="autoresearch-prepare-") as tmp:
            for rel, data in files.items():
                Path(tmp, rel).write_bytes(data)
            run = Run.start(prepare_argv, tmp, Path(tmp) / "prepare.log", 3600, 1 << 20,
                            sandbox_off(), None, r"^$", env=_worker_env(env))
            result = run.wait()
        if result.exit_code != 0:
            lines = result.log_tail.strip().splitlines()
            out["error"] = f"prepare failed: {lines[-1] if lines else 'exit ' + str(result.exit_code)}"
            return out
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        out["prepared"] = "now"
    return out


def sandbox_off():
    from .config import SandboxConfig
    return SandboxConfig(mode="off")  # preparation may download: as the local prepare_command


# ---------------------------------------------------------------------- on the daemon
def _probe(address: str, timeout: float = 5.0) -> None:
    """An explicit head address must answer (ray.init would retry it for minutes, silently)."""
    if address in ("auto", "local"):
        return  # Ray finds (or starts) the cluster on this machine itself, and says so quickly
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(f"ray.address {address!r}: expected 'auto', 'local', 'HOST:PORT' "
                                      "or 'ray://HOST:PORT'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterUnreachableError(f"ray.address {address!r}: nothing answers at {hostport} "
                                      f"({exc.strerror or exc})") from None


@dataclasses.dataclass
class _Node:
    id: str
    ip: str
    slots: int
    state: str = "checking"  # checking | ready | refused | lost (a run was lost there) | gone
    since: float = 0.0  # when it became lost
    why: str = ""
    check: object = None  # the pending check's ObjectRef


class _Remote:
    """One run seen from the daemon: its task, the thread that writes its log here."""

    def __init__(self, key, spec: RunSpec, node: str, gen, info: RunInfo, wake, grace_s: float):
        self.key, self.spec, self.node, self.gen, self.info = key, spec, node, gen, info
        self.where: dict = {"node_id": node}
        self.started: float | None = None  # monotonic, when the worker said it started
        self.cancel_reason: str | None = None
        self.forced = False
        self.result: RunResult | None = None
        self._wake = wake
        self._grace_s = grace_s
        self.thread = threading.Thread(target=self._follow, name=f"ray-run-{key}", daemon=True)
        self.thread.start()

    @classmethod
    def failed(cls, key, spec: RunSpec, node: str, info: RunInfo, msg: str, wake) -> "_Remote":
        """A run that never left this machine: already over (exit 127, the reason in its log)."""
        self = cls.__new__(cls)
        self.key, self.spec, self.node, self.gen, self.info = key, spec, node, None, info
        self.where, self.started, self.cancel_reason, self.forced = {}, None, None, False
        self.result = RunResult(127, None, False, None, None, None, 0.0, spec.log_path, msg, False, {})
        self.thread = threading.Thread(target=lambda: None)
        self.thread.start()
        if wake is not None:
            wake.set()
        return self

    def _follow(self) -> None:
        result = None
        try:
            with open(self.spec.log_path, "wb") as log:
                while result is None:
                    ready, _ = ray.wait([self.gen], timeout=0.25)
                    if not ready:
                        self._check_deadline()
                        continue
                    try:
                        msg = ray.get(next(self.gen))
                    except StopIteration:
                        raise RuntimeError("the task ended without a result") from None
                    if "where" in msg:
                        self.where, self.started = msg["where"], time.monotonic()
                    elif "out" in msg:
                        log.write(msg["out"])
                        log.flush()
                    elif "checkout" in msg:
                        unpack(msg["checkout"], self.spec.cwd, replace=True)
                    elif "result" in msg:
                        result = RunResult(**{**msg["result"], "log_path": self.spec.log_path,
                                              "where": self.where})
            if self.cancel_reason and result.killed in (None, "cancelled"):
                result = dataclasses.replace(result, killed=self.cancel_reason,
                                             timed_out=self.cancel_reason == "deadline")
        except Exception as exc:  # noqa: BLE001 - every way a remote run ends must give a result
            result = self._ended_by(exc)
        self.result = result
        if self._wake is not None:
            self._wake.set()

    def _check_deadline(self) -> None:
        now = time.monotonic()
        if self.started is None:
            late = now - self.info.started > START_TIMEOUT_S
        else:
            late = now - self.started > self.spec.deadline_s + GRACE_S + self._grace_s
        if late and not self.forced:
            if self.cancel_reason is None:
                self.cancel_reason = "deadline" if self.started is not None else "not started"
            self.forced = True
            ray.cancel(self.gen, force=True)

    def _ended_by(self, exc: Exception) -> RunResult:
        cancelled = isinstance(exc, rex.TaskCancelledError) or (self.forced and isinstance(
            exc, (rex.WorkerCrashedError, rex.TaskCancelledError)))
        if self.cancel_reason and cancelled:
            return self._local_result(killed=self.cancel_reason)
        if isinstance(exc, rex.RayTaskError) and not isinstance(exc, rex.TaskCancelledError):
            # Our own code failed on the worker (cannot unpack, say): a failed run, not a lost node.
            first = str(exc).strip().splitlines()
            why = f"the remote run failed: {type(exc).__name__}: {first[-1] if first else ''}"
            self._append(f"[autoresearch] {why}\n")
            return self._local_result(exit_code=127)
        what = str(exc).strip().splitlines()
        lost = f"{type(exc).__name__}: {what[0][:200] if what else 'no detail'}"
        node = self.where.get("ip") or self.node[:12]
        self._append(f"[autoresearch] run lost on node {node}: {lost}\n")
        return self._local_result(lost=f"lost on node {node} ({lost})")

    def _append(self, text: str) -> None:
        try:
            with open(self.spec.log_path, "ab") as f:
                f.write(text.encode())
        except OSError:
            pass

    def _local_result(self, killed: str | None = None, exit_code: int | None = None, lost: str = "") -> RunResult:
        """A result from what reached this machine's log (the worker's own never came)."""
        try:
            text = Path(self.spec.log_path).read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        return RunResult(exit_code=exit_code, signal=None, timed_out=killed == "deadline", killed=killed,
                         metric=parse_metric(text, self.spec.metric_regex), memory_gb=None,
                         duration_s=time.monotonic() - (self.started or self.info.started),
                         log_path=self.spec.log_path, log_tail=text[-RECORDED_TAIL_CHARS:],
                         log_truncated=False, sandbox={}, where=self.where, lost=lost)


class RayExecutor:
    """The Executor protocol (executor.py) over a Ray cluster."""

    prepares_nodes = True  # the workload's preparation happens per node, in the node check

    def __init__(self, cfg: RayConfig, wake: threading.Event | None = None,
                 prepare: tuple[list[str], dict[str, bytes], dict[str, str]] = ([], {}, {}),
                 grace_s: float = DAEMON_GRACE_S) -> None:
        self.cfg = cfg
        self._wake = wake
        self._prepare = prepare  # (argv, files to run it among, environment)
        self._grace_s = grace_s
        self._runs: dict[Hashable, _Remote] = {}
        self._nodes: dict[str, _Node] = {}
        self._notes: list[dict] = []
        self._closed = False
        self._looked = 0.0
        if not ray.is_initialized():
            _probe(cfg.address)
            try:
                ray.init(address=cfg.address, namespace="autoresearch", log_to_driver=False,
                         logging_level="WARNING", configure_logging=False)
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                detail = str(exc).strip().splitlines()
                raise ClusterUnreachableError(f"ray.address {cfg.address!r}: cannot connect: "
                                              f"{detail[0] if detail else type(exc).__name__}") from None
        self._task = ray.remote(remote_run)
        self._task_options = dict(num_returns="streaming", max_retries=0, num_gpus=cfg.num_gpus,
                                  num_cpus=0 if cfg.num_gpus else 1)
        if cfg.accelerator_type:
            self._task_options["accelerator_type"] = cfg.accelerator_type
        self._check = ray.remote(check_node)
        self._refresh(force=True)

    # ------------------------------------------------------------------ nodes
    def _slots_of(self, resources: dict) -> int:
        if self.cfg.accelerator_type and f"accelerator_type:{self.cfg.accelerator_type}" not in resources:
            return 0
        if self.cfg.num_gpus:
            return int(math.floor(resources.get("GPU", 0) / self.cfg.num_gpus + 1e-9))
        return 1 if resources.get("CPU", 0) >= 1 else 0

    def _refresh(self, force: bool = False) -> None:
        """Read the node list now and then; check new nodes; take the checks that are done."""
        now = time.monotonic()
        if not force and now - self._looked < NODES_EVERY_S:
            self._take_checks()
            return
        self._looked = now
        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - an unreachable head: no new node now; runs report it
            return
        alive = set()
        for n in nodes:
            nid = n["NodeID"]
            if not n.get("Alive"):
                continue
            alive.add(nid)
            node = self._nodes.get(nid)
            if node is None:
                slots = self._slots_of(n.get("Resources", {}))
                if slots <= 0:
                    continue  # offers nothing a run asks for (the head of a GPU cluster, say)
                node = self._nodes[nid] = _Node(nid, n.get("NodeManagerAddress", ""), slots)
                self._start_check(node)
            elif node.state == "lost" and now - node.since >= RECHECK_AFTER_S:
                self._start_check(node)  # still there after all (a worker died, not the node)
        for node in self._nodes.values():
            if node.id not in alive and node.state != "gone":
                node.state, node.check = "gone", None
                self._notes.append({"node": node.id, "ip": node.ip, "usable": False, "reason": "node left the cluster"})
        self._take_checks()

    def _start_check(self, node: _Node) -> None:
        argv, files, env = self._prepare
        node.state = "checking"
        node.check = self._check.options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False)).remote(argv, files, env)

    def _lost_on(self, node_id: str) -> None:
        """A run was lost there: no run goes to that node until it shows it is alive (checked again)."""
        node = self._nodes.get(node_id)
        if node is not None and node.state == "ready":
            node.state, node.since = "lost", time.monotonic()
            self._notes.append({"node": node.id, "ip": node.ip, "usable": False, "slots": node.slots,
                                "reason": "a run was lost there; checked again if it stays in the cluster"})

    def _take_checks(self) -> None:
        pending = [n for n in self._nodes.values() if n.state == "checking" and n.check is not None]
        if not pending:
            return
        ready, _ = ray.wait([n.check for n in pending], num_returns=len(pending), timeout=0)
        for node in pending:
            if node.check not in ready:
                continue
            try:
                out = ray.get(node.check)
            except Exception as exc:  # noqa: BLE001 - the node died while checked, say
                out = {"version": "?", "error": f"check failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            node.check = None
            if out.get("version") != __version__:
                node.state = "refused"
                node.why = f"autoresearch {out.get('version')} on the node, {__version__} here"
            elif out.get("error"):
                node.state, node.why = "refused", out["error"]  # reported once, never retried
            else:
                node.state = "ready"
            note = {"node": node.id, "ip": node.ip, "usable": node.state == "ready", "slots": node.slots,
                    "version": out.get("version"), "prepared": out.get("prepared", "")}
            if node.why:
                note["reason"] = node.why
            self._notes.append(note)

    def notes(self) -> list[dict]:
        """Node verdicts since the last call (the coordinator records them as daemon notes)."""
        out, self._notes = self._notes, []
        return out

    def nodes(self) -> dict[str, dict]:
        return {n.id: {"ip": n.ip, "state": n.state, "slots": n.slots, "why": n.why} for n in self._nodes.values()}

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until no node check is pending (start-up, tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._refresh(force=True)
            if not any(n.state == "checking" for n in self._nodes.values()):
                return
            time.sleep(0.1)

    # ------------------------------------------------------------------ the protocol
    @property
    def slots(self) -> int:
        """Runs the usable nodes take at once."""
        self._refresh()
        return sum(n.slots for n in self._nodes.values() if n.state == "ready")

    def _free_node(self) -> str | None:
        used: dict[str, int] = {}
        for r in self._runs.values():
            used[r.node] = used.get(r.node, 0) + 1
        ready = [n for n in self._nodes.values() if n.state == "ready" and used.get(n.id, 0) < n.slots]
        # The emptiest node first, so that runs spread over the cluster.
        ready.sort(key=lambda n: (used.get(n.id, 0) / n.slots, n.id))
        return ready[0].id if ready else None

    def capacity(self) -> int:
        if self._closed:
            return 0
        return max(0, self.slots - len(self._runs))

    def submit(self, key: Hashable, spec: RunSpec) -> None:
        if self._closed:
            raise RuntimeError(f"run {key!r} submitted after shutdown")
        if key in self._runs:
            raise RuntimeError(f"run {key!r} submitted while it is still running")
        node = self._free_node() if self.capacity() > 0 else None
        if node is None:
            raise RuntimeError(f"run {key!r} submitted beyond capacity")
        started = time.monotonic()
        spec = shipped(spec)
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            packed = pack(spec.cwd)
        except (OSError, ValueError) as exc:
            packed, why = None, str(exc)
        info = RunInfo(started, spec.log_path, spec.gpu, 0, spec.tag)
        bring_back = spec.layout is not None and spec.layout.writable
        if packed is None:  # a run that cannot start is a finished run (as runner.Run's exit 127)
            msg = f"[autoresearch] cannot ship the checkout {spec.cwd}: {why}\n"
            Path(spec.log_path).write_text(msg)
            self._runs[key] = _Remote.failed(key, spec, node, info, msg, self._wake)
            return
        gen = self._task.options(**self._task_options, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(spec, packed, bring_back)
        self._runs[key] = _Remote(key, spec, node, gen, info, self._wake, self._grace_s)

    def poll(self) -> list[tuple[Hashable, RunResult]]:
        done = self._poll_results()
        self._refresh()
        return done

    def cancel(self, key: Hashable, reason: str) -> None:
        run = self._runs.get(key)
        if run is None or run.gen is None or run.result is not None or run.cancel_reason is not None:
            return
        run.cancel_reason = reason
        try:
            ray.cancel(run.gen, force=False)  # KeyboardInterrupt in the task: it kills the run
        except Exception:  # noqa: BLE001 - the head is gone: the run's thread reports it lost
            pass

    def running(self) -> dict[Hashable, RunInfo]:
        return {key: r.info for key, r in self._runs.items()}

    def shutdown(self, reason: str, timeout: float = 10.0) -> list[tuple[Hashable, RunResult]]:
        self._closed = True
        for key in list(self._runs):
            self.cancel(key, reason)
        end = time.monotonic() + timeout
        results: list[tuple[Hashable, RunResult]] = []
        forced = False
        while True:
            results += [(k, r) for k, r in self._poll_results()]
            if not self._runs or time.monotonic() >= end:
                return results
            if not forced and time.monotonic() >= end - max(1.0, timeout / 3):
                forced = True  # a worker that does not end politely is ended by Ray
                for r in self._runs.values():
                    if r.gen is None:
                        continue
                    r.forced = True
                    try:
                        ray.cancel(r.gen, force=True)
                    except Exception:  # noqa: BLE001
                        pass
            time.sleep(0.02)

    def _poll_results(self) -> list[tuple[Hashable, RunResult]]:
        done = [(key, r.result) for key, r in self._runs.items() if r.result is not None]
        for key, result in done:
            if result.lost:
                self._lost_on(self._runs[key].node)
            self._runs[key].thread.join(1.0)
            del self._runs[key]
        return done
