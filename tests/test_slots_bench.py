"""bench/slots.py --quick runs the real daemon in every configuration and prints its figures.

A smoke test of the bench (its figures are not checked against the targets here: too short,
and the machine is shared)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_slots_bench_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "slots.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.startswith("machine: ") and "--quick" in out.splitlines()[0]
    # One row per configuration: every experiment ran (2 rounds per slot), a throughput, gaps.
    rows = {m[0]: m[1:] for m in re.findall(
        r"^(\d slots?, (?:lookahead 1|[\d.]+ s proposer, lookahead \d))\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)"
        r"\s+(?:[\d.]+\s+)?(\d+)\s+(\d+)$", out, re.M)}
    assert sorted(rows) == ["1 slot, 0.4 s proposer, lookahead 0", "1 slot, 0.4 s proposer, lookahead 1",
                            "1 slot, lookahead 1", "2 slots, lookahead 1", "4 slots, 0.12 s proposer, lookahead 1",
                            "4 slots, 0.12 s proposer, lookahead 2", "4 slots, lookahead 1"], out
    assert [rows[f"{c}, lookahead 1"][0] for c in ("1 slot", "2 slots", "4 slots")] == ["2", "4", "8"]
    assert rows["4 slots, 0.12 s proposer, lookahead 2"][0] == "8"
    assert all(float(r[1]) > 0 for r in rows.values())
    # With lookahead 0 a proposal (0.4 s) is asked only once the run has ended: the gap holds it.
    assert int(rows["1 slot, 0.4 s proposer, lookahead 0"][2]) >= 400
    # The figures, each with its value and, but for the comparison row, a verdict.
    figures = re.findall(r"^(\S.*?)\s{2,}([\d.]+) (x|ms)\s+([<>]= [\d.]+ (?:x|ms))\s+(meets|MISSES)$", out, re.M)
    names = [f[0] for f in figures]
    assert len(figures) == 7, out
    assert sum(n.startswith("throughput") for n in names) == 2
    assert sum(n.startswith("idle gap") for n in names) == 4
    assert names[-1].startswith("loop overhead per experiment")
    assert re.search(r"^  the same with lookahead 0 .*\s(\d+) ms\s*$", out, re.M)
    assert re.search(r"^4 slots, proposals 0.12 s .*lookahead 1: [\d.]+ x .* (\d+) ms; "
                     r"lookahead 2: [\d.]+ x, (\d+) ms$", out, re.M), out
