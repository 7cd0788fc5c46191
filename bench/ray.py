"""Dispatch overhead and throughput of the Ray executor, against the local one in the same run.

    python bench/ray.py [--runs 24] [--seconds 2]      (as root: it makes a network namespace)

A local Ray cluster (ray.cluster_utils.Cluster: a head and two worker nodes with 2 logical GPUs
each) in a network namespace of its own with only loopback, driven through the executors as the
coordinator drives them (submit, then poll when woken). The workload prints a line at once, then
works for a fixed time and prints its metric. Per run:
  * start: submit -> the run's first output line in its log on this machine;
  * end: the run's last line (a timestamp it prints just before exiting) -> its result handed
    out by poll (the coordinator records `finish` in the same turn);
medians, for the RayExecutor and for a LocalExecutor, alternating. Throughput: --runs runs of
--seconds each, 4 in flight on the 4 logical GPUs, against 4 x one local slot running the same
runs one after another (its rate measured on --runs / 4 runs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is ray.py: its own directory first on the path would shadow the ray package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from autoresearch.config import RayConfig, SandboxConfig  # noqa: E402
from autoresearch.executor import LocalExecutor, RunSpec  # noqa: E402

WORK = """
import sys, time
print("start", flush=True)
time.sleep(float(sys.argv[1]))
print("val_bpb: 1.0")
print(f"end {time.time():.6f}", flush=True)
"""


def _netns() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/ray.py: run as root (it starts Ray in a network namespace with only loopback)")
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        sys.exit("bench/ray.py: unshare(CLONE_NEWNET) refused")
    from test_ray import _loopback_up
    _loopback_up()


def _spec(tmp: Path, name: str, seconds: float, sandbox: str) -> RunSpec:
    checkout = tmp / name
    checkout.mkdir()
    (checkout / "work.py").write_text(WORK)
    return RunSpec(argv=("python", "work.py", str(seconds)), cwd=str(checkout), log_path=str(tmp / f"{name}.log"),
                   deadline_s=seconds + 60, log_max_bytes=1 << 20, sandbox=SandboxConfig(mode=sandbox),
                   layout=None, metric_regex=r"^val_bpb:\s*(\S+)", memory_regex=None, env=dict(os.environ))


def _first_line_at(path: str, stop: threading.Event, out: dict, key) -> None:
    while not stop.is_set():
        try:
            if b"\n" in Path(path).read_bytes():
                out[key] = time.monotonic()
                return
        except OSError:
            pass
        time.sleep(0.001)


def _drive(ex, wake: threading.Event, specs: list[tuple[str, RunSpec]], parallel: int) -> dict:
    """Run specs, `parallel` at once; per run: start overhead, end overhead; and the wall time."""
    pending = list(specs)
    submitted, first, ended = {}, {}, {}
    stop = threading.Event()
    t0 = time.monotonic()
    results = {}
    while pending or ex.running():
        while pending and len(ex.running()) < parallel and ex.capacity() > 0:
            key, spec = pending.pop(0)
            submitted[key] = time.monotonic()
            wall_submit = time.time()
            threading.Thread(target=_first_line_at, args=(spec.log_path, stop, first, key), daemon=True).start()
            ex.submit(key, spec)
            submitted[key] = (submitted[key], wall_submit)
        wake.wait(0.5)
        wake.clear()
        for key, result in ex.poll():
            now_wall = time.time()
            tail = [ln for ln in result.log_tail.splitlines() if ln.startswith("end ")]
            ended[key] = now_wall - float(tail[-1].split()[1]) if tail else None
            results[key] = result
    wall = time.monotonic() - t0
    stop.set()
    bad = [k for k, r in results.items() if r.exit_code != 0 or r.metric is None]
    if bad:
        raise SystemExit(f"runs failed: {bad}: {results[bad[0]].log_tail[-500:]}")
    start = [first[k] - submitted[k][0] for k in results if k in first]
    end = [e for e in ended.values() if e is not None]
    return {"start": start, "end": end, "wall": wall, "n": len(results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=24, help="runs in the throughput part (a multiple of 4)")
    ap.add_argument("--seconds", type=float, default=2.0, help="each run's fixed work time")
    ap.add_argument("--overhead-runs", type=int, default=10, help="runs per executor for the overhead medians")
    ap.add_argument("--sandbox", default="auto", help="sandbox.mode of the runs (auto | off)")
    args = ap.parse_args()
    _netns()
    import ray
    from ray.cluster_utils import Cluster
    from autoresearch.ray_executor import RayExecutor

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        wake = threading.Event()
        rex = RayExecutor(RayConfig(address=cluster.address), wake)
        rex.settle()
        lex = LocalExecutor(1, wake=wake)
        # Warm-up: Ray starts its worker processes on first use.
        _drive(rex, wake, [(f"w{i}", _spec(tmp, f"w{i}", 0.1, args.sandbox)) for i in range(4)], 4)
        over = {"ray": {"start": [], "end": []}, "local": {"start": [], "end": []}}
        for i in range(args.overhead_runs):  # alternating, one run at a time: the overhead alone
            for name, ex in (("ray", rex), ("local", lex)):
                r = _drive(ex, wake, [(f"o{name}{i}", _spec(tmp, f"o{name}{i}", 0.2, args.sandbox))], 1)
                over[name]["start"] += r["start"]
                over[name]["end"] += r["end"]
        n = args.runs
        ray_run = _drive(rex, wake, [(f"t{i}", _spec(tmp, f"t{i}", args.seconds, args.sandbox)) for i in range(n)], 4)
        local_run = _drive(lex, wake, [(f"l{i}", _spec(tmp, f"l{i}", args.seconds, args.sandbox))
                                       for i in range(max(1, n // 4))], 1)
        ray_rate = ray_run["n"] / ray_run["wall"]
        local_rate = local_run["n"] / local_run["wall"]
        med = {name: {k: round(statistics.median(v) * 1000, 1) for k, v in d.items()} for name, d in over.items()}
        out = {
            "machine": f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}, "
                       f"ray {ray.__version__}, load {os.getloadavg()[0]:.1f}",
            "sandbox": args.sandbox,
            "overhead_ms_median": med,
            "throughput": {"ray_4_gpus_runs_per_s": round(ray_rate, 3), "local_1_slot_runs_per_s": round(local_rate, 3),
                           "ratio_to_4x_one_slot": round(ray_rate / (4 * local_rate), 3),
                           "runs": n, "seconds_each": args.seconds},
        }
        print(json.dumps(out, indent=2))
        rex.shutdown("bench over")
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
