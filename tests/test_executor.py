"""LocalExecutor with real subprocesses: runs at once, a poll that never blocks, cancel down to
the last process of a run's group, and a run's GPU and tag in its own environment."""

import json
import os
import pickle
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from autoresearch import sandbox
from autoresearch.config import SandboxConfig
from autoresearch.executor import LocalExecutor, RunInfo, RunSpec
from autoresearch.runner import group_members

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

METRIC = r"^val_bpb:\s*(\S+)"

# Prints what the run sees, then works for SLEEP seconds and reports its metric.
REPORT = """
import json, os, sys, time
t0 = time.time()
print("env " + json.dumps({k: os.environ.get(k) for k in
      ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "AUTORESEARCH_RUN_TAG")}), flush=True)
time.sleep(float(sys.argv[1]))
print("span " + json.dumps([t0, time.time()]))
print("val_bpb: 1.5")
"""

# Forks a grandchild in the same process group and both wait forever: only a kill ends them.
HANG = """
import os, time
if os.fork() == 0:
    time.sleep(600)
print("pgid", os.getpgrp(), flush=True)
time.sleep(600)
"""


def spec(tmp_path: Path, name: str, code: str, *args: str, mode: str = "off", env: dict | None = None,
         **kw) -> RunSpec:
    checkout = tmp_path / name
    checkout.mkdir()
    (checkout / "train.py").write_text(textwrap.dedent(code))
    layout = sandbox.Layout(checkout=checkout) if mode != "off" else None
    return RunSpec(argv=(sys.executable, "train.py", *args), cwd=str(checkout),
                   log_path=str(tmp_path / "runs" / f"{name}.log"), deadline_s=60.0, log_max_bytes=10**6,
                   sandbox=SandboxConfig(mode=mode), layout=layout, metric_regex=METRIC, memory_regex=None,
                   env=dict(os.environ if env is None else env), **kw)


def collect(ex: LocalExecutor, want: int, timeout: float = 30.0) -> dict:
    """Poll until ``want`` results came back; every poll call is timed (it must never block)."""
    results, slowest = {}, 0.0
    end = time.monotonic() + timeout
    while len(results) < want and time.monotonic() < end:
        t0 = time.monotonic()
        got = ex.poll()
        slowest = max(slowest, time.monotonic() - t0)
        for key, res in got:
            assert key not in results  # each result handed out once
            results[key] = res
        time.sleep(0.01)
    assert len(results) == want, f"only {len(results)} of {want} runs ended"
    results["slowest_poll"] = slowest
    return results


def tagged(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries this run tag, from /proc."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"AUTORESEARCH_RUN_TAG={tag}\0".encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def line(res, prefix: str):
    text = Path(res.log_path).read_text()
    return json.loads(next(l for l in text.splitlines() if l.startswith(prefix + " "))[len(prefix) + 1:])


def test_runs_at_once_up_to_the_slots(tmp_path):
    ex = LocalExecutor(3)
    assert ex.capacity() == 3
    t0 = time.monotonic()
    for n in (1, 2, 3):
        ex.submit(n, spec(tmp_path, f"r{n}", REPORT, "1.0"))
    submitted = time.monotonic() - t0
    assert ex.capacity() == 0
    with pytest.raises(RuntimeError, match="beyond capacity"):
        ex.submit(4, spec(tmp_path, "r4", REPORT, "0"))
    assert set(ex.running()) == {1, 2, 3}
    assert all(isinstance(i, RunInfo) and i.pid > 0 and i.started >= t0 for i in ex.running().values())
    results = collect(ex, 3)
    assert results["slowest_poll"] < 0.05, results["slowest_poll"]
    assert submitted < 1.0  # submit starts a run, it does not wait for it
    spans = [line(results[n], "span") for n in (1, 2, 3)]
    assert max(s[0] for s in spans) < min(s[1] for s in spans)  # all three were running together
    assert all(results[n].ok and results[n].metric == 1.5 for n in (1, 2, 3))
    assert ex.capacity() == 3 and ex.running() == {} and ex.poll() == []  # handed out once


def test_a_finished_run_holds_its_slot_until_polled(tmp_path):
    ex = LocalExecutor(1)
    ex.submit("a", spec(tmp_path, "a", REPORT, "0"))
    log = Path(ex.running()["a"].log_path)
    end = time.monotonic() + 30
    while "run ended" not in log.read_text() and time.monotonic() < end:  # the runner's last line
        time.sleep(0.02)
    time.sleep(0.1)
    assert ex.capacity() == 0 and list(ex.running()) == ["a"]
    with pytest.raises(RuntimeError, match="still running"):
        ex.submit("a", spec(tmp_path, "a2", REPORT, "0"))
    assert [k for k, _ in collect_list(ex)] == ["a"]
    assert ex.capacity() == 1


def collect_list(ex: LocalExecutor, timeout: float = 30.0) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = ex.poll()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError("no result")


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_cancel_kills_the_whole_group_and_says_why(tmp_path, mode):
    if mode == "auto" and sandbox.bwrap_usable()[0] is None:
        pytest.skip("no bubblewrap here")
    ex = LocalExecutor(2)
    tag = f"test-{os.getpid()}-{mode}.7"
    ex.submit(7, spec(tmp_path, "hang", HANG, mode=mode, tag=tag))
    ex.submit(8, spec(tmp_path, "other", REPORT, "30"))
    pid = ex.running()[7].pid
    log = Path(ex.running()[7].log_path)
    end = time.monotonic() + 20
    while "pgid" not in (log.read_text() if log.exists() else "") and time.monotonic() < end:
        time.sleep(0.02)
    assert len(tagged(tag)) >= 2  # the run and its forked child, for real
    t0 = time.monotonic()
    ex.cancel(7, "skip")
    assert time.monotonic() - t0 < 0.05  # cancel only signals
    ex.cancel("nobody", "skip")  # unknown key: nothing to end
    [(key, res)] = collect_list(ex)
    assert key == 7 and res.killed == "skip" and not res.ok
    assert group_members(pid) == [] and tagged(tag) == []  # nothing of the run is left (/proc)
    assert list(ex.running()) == [8] and ex.capacity() == 1  # the other run goes on
    [(key, res)] = ex.shutdown("stop")
    assert key == 8 and res.killed == "stop"


def test_gpu_and_tag_reach_the_run(tmp_path):
    base = {**os.environ, "CUDA_VISIBLE_DEVICES": "5", "AUTORESEARCH_RUN_TAG": "ws"}
    ex = LocalExecutor(2)
    ex.submit(1, spec(tmp_path, "gpu", REPORT, "0", env=base, gpu="GPU-1a2b", tag="ws.1"))
    ex.submit(2, spec(tmp_path, "plain", REPORT, "0", env=base))
    results = collect(ex, 2)
    assert line(results[1], "env") == {"CUDA_VISIBLE_DEVICES": "GPU-1a2b", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                       "AUTORESEARCH_RUN_TAG": "ws.1"}
    # No GPU, no tag: the base environment's own values pass through (as visible).
    assert line(results[2], "env") == {"CUDA_VISIBLE_DEVICES": "5", "CUDA_DEVICE_ORDER": None,
                                       "AUTORESEARCH_RUN_TAG": "ws"}
    assert ex.running() == {}


def test_a_run_that_cannot_start_is_a_result(tmp_path):
    ex = LocalExecutor(1)
    bad = spec(tmp_path, "bad", REPORT)
    ex.submit(3, RunSpec(**{**bad.__dict__, "argv": ("no-such-command-xyz",)}))
    assert ex.running()[3].pid == 0 and ex.capacity() == 0
    [(key, res)] = ex.poll()
    assert key == 3 and res.exit_code == 127 and "cannot start" in res.log_tail


def test_shutdown_ends_every_run_and_refuses_more(tmp_path):
    ex = LocalExecutor(2)
    ex.submit(1, spec(tmp_path, "h1", HANG))
    ex.submit(2, spec(tmp_path, "h2", HANG))
    pids = [info.pid for info in ex.running().values()]
    time.sleep(0.5)
    t0 = time.monotonic()
    results = dict(ex.shutdown("stop", timeout=10))
    assert time.monotonic() - t0 < 6  # SIGTERM is enough here: no 10 s wait
    assert set(results) == {1, 2} and all(r.killed == "stop" for r in results.values())
    assert all(group_members(pid) == [] for pid in pids)
    assert ex.capacity() == 0 and ex.running() == {}
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(3, spec(tmp_path, "late", REPORT, "0"))


def test_wake_is_set_when_a_run_ends(tmp_path):
    wake = threading.Event()
    ex = LocalExecutor(2, wake=wake)
    ex.submit(1, spec(tmp_path, "short", REPORT, "0.5"))
    assert not wake.wait(0.2)  # running: nothing to look at yet
    assert wake.wait(30)
    woken = time.time()
    [(key, res)] = ex.poll()  # set means a result is there
    assert key == 1 and res.ok
    # Set by the runner's watcher as the result is ready: soon after the run's last line.
    assert woken - line(res, "span")[1] < 0.5, woken - line(res, "span")[1]
    wake.clear()
    ex.submit(2, RunSpec(**{**spec(tmp_path, "bad", REPORT).__dict__, "argv": ("no-such-command-xyz",)}))
    assert wake.is_set()  # a run that never started is over at once: its owner is told too


def test_a_spec_crosses_a_process_boundary(tmp_path):
    s = spec(tmp_path, "p", REPORT, "0", mode="auto", gpu="1", tag="ws.9")
    assert pickle.loads(pickle.dumps(s)) == s


def test_the_daemon_never_imports_ray_unless_asked(tmp_path):
    """kind = "local": nothing on the daemon's path imports Ray; kind = "ray" without Ray
    installed: one line saying what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if the extra were not installed: `import ray` fails
        from autoresearch import cli, coordinator, daemon, executor
        from autoresearch.config import parse
        assert isinstance(executor.make(parse("[run]\\ncommand = 'true'\\n"), 2), executor.LocalExecutor)
        try:
            executor.make(parse("[run]\\ncommand = 'true'\\n[executor]\\nkind = 'ray'\\n"), 2)
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError executor.kind = 'ray' needs Ray: pip install 'autoresearch[ray]'")
    assert len(out.stdout.strip().splitlines()) == 1
