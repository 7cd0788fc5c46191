"""What the run sandbox costs per run: the same tiny run with sandbox.mode = "off" and under
bubblewrap, alternating, in a real workspace's run checkout (as the daemon starts it).

    python bench/sandbox.py [--runs 20]

Reported: the median wall time from Run.start to the result for each mode and the median of the
per-pair differences (the set-up bubblewrap adds: namespaces, mounts, the PID-namespace watch and
tear-down). Target: <= 200 ms. The run prints its metric and exits at once, so the difference
is all sandbox. A second figure adds the checkout reset the daemon does before each run.
"""

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch import sandbox  # noqa: E402
from autoresearch.config import SandboxConfig  # noqa: E402
from autoresearch.runner import Run  # noqa: E402
from autoresearch.workspace import Workspace  # noqa: E402

TRAIN = "print('val_bpb: 1.0')\n"
METRIC = r"^val_bpb:\s*(\S+)"


def one(ws: Workspace, mode: str, reset: bool) -> float:
    t0 = time.perf_counter()
    checkout = ws.run_checkout(0, ws.head()) if reset else ws.state_dir / "slots" / "0"
    layout = sandbox.Layout(checkout=checkout, hide=(ws.root, Path(ws.repo.common_dir)))
    run = Run.start(["python", "train.py"], checkout, ws.state_dir / "runs" / f"{mode}.log", 60, 10**6,
                    SandboxConfig(mode, 0, 4096, 4096), layout, METRIC)
    res = run.wait(60)
    elapsed = time.perf_counter() - t0
    assert res is not None and res.ok and res.sandbox["kind"] == ("off" if mode == "off" else "bwrap"), res
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if sandbox.bwrap_usable()[0] is None:
        print(f"no bubblewrap here: {sandbox.bwrap_usable()[1]}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.create(Path(tmp) / "ws", {"train.py": TRAIN}, "bench")
        ws.run_checkout(0, ws.head())
        print(f"# {platform.machine()}, {platform.python_version()}, {args.runs} runs per mode, alternating")
        for reset in (False, True):
            times = {"off": [], "auto": []}
            one(ws, "auto", reset)  # warm-up (the bwrap probe happens once per process)
            for _ in range(args.runs):
                for mode in ("off", "auto"):
                    times[mode].append(one(ws, mode, reset))
            diffs = [b - a for a, b in zip(times["off"], times["auto"])]
            what = "run + checkout reset" if reset else "run"
            print(f"{what:22s} off {statistics.median(times['off']) * 1000:6.0f} ms   "
                  f"bwrap {statistics.median(times['auto']) * 1000:6.0f} ms   "
                  f"added by bwrap (median of pairs) {statistics.median(diffs) * 1000:5.0f} ms   target <= 200 ms")
        ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
