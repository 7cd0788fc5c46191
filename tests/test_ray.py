"""[executor] kind = "ray": the daemon dispatches its runs to a Ray cluster, and its log stays the truth.

One cluster for the module (ray.cluster_utils.Cluster: a head without GPUs, two worker nodes
with 2 logical GPUs each, and a third whose autoresearch reports another version), inside a
network namespace of this process's own with only loopback: Ray started in the host's
namespace binds the machine's external address, which no test may use. The namespace is the
main thread's (unshare(CLONE_NEWNET)); the cluster's processes and the daemons the tests start
inherit it, and the thread goes back to the host's namespace at the end of the module.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'autoresearch[ray]')")

from autoresearch.config import RayConfig, SandboxConfig  # noqa: E402
from autoresearch.eventlog import verify_path  # noqa: E402
from autoresearch.executor import RunSpec  # noqa: E402
from autoresearch.ray_executor import VERSION_ENV, RayExecutor, check_node  # noqa: E402

from daemon_fixtures import (TRAIN, cli, events, make_workspace, mode, mode_env, spawn_daemon,  # noqa: E402,F401
                             state, tagged_processes, wait_for)

CLONE_NEWNET = 0x40000000
# Node death is noticed after a few missed health checks: fast ones, so that a test waits ~1 s.
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
               "health_check_initial_delay_ms": 0}


def _loopback_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = b"lo".ljust(40, b"\0")
        flags = int.from_bytes(fcntl.ioctl(s.fileno(), 0x8913, req)[16:18], sys.byteorder)  # SIOCGIFFLAGS
        up = b"lo".ljust(16, b"\0") + (flags | 1).to_bytes(2, sys.byteorder)  # IFF_UP
        fcntl.ioctl(s.fileno(), 0x8914, up.ljust(40, b"\0"))  # SIOCSIFFLAGS
    finally:
        s.close()


@pytest.fixture(scope="module")
def netns():
    """This thread (and what it starts) in a new network namespace with only loopback, up."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace of the test's own needs root (CI runs as root)")
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(host)
        pytest.skip(f"unshare(CLONE_NEWNET) refused: {os.strerror(ctypes.get_errno())}")
    try:
        _loopback_up()
        yield
    finally:
        libc.setns(host, CLONE_NEWNET)
        os.close(host)


class Nodes:
    def __init__(self, cluster, good, bad, caches):
        self.cluster, self.good, self.bad, self.caches = cluster, good, bad, caches

    @property
    def address(self) -> str:
        return self.cluster.address


def _add_node(cluster, env: dict[str, str]):
    """A worker node with 2 logical GPUs; its processes start with `env` added (they inherit it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cluster.add_node(num_cpus=2, num_gpus=2)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(netns, tmp_path_factory):
    from ray.cluster_utils import Cluster

    base = tmp_path_factory.mktemp("ray-nodes")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": FAST_HEALTH})
    caches = [base / "cache-a", base / "cache-b"]
    good = [_add_node(c, {"AUTORESEARCH_CACHE_DIR": str(p)}) for p in caches]
    bad = _add_node(c, {VERSION_ENV: "0.0.0-old", "AUTORESEARCH_CACHE_DIR": str(base / "cache-old")})
    c.wait_for_nodes()
    try:
        yield Nodes(c, good, bad, caches)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


PREPARE = ("python -c \"import os, pathlib; p = pathlib.Path(os.environ['AUTORESEARCH_CACHE_DIR']) / 'prepared'; "
           "p.parent.mkdir(parents=True, exist_ok=True); p.write_text((p.read_text() if p.exists() else '') + 'x')\"")


def _ray_workspace(path: Path, address: str, **tables) -> Path:
    tables.setdefault("run", {})
    tables["run"] = {"command": "python train.py", "budget_seconds": 1.0, "deadline_seconds": 30.0,
                     **tables["run"]}
    return make_workspace(path, executor={"kind": "ray"}, ray={"address": address}, **tables)


def _runs(root: Path):
    """(experiment, trigger, payload) of every finish / trained / interrupt event."""
    if not (root / ".autoresearch" / "events.sqlite").exists():
        return []
    return [(e.experiment, e.trigger, e.payload) for e in events(root)
            if e.trigger in ("finish", "trained", "interrupt")]


def test_runs_spread_over_both_nodes_and_the_old_node_is_refused(cluster, tmp_path, mode):
    root = _ray_workspace(tmp_path / "ws", cluster.address, run={"prepare_command": PREPARE})
    mode.write_text("sleep:1.5")  # long enough that the four experiments overlap
    out = cli("run", str(root), "--max-experiments", "4", env=mode_env(mode), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    st = state(root)
    assert sorted(st.experiments) == [0, 1, 2, 3, 4] and all(e.terminal for e in st.experiments.values())
    finishes = [p for _, t, p in _runs(root) if t == "finish"]
    assert len(finishes) == 5 and all(p["exit_code"] == 0 for p in finishes)
    good = {n.node_id for n in cluster.good}
    assert {p["node"]["node_id"] for p in finishes} == good  # both nodes used, never the refused one
    assert all(len(p["node"]["gpus"]) == 1 for p in finishes)  # num_gpus = 1: one GPU each
    # The output came back while the runs ran: each run's log holds its metric line.
    assert all("val_bpb:" in (root / st.experiments[n].log).read_text() for n in range(5))
    # The node with another version is refused, with the reason, in the log and in `status`.
    notes = [e.payload for e in events(root) if e.trigger == "note" and e.payload.get("kind") == "node"]
    refused = [p for p in notes if p["node"] == cluster.bad.node_id]
    assert refused and not refused[0]["usable"] and "0.0.0-old" in refused[0]["reason"]
    assert {p["node"] for p in notes if p["usable"]} == good
    status = cli("status", str(root))
    assert "nodes: 2 usable (4 slots), 1 refused" in status.stdout and "0.0.0-old" in status.stdout
    # The workload's preparation ran once on each node (its own cache), never on the refused one.
    assert [p.joinpath("prepared").read_text() for p in cluster.caches] == ["x", "x"]
    assert verify_path(root / ".autoresearch" / "events.sqlite").ok

    # A second daemon: each node's preparation is cached (not run again).
    out = cli("run", str(root), "--max-experiments", "5", env=mode_env(mode), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.joinpath("prepared").read_text() for p in cluster.caches] == ["x", "x"]
    assert any(e.payload.get("prepared") == "cached" for e in events(root)
               if e.trigger == "note" and e.payload.get("kind") == "node")


def _when_changed(code: str) -> str:
    """The fixture workload, doing `code` in every experiment (any change of its constants) but
    not in the baseline: no race with the daemon's pace."""
    body = "".join(f"    {line}\n" for line in code.strip().splitlines())
    return TRAIN.replace("mode_file = ", "if (LEARNING_RATE, WIDTH, WARMUP) != (0.04, 64, 0.1):\n"
                         + body + "mode_file = ", 1)


HANG_WHEN_CHANGED = _when_changed("""
if os.fork() == 0:
    time.sleep(600)
print("hanging", flush=True)
time.sleep(600)
""")


def _commit_train(root: Path, text: str) -> None:
    from daemon_fixtures import git
    (root / "train.py").write_text(text)
    git(root, "commit", "-qam", "the test's workload")


def test_the_deadline_kills_a_hung_remote_run(cluster, tmp_path):
    root = _ray_workspace(tmp_path / "ws", cluster.address, run={"deadline_seconds": 3.0})
    _commit_train(root, HANG_WHEN_CHANGED)
    t0 = time.monotonic()
    out = cli("run", str(root), "--max-experiments", "1", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    st = state(root)
    exp = st.experiments[1]
    assert exp.state == "crashed"
    fin = [p for n, t, p in _runs(root) if n == 1 and t == "finish"][0]
    assert fin["killed"] == "deadline" and fin["timed_out"] and fin["node"]["node_id"]
    assert 3.0 <= fin["duration_s"] < 3.0 + 3.0 + 2.0  # the deadline, then SIGTERM -> SIGKILL
    assert "hanging" in (root / exp.log).read_text()  # its output reached this machine first
    assert tagged_processes(root) == []  # the run and its forked child are gone (killed on the worker)
    assert time.monotonic() - t0 < 90


def test_skip_reaches_a_remote_run(cluster, tmp_path, mode):
    root = _ray_workspace(tmp_path / "ws", cluster.address)
    _commit_train(root, _when_changed('print("sleeping", flush=True)\ntime.sleep(60)'))
    proc = spawn_daemon(root, "--max-experiments", "1")
    try:
        log = root / ".autoresearch" / "runs" / "1.log"
        wait_for(lambda: log.exists() and "sleeping" in log.read_text(), timeout=90)  # streamed while it runs
        t0 = time.monotonic()
        assert cli("skip", str(root)).returncode == 0
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    exp = state(root).experiments[1]
    assert exp.state == "discarded" and "skipped" in exp.reason  # what `skip` makes of an experiment
    wait_for(lambda: tagged_processes(root) == [], timeout=10)  # the worker killed the run


def test_a_killed_daemon_takes_its_remote_runs_with_it_and_the_restart_reruns_them(cluster, tmp_path):
    """Ray ties a task to its owner: kill -9 of the daemon ends the remote run (its worker goes,
    and bubblewrap's --die-with-parent takes the run); the next start interrupts and re-runs it."""
    from autoresearch import sandbox as sandbox_mod
    from daemon_fixtures import kill9
    if sandbox_mod.bwrap_usable()[0] is None:
        pytest.skip("needs bubblewrap")
    root = _ray_workspace(tmp_path / "ws", cluster.address, sandbox={"mode": "auto"})
    # The run's own environment says how long it sleeps (a mode file would be hidden by the sandbox).
    _commit_train(root, TRAIN.replace("mode_file = ", "print('sleeping', flush=True)\n"
                                      "time.sleep(float(os.environ.get('AUTORESEARCH_TEST_SLEEP', '0')))\n"
                                      "mode_file = ", 1))
    proc = spawn_daemon(root, "--max-experiments", "1", env={"AUTORESEARCH_TEST_SLEEP": "60"})
    try:
        log = root / ".autoresearch" / "runs" / "0.log"
        wait_for(lambda: log.exists() and "sleeping" in log.read_text(), timeout=90)
        assert tagged_processes(root)
    finally:
        kill9(proc)
    wait_for(lambda: tagged_processes(root) == [], timeout=30)  # gone with its owner, on the worker
    out = cli("run", str(root), "--max-experiments", "1", env={"AUTORESEARCH_TEST_SLEEP": "0"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    st = state(root)
    assert st.experiments[0].state == "kept" and st.experiments[0].interrupts == 1 and st.experiments[1].terminal
    assert [e.trigger for e in events(root) if e.aggregate == "experiment:0"] == [
        "adopt", "launch", "interrupt", "retry", "launch", "finish", "keep"]
    assert verify_path(root / ".autoresearch" / "events.sqlite").ok


def test_the_evaluation_step_reads_what_the_remote_training_run_left(cluster, tmp_path):
    """A training run's checkout comes back when it ends: the evaluation step (remote too) reads its outputs."""
    train = TRAIN.replace('print(f"val_bpb:', 'open("figure.txt", "w").write(f"{1.0 + loss:.6f}")\nprint(f"val_bpb:')
    evaluate = "import pathlib; print('val_bpb: ' + pathlib.Path('figure.txt').read_text())"
    root = _ray_workspace(tmp_path / "ws", cluster.address, eval={"command": f'python -c "{evaluate}"'})
    _commit_train(root, train)
    out = cli("run", str(root), "--max-experiments", "1", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    st = state(root)
    assert st.experiments[0].state == "kept" and st.experiments[1].terminal
    evaluated = [e.payload for e in events(root) if e.trigger == "evaluated"]
    assert len(evaluated) == 2 and all(p["failure"] in (None, "") and p["node"]["node_id"] for p in evaluated)
    assert evaluated[0]["metric"] == st.experiments[0].metric  # the figure the training run wrote


def _exp_state(root: Path, n: int) -> str | None:
    if not (root / ".autoresearch" / "events.sqlite").exists():
        return None
    exp = state(root).experiments.get(n)
    return exp.state if exp else None


def _node_of(pid: int, nodes) -> object | None:
    """The cluster node whose raylet started the worker above `pid`."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    for _ in range(10):
        if pid in raylets:
            return raylets[pid]
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return None
    return None


def test_a_removed_node_interrupts_its_run_which_reruns_on_the_other(cluster, tmp_path, mode):
    root = _ray_workspace(tmp_path / "ws", cluster.address)
    _commit_train(root, TRAIN.replace("    time.sleep(float(", "    print('sleeping', flush=True)\n    time.sleep(float(", 1))
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, "--max-experiments", "1", env=mode_env(mode))
    try:
        log = root / ".autoresearch" / "runs" / "0.log"
        wait_for(lambda: log.exists() and "sleeping" in log.read_text(), timeout=90)  # streamed here
        victim = wait_for(lambda: _node_of(tagged_processes(root)[0], cluster.good), timeout=5)
        mode.write_text("")  # the re-run finishes at once
        cluster.cluster.remove_node(victim, allow_graceful=False)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in tagged_processes(root):  # the fallback sandbox's orphan on the dead node
            os.kill(pid, signal.SIGKILL)
    st = state(root)
    assert st.experiments[0].state == "kept" and st.experiments[1].terminal
    ends = [(t, p) for n, t, p in _runs(root) if n == 0]
    assert [t for t, _ in ends] == ["interrupt", "finish"]
    interrupt, finish = ends[0][1], ends[1][1]
    assert "lost on node" in interrupt["reason"] and "NodeDiedError" in interrupt["reason"]
    assert interrupt["graceful"] is True and st.experiments[0].interrupts == 0  # not counted against it
    assert finish["node"]["node_id"] != victim.node_id and finish["exit_code"] == 0
    triggers = [e.trigger for e in events(root) if e.aggregate == "experiment:0"]
    assert triggers == ["adopt", "launch", "interrupt", "retry", "launch", "finish", "keep"]
    assert verify_path(root / ".autoresearch" / "events.sqlite").ok
    cluster.good.remove(victim)


def test_a_node_whose_preparation_fails_is_reported_and_not_used(tmp_path, monkeypatch):
    """check_node as a node runs it (here, in this process): the reason, once; the marker only on success."""
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    out = check_node(["python", "-c", "print('no data here'); raise SystemExit(3)"], {"autoresearch.toml": b""}, {})
    assert out["error"] == "prepare failed: no data here" and not list((tmp_path / "cache").glob(".prepared-*"))
    ok = check_node(["python", "-c", "open('seen', 'w').write('1')"], {"autoresearch.toml": b""}, {})
    assert ok["error"] == "" and ok["prepared"] == "now"
    again = check_node(["python", "-c", "open('seen', 'w').write('1')"], {"autoresearch.toml": b""}, {})
    assert again["prepared"] == "cached"


def _tagged(tag: str) -> list[int]:
    needle = f"AUTORESEARCH_RUN_TAG={tag}\0".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_the_daemon_side_deadline_ends_a_run_whose_worker_does_not(cluster, tmp_path):
    """The worker's own deadline cannot act (its process is stopped): past deadline + grace the
    executor cancels the task with force, Ray kills the worker, and the sandbox (bubblewrap's
    --die-with-parent) takes the run with it."""
    from autoresearch import sandbox as sandbox_mod
    if sandbox_mod.bwrap_usable()[0] is None:
        pytest.skip("needs bubblewrap")
    checkout = tmp_path / "c"
    checkout.mkdir()
    (checkout / "train.py").write_text("import time\nprint('hanging', flush=True)\ntime.sleep(600)\n")
    tag = f"raytest.{os.getpid()}.{time.monotonic_ns()}"
    wake = threading.Event()
    ex = RayExecutor(RayConfig(address=cluster.address), wake, grace_s=0.5)
    try:
        ex.settle()
        spec = RunSpec(argv=("python", "train.py"), cwd=str(checkout), log_path=str(tmp_path / "run.log"),
                       deadline_s=1.0, log_max_bytes=1 << 20, sandbox=SandboxConfig(mode="auto"), layout=None,
                       metric_regex=r"^val_bpb:\s*(\S+)", memory_regex=None, env=dict(os.environ), tag=tag)
        t0 = time.monotonic()
        ex.submit("h", spec)
        wait_for(lambda: "hanging" in Path(spec.log_path).read_text() if Path(spec.log_path).exists() else False,
                 timeout=60)
        run_pid = wait_for(lambda: _tagged(tag), timeout=10)[0]
        worker = run_pid
        for _ in range(8):  # up to the Ray worker (whose parent is a raylet)
            parent = int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
            if "raylet" in open(f"/proc/{parent}/cmdline").read():
                break
            worker = parent
        os.kill(worker, signal.SIGSTOP)  # its runner's deadline can no longer act
        done = []
        while not done and time.monotonic() - t0 < 60:
            wake.wait(0.5)
            wake.clear()
            done += ex.poll()
        assert done, "the executor never ended the run"
        result = done[0][1]
        assert result.killed == "deadline" and result.timed_out and not result.lost
        assert 1.0 + 3.0 + 0.5 <= time.monotonic() - t0 < 30  # deadline + the runner's grace + ours
        assert "hanging" in result.log_tail
        wait_for(lambda: not _tagged(tag), timeout=15)  # the run went with its worker
    finally:
        ex.shutdown("test over", timeout=5)


def test_an_unreachable_head_is_one_line_and_a_failure_systemd_restarts(netns, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    root = _ray_workspace(tmp_path / "ws", f"127.0.0.1:{port}")
    t0 = time.monotonic()
    out = cli("run", str(root), "--max-experiments", "1", timeout=60)
    assert out.returncode == 1  # Exit.FAILED: not in RestartPreventExitStatus, the head may come back
    assert out.stderr.strip().splitlines()[-1].endswith(
        f"ray.address '127.0.0.1:{port}': nothing answers at 127.0.0.1:{port} (Connection refused)")
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 30


@pytest.mark.parametrize("cfg, resources, slots", [
    (RayConfig(num_gpus=1), {"CPU": 16, "GPU": 8}, 8),
    (RayConfig(num_gpus=2), {"CPU": 16, "GPU": 7}, 3),
    (RayConfig(num_gpus=0.5), {"CPU": 16, "GPU": 2}, 4),
    (RayConfig(num_gpus=1), {"CPU": 16}, 0),  # a head without GPUs takes no run
    (RayConfig(num_gpus=0), {"CPU": 16}, 1),  # CPU runs: one per node (a time budget must not share cores)
    (RayConfig(num_gpus=1, accelerator_type="H100"), {"GPU": 8, "accelerator_type:H100": 1}, 8),
    (RayConfig(num_gpus=1, accelerator_type="H100"), {"GPU": 8, "accelerator_type:A100": 1}, 0),
])
def test_a_nodes_slots_are_what_it_offers_for_the_configured_run(cfg, resources, slots):
    ex = RayExecutor.__new__(RayExecutor)  # the rule alone, without a cluster
    ex.cfg = cfg
    assert ex._slots_of(resources) == slots


def test_no_secret_of_the_daemon_leaves_the_machine_with_a_run():
    """The RunSpec is pickled into Ray's object store: its environment is scrubbed before."""
    from autoresearch.config import SandboxConfig
    from autoresearch.executor import RunSpec
    from autoresearch.ray_executor import shipped

    env = {"PATH": "/usr/bin", "ANTHROPIC_API_KEY": "sk-ant-canary", "GITHUB_TOKEN": "ghp_canary",
           "DATABASE_URL": "postgres://u:p@db/x", "AUTORESEARCH_RUN_TAG": "abc.3", "OMP_NUM_THREADS": "2"}
    spec = RunSpec(argv=(sys.executable, "train.py"), cwd="/tmp", log_path="/tmp/x.log", deadline_s=5,
                   log_max_bytes=1000, sandbox=SandboxConfig(), layout=None, metric_regex="x", memory_regex=None,
                   env=env)
    out = shipped(spec)
    assert out.argv == ("python", "train.py")
    assert "canary" not in repr(out) and "postgres" not in repr(out)
    assert out.env["AUTORESEARCH_RUN_TAG"] == "abc.3" and out.env["OMP_NUM_THREADS"] == "2"
