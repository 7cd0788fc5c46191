"""Benchmark the built-in workload on this machine's CPU.

    python bench/trainer_cpu.py            # cold + warm prepare, one full 60 s cpu-profile run
    python bench/trainer_cpu.py --runs 2   # several identical runs: the val_bpb spread
    python bench/trainer_cpu.py --budget 10  # shorter runs (not comparable with the 60 s figure)

Prints: prepare time (cold, into an empty cache, and warm), tokens/s, achieved
FLOP/s, the fp32 matmul peak train.py measured in the same run and the
fraction of it achieved (MFU), val_bpb and the wall time of `python train.py`;
then the hand-over (export size and time) and the trusted evaluation
(`python -m autoresearch.trainer.evaluate`: its wall time as a share of the
training budget, target <= 15 %, and its val_bpb beside the printed one).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.trainer import workload_files  # noqa: E402


def timed(argv, cwd, env) -> tuple[float, str]:
    t0 = time.perf_counter()
    run = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({run.returncode}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return wall, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="identical training runs (default 1)")
    parser.add_argument("--budget", type=float, default=None, help="override the 60 s budget (test only)")
    parser.add_argument("--data", default="stdlib", help='workload data (default "stdlib")')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ar-bench-") as tmp:
        ws = Path(tmp) / "lab"
        ws.mkdir()
        (ws / "autoresearch.toml").write_text(f'[workload]\nprofile = "cpu"\ndata = "{args.data}"\n')
        (ws / "train.py").write_text(workload_files("cpu")["train.py"])
        env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(Path(tmp) / "cache"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if args.budget:
            env["AUTORESEARCH_TIME_BUDGET"] = str(args.budget)
        prepare = [sys.executable, "-m", "autoresearch.trainer.prepare"]
        cold, _ = timed(prepare, ws, env)
        warm, _ = timed(prepare, ws, env)
        print(f"cpu: {os.cpu_count()} cores, torch threads = cores; data {args.data}")
        print(f"prepare: cold {cold:.1f} s, warm {warm:.2f} s")
        bpbs = []
        for i in range(args.runs):
            wall, out = timed([sys.executable, "train.py"], ws, env)
            m = re.search(r"^throughput: ([\d,]+) tok/s, ([\d,.]+) GFLOP/s achieved, peak ([\d,.]+) GFLOP/s", out, re.M)
            summary = dict(re.findall(r"^(\w+):\s+(\S+)$", out.split("\n---\n", 1)[1], re.M))
            tok_s, achieved, peak = (float(g.replace(",", "")) for g in m.groups())
            bpbs.append(float(summary["val_bpb"]))
            print(f"run {i + 1}: {tok_s:,.0f} tok/s | {achieved:.1f} GFLOP/s achieved | fp32 matmul peak "
                  f"{peak:.1f} GFLOP/s (measured in this run) | {100 * achieved / peak:.1f}% of peak | "
                  f"val_bpb {summary['val_bpb']} after {summary['training_seconds']} s training | "
                  f"steps {summary['num_steps']} | train.py wall {wall:.1f} s")
            export = re.search(r"^export: \S+ ([\d.]+) MiB in ([\d.]+)s", out, re.M)
            eval_wall, eval_out = timed([sys.executable, "-m", "autoresearch.trainer.evaluate"], ws, env)
            trusted = float(re.search(r"^val_bpb:\s+(\S+)", eval_out, re.M).group(1))
            budget = float(summary["training_seconds"])
            print(f"run {i + 1}: export {export.group(1)} MiB in {export.group(2)} s | trusted evaluation "
                  f"{eval_wall:.1f} s wall = {100 * eval_wall / budget:.1f}% of the {budget:.0f} s budget "
                  f"(target <= 15%) | trusted val_bpb {trusted:.6f} vs printed {summary['val_bpb']}")
        if len(bpbs) > 1:
            print(f"val_bpb over {len(bpbs)} identical runs: min {min(bpbs):.6f} max {max(bpbs):.6f} "
                  f"spread {max(bpbs) - min(bpbs):.6f} stdev {statistics.stdev(bpbs):.6f}")


if __name__ == "__main__":
    main()
