"""runner.py: real subprocesses, real signals, real sockets, real /proc."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from autoresearch import runner

REPO = Path(__file__).resolve().parents[1]
from autoresearch.config import SandboxConfig
from autoresearch.runner import Run, kill_stale_group, kill_tagged, parse_metric, scrubbed_env

# Non-finite alternatives first: `[0-9.eE+-]+` alone would match just the "-" of "-inf".
METRIC = r"^val_bpb:\s*([-+]?(?:nan|inf)|[0-9.eE+-]+)"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def start(tmp_path: Path, code: str, *, mode="auto", deadline=30.0, log_max=10**6,
          memory_mb=0, max_file_mb=4096, env=None, memory_regex=None) -> Run:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(code))
    spec = SandboxConfig(mode=mode, memory_mb=memory_mb, max_processes=4096, max_file_mb=max_file_mb)
    return Run.start(["python", "train.py"], tmp_path, tmp_path / "runs" / "1.log", deadline,
                     log_max, spec, None, METRIC, memory_regex, env=env)


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def in_dir(path: Path) -> list[int]:
    """Host pids of live processes whose cwd is ``path``: found from outside, so it works
    whether the run is in its own PID namespace (bwrap) or not."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == str(path) and alive(int(entry)):
                out.append(int(entry))
        except OSError:
            continue
    return out


def printed(res, prefix: str) -> list[int]:
    line = next(l for l in res.log_tail.splitlines() if l.startswith(prefix))
    return [int(x) for x in line.split()[1:]]


def wait_until(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met")


# ------------------------------------------------------------------ metric parsing
@pytest.mark.parametrize("text,expected", [
    ("val_bpb: 1.5\nval_bpb: 1.25\n", 1.25),          # last match wins
    ("step 1\nval_bpb: 0.99\ntrailing\n", 0.99),
    ("no metric here\n", None),
    ("val_bpb: garbage\n", None),
    ("val_bpb: 1.5\nval_bpb: 1.2.3\n", None),          # the last one is garbage: no fallback
    ("  val_bpb: 1.0\n", None),                         # anchored at line start
    ("val_bpb: 1e-3\n", 0.001),
])
def test_parse_metric(text, expected):
    assert parse_metric(text, METRIC) == expected


def test_parse_metric_nonfinite():
    assert math.isnan(parse_metric("val_bpb: nan\n", METRIC))
    assert parse_metric("val_bpb: inf\n", METRIC) == math.inf
    assert parse_metric("val_bpb: -inf\n", METRIC) == -math.inf


# ------------------------------------------------------------------ environment
def test_scrubbed_env_allow_and_deny():
    base = {
        "PATH": "/usr/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
        "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2", "VIRTUAL_ENV": "/v",
        "AUTORESEARCH_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x",
        "ANTHROPIC_API_KEY": "sk-1", "OPENAI_API_KEY": "sk-2", "GITHUB_TOKEN": "t",
        "HF_TOKEN": "hf", "AUTORESEARCH_API_KEY": "k", "DB_PASSWORD": "p", "MY_SECRET": "s",
        "CREDENTIALS_DIRECTORY": "/run/creds", "NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1",
        "LISTEN_FDS": "1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
        "DATABASE_URL": "postgres://u:p@h/db", "HTTPS_PROXY": "http://u:p@proxy",
    }
    env = scrubbed_env(base)
    assert env == {k: base[k] for k in (
        "PATH", "HOME", "LANG", "LC_ALL", "TZ", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
        "VIRTUAL_ENV", "AUTORESEARCH_CACHE_DIR", "XDG_CACHE_HOME")} | {"PYTHONUNBUFFERED": "1"}


def test_run_sees_no_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-canary-123")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x")
    run = start(tmp_path, """
        import os
        for k, v in sorted(os.environ.items()):
            print(f"{k}={v}")
        print("val_bpb: 1.0")
    """)
    res = run.wait(30)
    assert res.exit_code == 0 and res.metric == 1.0
    log = Path(res.log_path).read_text()
    assert "PATH=" in log  # it did print its environment
    assert "sk-ant-canary-123" not in log and "ANTHROPIC_API_KEY" not in log
    assert "CREDENTIALS_DIRECTORY" not in log
    assert "ANTHROPIC_API_KEY" in res.sandbox["env_dropped"]
    assert "sk-ant-canary-123" not in repr(res)


# ------------------------------------------------------------------ basic runs
def test_metric_twice_last_wins_and_python_is_our_interpreter(tmp_path):
    run = start(tmp_path, """
        import sys
        print("val_bpb: 2.0")
        print("exe", sys.executable)
        print("val_bpb: 1.5")
        print("peak_vram_mb: 2048")
    """, memory_regex=r"^peak_vram_mb:\s*([0-9.]+)")
    res = run.wait(30)
    assert res.ok and res.metric == 1.5 and res.memory_gb == 2.0
    assert f"exe {sys.executable}" in res.log_tail
    assert run.pgid == run.pid and run.start_time is not None


@pytest.mark.parametrize("line,check", [
    ("val_bpb: nan", lambda m: math.isnan(m)),
    ("val_bpb: garbage", lambda m: m is None),
    ("nothing useful", lambda m: m is None),
])
def test_bad_metrics_are_not_ok(tmp_path, line, check):
    res = start(tmp_path, f"print({line!r})").wait(30)
    assert res.exit_code == 0 and check(res.metric) and not res.ok


def test_nonzero_exit_records_tail(tmp_path):
    res = start(tmp_path, """
        print("val_bpb: 1.0")
        raise RuntimeError("boom in training")
    """).wait(30)
    assert res.exit_code == 1 and not res.ok
    assert "RuntimeError: boom in training" in res.log_tail


def test_missing_command_is_a_failed_run(tmp_path):
    spec = SandboxConfig(mode="off")
    run = Run.start(["definitely-not-a-command-xyz"], tmp_path, tmp_path / "r.log", 10, 1000,
                    spec, None, METRIC, None)
    res = run.poll()
    assert res is not None and res.exit_code == 127 and "cannot start" in res.log_tail


def test_poll_never_blocks(tmp_path):
    run = start(tmp_path, "import time; time.sleep(1.0); print('val_bpb: 1.0')")
    t0 = time.monotonic()
    assert run.poll() is None
    assert time.monotonic() - t0 < 0.05
    assert run.wait(30).metric == 1.0


# ------------------------------------------------------------------ output cap
def test_gigantic_output_is_capped_and_metric_still_read(tmp_path):
    res = start(tmp_path, """
        import sys
        line = "x" * 1023 + "\\n"
        for _ in range(20 * 1024):      # 20 MB
            sys.stdout.write(line)
        print("val_bpb: 0.75")
    """, log_max=200_000).wait(60)
    size = os.path.getsize(res.log_path)
    assert res.log_truncated and 200_000 <= size < 201_000
    assert res.metric == 0.75  # printed after the cap and still read
    assert "truncated" in Path(res.log_path).read_text()[200_000:]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_log_write_does_not_stall_the_run(tmp_path):
    # /dev/full fails every write with ENOSPC: the disk-full case, for real.
    # 200 KB: more than a pipe holds, so the pipe must keep being drained.
    (tmp_path / "train.py").write_text("print(('x' * 999 + '\\n') * 200)\nprint('val_bpb: 1.0')\n")
    run = Run.start(["python", "train.py"], tmp_path, "/dev/full", 30, 10**6,
                    SandboxConfig(mode="off"), None, METRIC, None)
    res = run.wait(30)
    assert res.ok and res.metric == 1.0 and res.log_truncated


# ------------------------------------------------------------------ deadline + group kill
@linux_only
def test_deadline_kills_leader_and_forked_children(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 1.0)  # keep the suite quick; same escalation
    run = start(tmp_path, """
        import os, signal, subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
                for _ in range(2)]
        if os.fork() == 0:   # a forked (not exec'd) child too
            time.sleep(1000)
        print("pids", os.getpid(), *[k.pid for k in kids], flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # ignore the polite request
        time.sleep(1000)
    """, deadline=1.5)
    seen = wait_until(lambda: len(in_dir(tmp_path)) >= 4 and in_dir(tmp_path))
    res = run.wait(20)
    assert res is not None, "the deadline did not end the run"
    assert res.timed_out and res.killed == "deadline" and not res.ok
    assert res.signal == signal.SIGKILL
    assert res.duration_s < 1.5 + 1.0 + 2
    assert len(printed(res, "pids")) == 3
    assert not runner.group_members(run.pgid)
    for pid in seen:
        assert not alive(pid), f"process {pid} of the run survived"


@linux_only
def test_children_outliving_a_finished_run_are_killed(tmp_path):
    res = start(tmp_path, """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"],
                             stdout=subprocess.DEVNULL)
        print("child", p.pid)
        print("val_bpb: 1.0")
    """).wait(20)
    assert res.ok
    assert not in_dir(tmp_path)


def test_kill_with_reason(tmp_path):
    run = start(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(1000)")
    time.sleep(0.3)
    run.kill("skip")
    res = run.wait(20)
    assert res.killed == "skip" and not res.timed_out and res.signal == signal.SIGTERM


def _leader_with_child(exit_leader: bool):
    code = ("import subprocess,sys,time;"
            "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(1000)']);"
            "print(c.pid, flush=True)" + ("" if exit_leader else "; time.sleep(1000)"))
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                         stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline()), runner.proc_start_ticks(p.pid)


def _cleanup(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@linux_only
def test_kill_stale_group():
    # A leader with a child, as a daemon killed with -9 would have left them.
    p, child, ticks = _leader_with_child(exit_leader=False)
    try:
        # Other start ticks: that PID is "another process" now -> untouched.
        assert kill_stale_group(p.pid, ticks + 1) is False
        assert kill_stale_group(p.pid, None) is False  # a live leader cannot be verified
        assert alive(p.pid) and alive(child)
        assert kill_stale_group(p.pid, ticks) is True
        p.wait(5)
        assert not alive(child)
        assert kill_stale_group(p.pid, ticks) is False  # nothing left
    finally:
        _cleanup(p.pid, child)
        p.wait()
        p.stdout.close()


@linux_only
def test_kill_stale_group_orphans_after_leader_died():
    # The leader exited; its child stayed in the group.
    p, child, ticks = _leader_with_child(exit_leader=True)
    p.wait(5)  # leader reaped: its PID no longer exists
    p.stdout.close()
    try:
        assert alive(child)
        assert kill_stale_group(p.pid, ticks) is True
        assert not alive(child)
    finally:
        _cleanup(child)


def _tagged_group(tag: str) -> tuple[subprocess.Popen, int]:
    """A process group of two (a leader and its child) carrying run tag ``tag``, as a run leaves it."""
    code = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(300)\nprint(os.getpid(), flush=True)\n" \
           "time.sleep(300)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "AUTORESEARCH_RUN_TAG": tag})
    p.stdout.readline()  # the child exists once the leader has printed
    return p, p.pid


@linux_only
def test_kill_tagged_takes_one_run_or_the_whole_workspace():
    ws = f"t{os.getpid()}"
    groups = {tag: _tagged_group(tag) for tag in (f"{ws}.3", f"{ws}.4", f"{ws}.31", f"{ws}9")}
    members = {tag: runner.group_members(pgid) for tag, (_, pgid) in groups.items()}
    try:
        assert all(len(m) == 2 for m in members.values()), members
        assert kill_tagged(f"{ws}.3") == [groups[f"{ws}.3"][1]]  # one experiment's run, nothing else
        groups[f"{ws}.3"][0].wait(5)
        assert not any(alive(pid) for pid in members[f"{ws}.3"])
        assert all(alive(pid) for tag in (f"{ws}.4", f"{ws}.31", f"{ws}9") for pid in members[tag])
        assert sorted(kill_tagged(ws)) == sorted([groups[f"{ws}.4"][1], groups[f"{ws}.31"][1]])  # the rest
        for tag in (f"{ws}.4", f"{ws}.31"):
            groups[tag][0].wait(5)
        assert not any(alive(pid) for tag in (f"{ws}.4", f"{ws}.31") for pid in members[tag])
        assert all(alive(pid) for pid in members[f"{ws}9"])  # another workspace's tag merely starts alike
    finally:
        for p, pgid in groups.values():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            p.stdout.close()
    with pytest.raises(ValueError):
        kill_tagged("")


# ------------------------------------------------------------------ sandbox
def _loopback_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(10)

    def serve():
        try:
            conn, _ = srv.accept()
            conn.sendall(b"hello\n")
            conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


CONNECT = """
    import socket, sys
    try:
        s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
        print("got", s.recv(10))
        print("val_bpb: 1.0")
    except OSError as e:
        print("network blocked:", e)
        sys.exit(3)
"""

needs_netns = pytest.mark.skipif(
    not sys.platform.startswith("linux") or runner.netns_prefix() is None,
    reason="this kernel does not allow a private network namespace")


@needs_netns
def test_network_blocked_under_auto_and_open_under_off(tmp_path):
    srv, port = _loopback_server()
    try:
        res = start(tmp_path, CONNECT.format(port=port), mode="auto").wait(30)
        assert res.exit_code == 3 and "network blocked" in res.log_tail
        assert res.sandbox["network"] == "isolated"
        res = start(tmp_path, CONNECT.format(port=port), mode="off").wait(30)
        assert res.ok and "got b'hello" in res.log_tail
        assert res.sandbox["network"] == "host"
    finally:
        srv.close()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0
                    or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_network_blocked_for_root_without_capabilities(tmp_path):
    """The system unit runs the daemon as the workspace's owner with CapabilityBoundingSet=
    empty; for a root-owned workspace that is root without CAP_SYS_ADMIN or CAP_SETFCAP, where
    neither `unshare --net` nor `--map-root-user` works (found under a real systemd)."""
    srv, port = _loopback_server()
    (tmp_path / "train.py").write_text(textwrap.dedent(CONNECT.format(port=port)))
    child = textwrap.dedent(f"""
        import json, sys
        from autoresearch.config import SandboxConfig
        from autoresearch.runner import Run
        spec = SandboxConfig(mode="auto", memory_mb=0, max_processes=4096, max_file_mb=4096)
        run = Run.start([sys.executable, "train.py"], {str(tmp_path)!r}, {str(tmp_path / "1.log")!r},
                        30.0, 10**6, spec, None, r"^val_bpb:\\s*(\\S+)", None)
        res = run.wait(30)
        print(json.dumps({{"exit": res.exit_code, "network": res.sandbox["network"],
                          "tail": res.log_tail}}))
    """)
    try:
        out = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                              sys.executable, "-c", child], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        srv.close()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["network"] == "isolated" and got["exit"] == 3 and "network blocked" in got["tail"], got


@needs_netns
def test_private_loopback_works_inside_the_namespace(tmp_path):
    res = start(tmp_path, """
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        c = socket.create_connection(srv.getsockname(), timeout=5)
        conn, _ = srv.accept(); conn.sendall(b"ok"); print("self", c.recv(2))
        print("val_bpb: 1.0")
    """).wait(30)
    assert res.ok and "self b'ok'" in res.log_tail


@linux_only
def test_file_size_limit(tmp_path):
    res = start(tmp_path, """
        try:
            with open("big.bin", "wb") as f:
                for _ in range(4):
                    f.write(b"\\0" * (1 << 20))
        except OSError as e:
            print("write failed:", e)
            raise SystemExit(4)
        print("val_bpb: 1.0")
    """, max_file_mb=1).wait(30)
    assert res.exit_code == 4 and "File too large" in res.log_tail
    assert (tmp_path / "big.bin").stat().st_size <= 1 << 20
    assert res.sandbox["max_file_mb"] == 1


@linux_only
def test_rlimits_reach_the_run(tmp_path, monkeypatch):
    # As a regular user NPROC = the user's current task count + max_processes. Root is
    # exempt from NPROC, so pretend not to be root to check the limit reaches the run.
    monkeypatch.setattr(runner.os, "geteuid", lambda: 1000)
    code = """
        import resource
        print("limits", resource.getrlimit(resource.RLIMIT_NPROC)[0],
              resource.getrlimit(resource.RLIMIT_FSIZE)[0])
        print("val_bpb: 1.0")
    """
    res = start(tmp_path, code, max_file_mb=3).wait(30)
    nproc, fsize = printed(res, "limits")
    assert fsize == 3 << 20 and nproc == res.sandbox["nproc_rlimit"] > 4096
    # The same limits through the preexec_fn fallback (no util-linux prlimit).
    monkeypatch.setattr(runner, "_limits_argv", lambda limits: None)
    res = start(tmp_path, code, max_file_mb=3).wait(30)
    assert res.ok and printed(res, "limits") == [res.sandbox["nproc_rlimit"], 3 << 20]


@linux_only
def test_memory_blowup_is_killed(tmp_path):
    run = start(tmp_path, """
        import time
        hog = []
        for i in range(100):              # up to 1 GB, 10 MB at a time
            hog.append(bytearray(10 * 1024 * 1024))
            time.sleep(0.01)
        print("val_bpb: 1.0")
    """, memory_mb=200)
    res = run.wait(60)
    assert res.killed == "memory" and not res.ok and res.signal == signal.SIGKILL
    assert res.sandbox["memory_mb"] == 200
    assert "killed: memory" in Path(res.log_path).read_text()


def test_sandbox_off_applies_no_limits(tmp_path):
    res = start(tmp_path, """
        import resource
        print("fsize", resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY)
        print("val_bpb: 1.0")
    """, mode="off", max_file_mb=1, memory_mb=1).wait(30)
    assert res.ok and "fsize True" in res.log_tail
    assert res.sandbox["memory_mb"] is None and res.sandbox["network"] == "host"
