"""One training run: its own process group, a scrubbed environment, an optional
sandbox, a size-capped log, a hard deadline, and the metric read from its output.

Threads, per run:
  * a reader drains the child's stdout+stderr pipe into ``runs/<N>.log`` (up to
    ``log_max_bytes``, then it keeps draining without writing), keeps a tail
    buffer and scans complete lines for the metric/memory regexes (so the
    metric is found even past the cap);
  * a watcher enforces the hard deadline and the memory limit, escalates
    SIGTERM -> SIGKILL, and, once the leader has exited, kills whatever is left
    of its process group before reaping it (a zombie leader keeps the pgid
    reserved, so the group id cannot have been reused by then): the group's part
    is procgroup.GroupSupervisor, shared with the command proposer.
``poll()`` only reads what those threads produced: it never blocks.

Sandbox (``mode = "auto"`` on Linux; ``"off"`` = none of this, but the env is
still scrubbed and the run still gets its own process group):
  * network: ``unshare --net`` (as root), ``unshare --net --map-root-user``
    (unprivileged user namespace) or ``unshare --user --net`` (root without
    capabilities, as in the system unit) gives the run a private network namespace:
    its own loopback (brought up, so a workload may talk to itself) and no
    route anywhere else -- not even to the host's 127.0.0.1. Everything in the
    chain execs, so the run keeps its PID and process group. Probed once per
    process; where the kernel refuses, the run has the host network and
    ``sandbox["network"]`` says "host". (Filesystem unix sockets stay reachable: a
    network namespace does not hide /run/*.sock; abstract ones are hidden.)
  * file size: RLIMIT_FSIZE = max_file_mb (a bigger write fails with EFBIG).
  * processes: RLIMIT_NPROC counts *all* tasks (threads too) of the real user,
    not just this run, so the limit is the user's current task count +
    max_processes (headroom, not an absolute cap). The kernel does not enforce
    it for root; ``sandbox["max_processes"]`` is None then.
  * memory: not RLIMIT_AS (CUDA reserves huge virtual ranges) nor RLIMIT_DATA
    (counts the same private mappings). The watcher sums the resident memory of
    the group every 0.2 s (statm RSS; over the limit it re-measures with PSS
    from smaps_rollup so pages shared by forked workers count once) and SIGKILLs
    the group with ``killed="memory"`` above memory_mb (0 = 90 % of MemTotal, or of
    our cgroup's memory limit when lower).
  Limits are applied with util-linux ``prlimit`` (which execs the command, so no
  Python code runs between fork and exec); without it, a preexec_fn.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import sandbox, sanitize
from .config import SandboxConfig
from .procgroup import GroupSupervisor, killpg
from .secrets import SECRET_NAME

GRACE_S = 3.0  # SIGTERM -> SIGKILL
TAIL_BYTES = 64 * 1024  # output kept in memory for the recorded tail
RECORDED_TAIL_CHARS = 8000  # RunResult.log_tail
WATCH_INTERVAL_S = 0.05
MEMORY_CHECK_INTERVAL_S = 0.2
DRAIN_AFTER_EXIT_S = 1.0  # a pipe still held open by an escaped process stops blocking us after this

# ---------------------------------------------------------------------- environment
# Allow-list, then deny-list. An allow-list because a run must not see
# credentials we cannot name in advance (DATABASE_URL, GITHUB_PAT, ...); the
# names below are what a training run legitimately needs (locale, temp dirs,
# the Python/venv setup, GPU selection and tuning, thread counts).
_KEEP_NAMES = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR",
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUTF8", "PYTHONIOENCODING", "VIRTUAL_ENV",
    "CONDA_PREFIX", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    # CA bundles: public certificates, needed by a workload that downloads data.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
}
_KEEP_PREFIXES = ("LC_", "XDG_", "CUDA_", "NVIDIA_", "NCCL_", "CUDNN_", "TORCH_", "PYTORCH_",
                  "TRITON_", "HIP_", "ROCM_", "HSA_", "MPS_", "HF_", "AUTORESEARCH_")
# Proxies are left out on purpose: their URLs often embed user:password.
# Even an allowed prefix never passes secret-named ones (SECRET_NAME: AUTORESEARCH_API_KEY, HF_TOKEN).


def scrubbed_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a run gets: allow-listed names minus anything secret-looking.

    Dropped by construction: *_API_KEY, *_TOKEN, CREDENTIALS_DIRECTORY,
    NOTIFY_SOCKET, WATCHDOG_*, LISTEN_* (systemd's channels belong to the
    daemon), AWS_*/GOOGLE_*/..., proxies, anything not named above.
    """
    env = {
        k: v for k, v in base.items()
        if (k in _KEEP_NAMES or k.startswith(_KEEP_PREFIXES)) and not SECRET_NAME.search(k)
    }
    env.setdefault("PATH", os.defpath)
    env["PYTHONUNBUFFERED"] = "1"  # so the log shows progress as it happens
    return env


# ---------------------------------------------------------------------- metrics
def parse_metric(text: str, regex: str) -> float | None:
    """Last match of ``regex`` (MULTILINE) in ``text`` -> float; nan/inf allowed; else None.

    Group 1 is the value (the whole match if the regex has no group). If the
    last match does not parse, the result is None: an earlier value is not used.
    """
    last = None
    for m in re.finditer(regex, text, re.MULTILINE):
        last = m
    return _match_value(last)


def _match_value(m: re.Match | None) -> float | None:
    if m is None:
        return None
    raw = m.group(1) if m.re.groups else m.group(0)
    try:
        return float(raw.strip())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- sandbox
_netns_lock = threading.Lock()
_netns_prefix: list[str] | None = None
_netns_probed = False


def netns_prefix() -> list[str] | None:
    """argv prefix that puts a command in a private network namespace, or None.

    Probed once (the answer cannot change while we run); a probe costs ~10 ms.
    """
    global _netns_prefix, _netns_probed
    with _netns_lock:
        if _netns_probed:
            return _netns_prefix
        _netns_probed = True
        unshare = shutil.which("unshare")
        if sys.platform.startswith("linux") and unshare:
            tries = [[unshare, "--net"], [unshare, "--net", "--map-root-user"]]
            if os.geteuid() != 0:
                tries.reverse()
            # Root without capabilities (the system unit's empty CapabilityBoundingSet=): the
            # kernel refuses to map uid 0 into a user namespace without CAP_SETFCAP, but an
            # unmapped one still owns a new network namespace. Inside, ids show as nobody;
            # file access is still checked against the real uid.
            tries.append([unshare, "--user", "--net"])
            for prefix in tries:
                try:
                    ok = subprocess.run(prefix + ["true"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        timeout=10).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    _netns_prefix = prefix
                    break
        return _netns_prefix


# Runs inside the new network namespace, then execs the command (same PID, same
# group). Bringing the namespace's own loopback up lets a workload talk to itself
# on 127.0.0.1 (e.g. torch.distributed's rendezvous) while the host stays unreachable.
_LOOPBACK_UP = """
import _socket, fcntl, os, sys  # _socket, not socket: the full module doubles start-up time
try:
    s = _socket.socket(2, 2)  # AF_INET, SOCK_DGRAM: any socket will do for the ioctl
    req = b"lo".ljust(40, b"\\0")  # struct ifreq: name[16] + flags (short) + padding
    flags = int.from_bytes(fcntl.ioctl(s.fileno(), 0x8913, req)[16:18], sys.byteorder)
    up = b"lo".ljust(16, b"\\0") + (flags | 1).to_bytes(2, sys.byteorder)  # IFF_UP
    fcntl.ioctl(s.fileno(), 0x8914, up.ljust(40, b"\\0"))  # SIOCGIFFLAGS / SIOCSIFFLAGS
    s.close()
except OSError:
    pass
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as e:
    sys.stderr.write(f"cannot start {sys.argv[1]}: {e.strerror}\\n")
    sys.exit(127)
"""


def mem_total_mb() -> int:
    """Memory available to us: MemTotal, or our cgroup's limit when that is lower.

    In a container the cgroup limit is what the OOM killer enforces, and it may
    pick the daemon; the run's limit must trip before it does.
    """
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    limit = _cgroup_memory_limit_mb()
    return min(total, limit) if total and limit else total or (limit or 0)


def _cgroup_memory_limit_mb() -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    candidates = []
    for hid, controllers, path in (l for l in lines if len(l) == 3):
        if hid == "0" and controllers == "":  # cgroup v2
            candidates += [f"/sys/fs/cgroup{path.rstrip('/')}/memory.max", "/sys/fs/cgroup/memory.max"]
        elif "memory" in controllers.split(","):  # cgroup v1
            candidates += [f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes",
                           "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    for path in candidates:
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:  # "max" / ~2**63 mean no limit
            return int(raw) // 2**20
    return None


def _user_task_count(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) owned by real uid."""
    count = 0
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                uid_ok = threads = None
                for line in f:
                    if line.startswith("Uid:"):
                        uid_ok = int(line.split()[1]) == uid
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
                        break
            if uid_ok and threads:
                count += threads
        except (OSError, ValueError, IndexError):
            continue
    return count


def _plan_sandbox(spec: SandboxConfig, layout: sandbox.Layout | None,
                  cwd: Path) -> tuple[sandbox.Plan, list[str], list[tuple[int, int]], dict]:
    """(plan, argv prefix, rlimits, record of what is applied) for this run.

    ``layout`` None: the run sees ``cwd`` as its checkout (sandbox.Layout's defaults)."""
    if spec.mode == "off" or not sys.platform.startswith("linux"):
        why = "sandbox.mode = off" if spec.mode == "off" else f"no sandbox on {sys.platform}"
        return sandbox.Plan("off", why), [], [], {
            "kind": "off", "why": why, "mode": spec.mode, "network": "host", "memory_mb": None,
            "max_processes": None, "nproc_rlimit": None, "max_file_mb": None}
    plan = sandbox.plan(spec.mode, layout or sandbox.Layout(checkout=Path(cwd)))
    if plan.kind == "bwrap":
        prefix, network = list(plan.prefix), "isolated"  # its own loopback, nothing else
    else:
        prefix = list(netns_prefix() or [])
        if prefix:
            prefix += [sys.executable, "-I", "-S", "-c", _LOOPBACK_UP]
        network = "isolated" if prefix else "host"
    limits = [(resource.RLIMIT_FSIZE, spec.max_file_mb * 1024 * 1024)]
    nproc = None
    if os.geteuid() != 0 and spec.max_processes > 0:
        nproc = _user_task_count(os.getuid()) + spec.max_processes
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        if hard != resource.RLIM_INFINITY:
            nproc = min(nproc, hard)
        limits.append((resource.RLIMIT_NPROC, nproc))
    memory_mb = spec.memory_mb or int(mem_total_mb() * 0.9)
    record = {
        "kind": plan.kind,  # bwrap | fallback
        "why": plan.why,  # why not bwrap ("" under bwrap)
        "mode": spec.mode,
        "network": network,
        "memory_mb": memory_mb or None,
        # Under bwrap: every task in the run's PID namespace, counted by the watcher (root too).
        # In the fallback: the absolute RLIMIT_NPROC; None as root (not enforced).
        "max_processes": (spec.max_processes or None) if plan.kind == "bwrap" else nproc,
        "nproc_rlimit": nproc,  # RLIMIT_NPROC given to the run (None as root: not enforced)
        "max_file_mb": spec.max_file_mb,
    }
    return plan, prefix, limits, record


def _limits_argv(limits: list[tuple[int, int]]) -> list[str] | None:
    prlimit = shutil.which("prlimit")
    if not prlimit or not limits:
        return None
    names = {resource.RLIMIT_FSIZE: "--fsize", resource.RLIMIT_NPROC: "--nproc"}
    return [prlimit] + [f"{names[r]}={v}" for r, v in limits] + ["--"]


# ---------------------------------------------------------------------- /proc helpers
def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, start ticks) of pid from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces: split after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return rest[0].decode(), int(rest[2]), int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_start_ticks(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (/proc/<pid>/stat field 22)."""
    st = _stat(pid)
    return st[2] if st else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    out = []
    for pid in _pids():
        st = _stat(pid)
        if st and st[1] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def ns_members(pidns: str) -> list[int]:
    """Processes (zombies included) in the PID namespace ``pidns`` ("pid:[inode]")."""
    out = []
    for pid in _pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == pidns:
                out.append(pid)
        except OSError:  # gone, or not ours to inspect
            continue
    return out


def _task_count(pids: list[int]) -> int:
    """Tasks (threads included) of ``pids``: what a process limit counts."""
    count = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            count += int(data[data.rfind(b")") + 2:].split()[17])
        except (OSError, ValueError, IndexError):
            continue
    return count


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _group_rss_mb(pids: list[int]) -> float:
    rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return rss / 2**20


def _group_pss_mb(pids: list[int]) -> float:
    pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return pss / 2**20


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True


def kill_stale_group(pgid: int, start_ticks: int | None) -> bool:
    """Kill what is left of a run started by a previous daemon; True if anything was signalled.

    Linux never hands out a PID that is still in use as a process-group id, so:
      * the leader (pid == pgid) is alive with the recorded start ticks -> it is our run:
        SIGKILL the group;
      * a live process with that PID but other start ticks -> our group is gone
        entirely and this is an unrelated process: touch nothing;
      * no such PID -> any process still in group pgid is an orphan of our run: kill them.
    Without recorded ticks a live leader cannot be verified, so only orphans are killed.
    Waits (up to 5 s) until the group is gone.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        return False
    leader = _stat(pgid)
    if leader is not None and leader[0] not in ("Z", "X"):
        if start_ticks is None or leader[2] != start_ticks or leader[1] != pgid:
            return False
        signalled = killpg(pgid, signal.SIGKILL)
    else:
        signalled = False
        for pid in group_members(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
                signalled = True
            except (ProcessLookupError, PermissionError):
                pass
    if signalled:
        _wait_group_gone(pgid, 5.0)
    return signalled


# ---------------------------------------------------------------------- the run
@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None when ended by a signal
    signal: int | None
    timed_out: bool
    killed: str | None  # "deadline" | "memory" | the reason given to kill() | None
    metric: float | None
    memory_gb: float | None
    duration_s: float
    log_path: str
    log_tail: str
    log_truncated: bool
    sandbox: dict = field(default_factory=dict)
    where: dict = field(default_factory=dict)  # a remote run: node id, address, GPU ids ({} here)
    # Why the run's result never came (its node or worker died, the head became unreachable):
    # not the run's fault, so the experiment is interrupted and run again, not judged.
    lost: str = ""

    @property
    def ok(self) -> bool:
        """Clean exit with a finite metric (anything else is a crash)."""
        return (self.exit_code == 0 and self.killed is None and self.metric is not None
                and math.isfinite(self.metric))


class Run:
    """A started run. Create with :meth:`start`; call :meth:`poll` until it returns a result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._result: RunResult | None = None
        self._sup: GroupSupervisor | None = None  # deadline, stop requests, escalation (procgroup)
        self._error: str | None = None  # the watcher's own failure, when it had one
        self._tail = bytearray()
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._metric_m: re.Match | None = None
        self._memory_m: re.Match | None = None
        self._written = 0
        self._truncated = False
        self._log_error: str | None = None
        self._leader_done = threading.Event()
        self._reader_done = threading.Event()
        self._wake = threading.Event()  # EOF or kill(): the watcher looks now, not at its next tick
        self._done = threading.Event()
        # Called (from the watcher thread) once the result is ready: the owner's wake-up. Set it
        # after start() and then look at poll(): a run that never started is over already.
        self.on_end: Callable[[], None] | None = None
        self._bwrap = False
        self._info_fd: int | None = None
        self._info = b""
        self._pidns: str | None = None  # "pid:[inode]" of the run's PID namespace (bwrap)
        self._ns_init: int | None = None  # host pid of that namespace's init
        self._max_tasks: int | None = None

    @classmethod
    def start(
        cls,
        argv: Sequence[str] | str,
        cwd: Path | str,
        log_path: Path | str,
        deadline_s: float,
        log_max_bytes: int,
        sandbox: SandboxConfig,
        layout: sandbox.Layout | None,
        metric_regex: str,
        memory_regex: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> "Run":
        """Launch ``argv`` (a list, or a string split with shlex) in ``cwd``.

        ``sandbox``: the [sandbox] settings (its ``read_only`` paths reach the run through
        ``layout``, what a bubblewrap run sees; None: ``cwd`` as the checkout, nothing hidden).
        ``python``/``python3`` as argv[0] means the daemon's own interpreter.
        ``env`` (default: os.environ) is scrubbed either way. A command that
        cannot be started gives an already-finished run with exit code 127.
        """
        self = cls()
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not argv:
            raise ValueError("empty run command")
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the daemon's own interpreter (its venv)
        self.argv = argv
        self.log_path = str(log_path)
        self.deadline_s = float(deadline_s)
        self.log_max_bytes = int(log_max_bytes)
        self._metric_re = re.compile(metric_regex, re.MULTILINE)
        self._memory_re = re.compile(memory_regex, re.MULTILINE) if memory_regex else None
        plan, prefix, limits, record = _plan_sandbox(sandbox, layout, Path(cwd))
        self.sandbox = record
        self._memory_limit_mb = record["memory_mb"]
        self._bwrap = plan.kind == "bwrap"
        self._max_tasks = record["max_processes"] if self._bwrap else None
        base_env = os.environ if env is None else env
        full_env = scrubbed_env(base_env)
        record["env_dropped"] = sorted(set(base_env) - set(full_env))  # names only, never values
        limit_argv = _limits_argv(limits)
        preexec = None
        if limits and limit_argv is None:
            def preexec() -> None:  # only where util-linux prlimit is missing
                for res, value in limits:
                    resource.setrlimit(res, (value, value))
        if sandbox.mode == "strict" and plan.kind != "bwrap":
            return self._not_started(argv, f"sandbox.mode = strict and no bubblewrap: {plan.why}", record)
        info_r = info_w = None
        if self._bwrap:
            # bwrap reports the run's PID namespace here: the watcher counts and kills by it.
            info_r, info_w = os.pipe()
            prefix = prefix[:-1] + ["--info-fd", str(info_w), "--"]
        cmd = (limit_argv or []) + prefix + argv
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # truncates: the log is THIS run's output only
        self._t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                cmd, cwd=str(cwd), env=full_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=preexec, close_fds=True, pass_fds=(info_w,) if info_w else (),
            )
        except OSError as exc:
            self._log.close()
            return self._not_started(argv, exc.strerror or str(exc), record)
        finally:
            if info_w is not None:
                os.close(info_w)
        self._info_fd = info_r
        self.pid = self.pgid = self._proc.pid
        self.start_time = proc_start_ticks(self.pid)  # /proc start ticks: identifies the leader
        self._sup = GroupSupervisor(self._proc, deadline=self._t0 + self.deadline_s, grace_s=GRACE_S,
                                    send=self._signal)
        self._fd = self._proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        threading.Thread(target=self._read, name=f"run-reader-{self.pid}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"run-watch-{self.pid}", daemon=True).start()
        return self

    def _not_started(self, argv: list[str], why: str, record: dict) -> "Run":
        """No process exists: a failed run, like a shell's 127, with the reason in its log."""
        msg = f"[autoresearch] cannot start {shlex.join(argv)}: {why}\n"
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as f:
            f.write(msg.encode())
        self.pid = self.pgid = 0
        self.start_time = None
        self._result = RunResult(127, None, False, None, None, None, 0.0, self.log_path,
                                 msg, False, record)
        self._done.set()
        return self

    @property
    def start_ticks(self) -> int | None:
        return self.start_time

    # -------------------------------------------------------------- public
    def poll(self) -> RunResult | None:
        """The result once the run is over and its group is gone; None before. Never blocks."""
        return self._result

    def kill(self, reason: str) -> None:
        """SIGTERM the group now; the watcher sends SIGKILL after GRACE_S. Never blocks."""
        if self._sup is not None and self._sup.stop(reason):
            self._wake.set()

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Block until the result is ready (tests and tools; the daemon uses poll)."""
        if self._result is None:
            self._done.wait(timeout)
        return self._result

    # -------------------------------------------------------------- threads
    def _read(self) -> None:
        fd = self._fd
        drain_end = None
        poller = select.poll()  # not select.select: that fails for fd numbers >= 1024
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while True:
                if self._leader_done.is_set() and drain_end is None:
                    drain_end = time.monotonic() + DRAIN_AFTER_EXIT_S
                if drain_end is not None and time.monotonic() >= drain_end:
                    break  # an escaped process still holds the pipe: stop waiting for it
                if not poller.poll(100):
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                self._consume(chunk)
        finally:
            self._finish_lines()
            self._proc.stdout.close()
            self._reader_done.set()
            self._wake.set()  # EOF usually means the leader has exited

    def _write_log(self, data: bytes) -> None:
        if self._log_error:
            return
        try:
            self._log.write(data)
            self._log.flush()
        except OSError as exc:  # disk full, say: stop writing, keep draining the pipe
            self._log_error = exc.strerror or str(exc)
            self._truncated = True

    def _consume(self, chunk: bytes) -> None:
        # Whole lines only: a secret or an escape sequence split across two reads must be
        # seen whole to be redacted or stripped. A runaway line without newline is cut.
        text = self._pending + self._decoder.decode(chunk)
        cut = text.rfind("\n") + 1
        if not cut and len(text) > TAIL_BYTES:
            cut = len(text)
        self._pending = text[cut:]
        if cut:
            self._emit(text[:cut])

    def _emit(self, raw: str) -> None:
        """Log, tail and metric scan of complete lines, as stored: no escapes, no secrets."""
        text = sanitize.clean(raw)
        data = text.encode("utf-8")
        room = self.log_max_bytes - self._written
        if room > 0:
            self._write_log(data[:room])
            self._written += min(room, len(data))
        if len(data) > room and not self._truncated:
            self._truncated = True
            self._write_log(f"\n[autoresearch] log truncated at {self.log_max_bytes} bytes; "
                            "the rest of the output is still read for the metric\n".encode())
        self._tail += data
        if len(self._tail) > TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]
        self._scan(text)

    def _scan(self, text: str) -> None:
        for m in self._metric_re.finditer(text):
            self._metric_m = m
        if self._memory_re is not None:
            for m in self._memory_re.finditer(text):
                self._memory_m = m

    def _finish_lines(self) -> None:
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if rest:
            self._emit(rest)

    def _watch(self) -> None:
        try:
            self._watch_loop()
        except BaseException as exc:  # never leave poll() waiting forever on a dead watcher
            self._signal(signal.SIGKILL)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self._error = f"runner error: {type(exc).__name__}: {exc}"
            self._leader_done.set()
            self._reader_done.wait(5)
            self._finalize(time.monotonic() - self._t0)
            raise

    def _read_info(self, block: bool = False) -> None:
        """Take the run's PID namespace from bwrap's --info-fd report (written before the command starts)."""
        fd = self._info_fd
        if fd is None:
            return
        os.set_blocking(fd, block)
        eof = False
        try:
            while not eof:
                chunk = os.read(fd, 4096)
                self._info += chunk
                eof = not chunk
        except BlockingIOError:
            pass
        except OSError:
            eof = True
        try:
            info = json.loads(self._info)
        except ValueError:
            info = None
        if info is None and not eof:
            return  # not all of it yet
        os.close(fd)
        self._info_fd = None
        if info is not None:
            self._pidns = f"pid:[{info['pid-namespace']}]"
            self._ns_init = int(info["child-pid"])

    def _members(self) -> list[int]:
        """The run's live processes: its process group and, under bwrap, its whole PID namespace
        (a setsid'ed child leaves the group, never the namespace)."""
        members = group_members(self.pgid)
        if self._pidns:
            members += [pid for pid in ns_members(self._pidns) if pid not in members
                        and (_stat(pid) or ("Z",))[0] not in ("Z", "X")]
        return members

    def _signal(self, sig: int) -> None:
        if self._pidns is None or sig == signal.SIGKILL:
            killpg(self.pgid, sig)
        if self._pidns is None:
            return
        # A polite signal goes to the run's own processes, not to bwrap (which would die of it
        # and take the namespace down at once, with no grace for the run).
        if sig == signal.SIGKILL and self._ns_init:
            try:  # the namespace's init: when it dies the kernel kills everything inside
                os.kill(self._ns_init, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in ns_members(self._pidns):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _watch_loop(self) -> None:
        sup = self._sup
        next_mem = 0.0
        while True:
            if self._info_fd is not None:
                self._read_info()  # before any signal: it says where a polite one must go
            if sup.tick():  # the deadline and the escalation; True once the leader has exited
                break
            now = time.monotonic()
            if sup.reason is None and self._max_tasks and self._pidns:
                if _task_count(ns_members(self._pidns)) > self._max_tasks:
                    sup.stop("processes", signal.SIGKILL)  # a fork bomb gets no grace
            if sup.reason is None and self._memory_limit_mb and now >= next_mem:
                next_mem = now + MEMORY_CHECK_INTERVAL_S
                if self._over_memory():
                    sup.stop("memory", signal.SIGKILL)  # no grace: the machine is at risk
            # After EOF the leader is normally exiting: look again soon, not at the next tick.
            self._wake.wait(0.002 if self._reader_done.is_set() else WATCH_INTERVAL_S)
            self._wake.clear()
        duration = time.monotonic() - self._t0
        if self._info_fd is not None:
            self._read_info(block=True)
        # The leader is gone: children that outlived it must not survive (then it is reaped).
        sup.finish(self._members)
        self._leader_done.set()
        self._reader_done.wait()
        self._finalize(duration)

    def _over_memory(self) -> bool:
        members = self._members()
        if _group_rss_mb(members) <= self._memory_limit_mb:
            return False
        # RSS double-counts pages shared by forked workers; PSS splits them fairly.
        return _group_pss_mb(members) > self._memory_limit_mb

    def _finalize(self, duration: float) -> None:
        rc = self._proc.returncode
        if rc is None:
            exit_code, sig = None, None
        elif self._bwrap and rc > 128:  # bwrap reports its command's death by signal N as 128 + N
            exit_code, sig = None, rc - 128
        else:
            exit_code, sig = (rc, None) if rc >= 0 else (None, -rc)
        killed = self._sup.reason or self._error
        try:
            how = f"exit code {exit_code}" if sig is None else f"signal {signal.Signals(sig).name}"
        except ValueError:
            how = f"signal {sig}"
        if killed:
            how += f", killed: {killed}"
        if self._log_error:
            how += f"; log incomplete: {self._log_error}"
        trailer = f"\n[autoresearch] run ended after {duration:.1f}s ({how})\n"
        self._write_log(trailer.encode())
        try:
            self._log.close()
        except OSError:
            pass
        metric = _match_value(self._metric_m)
        mem = _match_value(self._memory_m)
        tail = self._tail.decode("utf-8", "replace")[-RECORDED_TAIL_CHARS:]
        if killed:
            tail += trailer
        result = RunResult(
            exit_code=exit_code, signal=sig, timed_out=killed == "deadline", killed=killed,
            metric=metric, memory_gb=None if mem is None else mem / 1024.0,
            duration_s=duration, log_path=self.log_path, log_tail=tail,
            log_truncated=self._truncated, sandbox=self.sandbox,
        )
        with self._lock:
            self._result = result
        self._done.set()
        on_end = self.on_end
        if on_end is not None:
            try:
                on_end()
            except Exception:  # the owner's hook must not leave the run unfinished
                pass


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process group whose members carry run tag ``tag`` or ``tag.<anything>``.

    Runs are started with AUTORESEARCH_RUN_TAG=<workspace tag>.<n> and children inherit
    it, so after a crash this finds a run (and whatever it forked) even when the daemon
    died before it could learn the run's process group: the workspace's tag finds every
    run of the workspace, "<workspace tag>.<n>" one experiment's. Waits (up to 5 s in all)
    until those groups are gone.
    """
    if not tag:
        raise ValueError("kill_tagged needs a tag (an empty one would match every tagged run)")
    var = f"\0AUTORESEARCH_RUN_TAG={tag}".encode()
    own = os.getpgrp()
    groups = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"  # each variable between NULs: whole names only
            if var + b"\0" in environ or var + b"." in environ:
                groups.add(os.getpgid(int(entry)))
        except (OSError, ProcessLookupError):
            continue
    killed = []
    for pgid in groups - {own}:
        if killpg(pgid, signal.SIGKILL):
            killed.append(pgid)
    end = time.monotonic() + 5.0  # gone before a re-run may start in the same checkout
    for pgid in killed:
        _wait_group_gone(pgid, max(0.0, end - time.monotonic()))
    return killed
