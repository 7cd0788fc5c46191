"""Slots: throughput with several experiments in flight, and how long a freed slot stays idle.

    python bench/slots.py [--quick]

Each configuration is one run of the real daemon (in-process: real git, real runs, the durable
event log) on a workload whose train.py sleeps a fixed time and prints its metric, with a
proposer that sleeps a fixed latency and then returns an in-memory edit that is new every time
(a unique WARMUP value, always a little worse than the baseline's: every experiment is run and
discarded, so the best never moves and no merge is queued). Runs sleep, so 2 cores are enough
for 4 slots. The figures come from the event log (times with microseconds; `launch` names its
slot) and from the workload's own last line (the wall clock just before it exits):

- throughput: experiments run to an outcome per minute, from the first experiment's launch to
  the last outcome, with [slots] count 1, 2 and 4 (lookahead 1; as many rounds per slot each,
  so every configuration takes about as long). Target: >= 0.9 x count x the 1-slot figure.
- idle gap per slot: a run's end (as the workload saw it: its last line) to the next `launch`
  on the same slot; the start-up (baseline -> first experiment) is left out. Targets: median
  <= 100 ms with the proposal latency below the run time and lookahead = 1; with 1 slot, a
  3 s proposer and 5 s runs: <= 200 ms. Beside it, in the same run, lookahead = 0: a proposal
  is asked only once a run has ended, as the daemon did before slots (the gap is the proposal).
- beside them, 4 slots with slower proposals (0.4 x the run, like 2 minutes on 5-minute runs)
  with lookahead 1 and 2: slots free every run/count on average, so lookahead 1 hides a
  proposal only up to run/count; lookahead >= count x proposal / run keeps every slot fed.
- loop overhead per experiment: bench/loop.py's method (an instant workload, the offline
  proposer, start to next start minus the run), target <= 150 ms median.

Where the gap goes is printed beside it: the run's end -> its `finish` event (process exit,
the runner's reaping, the main loop waking), -> its outcome (judging, checkpoint, the human's
worktree), -> the next `launch` on the slot (its checkout, recording the launch).
"""

import argparse
import itertools
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

import structlog  # noqa: E402

from autoresearch.clock import parse_utc  # noqa: E402
from autoresearch.daemon import Daemon  # noqa: E402
from autoresearch.eventlog import EventLog  # noqa: E402
from autoresearch.proposers.base import Proposal  # noqa: E402
from daemon_fixtures import edited, make_workspace  # noqa: E402
from loop import measure as loop_measure, run_daemon as loop_run  # noqa: E402

# The workload: sleeps RUN_SECONDS whatever the edit, prints its metric, and last the wall
# clock just before it exits (the run's end as the workload saw it).
WORKLOAD = '''"""bench workload: sleeps a fixed time; the metric is 1 + WARMUP."""
import time
RUN_SECONDS = {run_s!r}
WARMUP = 0.1
time.sleep(RUN_SECONDS)
print(f"val_bpb:          {{1.0 + WARMUP:.6f}}")
print(f"bench_end: {{time.time():.6f}}", flush=True)
'''
END = re.compile(r"^bench_end: ([0-9.]+)$", re.M)
OUTCOMES = ("keep", "discard", "crash")  # a run that ended and was judged
TARGET_SCALING, TARGET_GAP_MS, TARGET_SLOW_GAP_MS, TARGET_LOOP_MS = 0.9, 100.0, 200.0, 150.0


class FixedLatencyProposer:
    """Sleeps `latency_s`, then proposes WARMUP = 0.1 + i/10^6 (i counts up: never a duplicate;
    always worse than the baseline, so discarded). Called from the pool's worker threads."""

    name = "bench"
    edits_worktree = False

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self._count = itertools.count(1)  # next() is atomic under the GIL: unique across threads

    def propose(self, ctx) -> Proposal:
        ctx.cancel.wait(self.latency_s)  # a stop does not wait out the sleep
        i = next(self._count)
        warmup = round(0.1 + i / 1e6, 6)
        return Proposal(description=f"WARMUP {warmup}", proposer="bench",
                        files={"train.py": edited(ctx.files["train.py"], WARMUP=warmup)})


@dataclass
class Config:
    label: str
    count: int
    lookahead: int
    run_s: float
    latency_s: float
    experiments: int


@dataclass
class Figures:
    cfg: Config
    finished: int
    wall_s: float  # first experiment's launch -> last outcome
    gaps_ms: list[float]
    parts_ms: dict[str, list[float]]

    @property
    def per_minute(self) -> float:
        return self.finished / self.wall_s * 60


def run_config(cfg: Config, tmp: Path) -> Figures:
    root = make_workspace(tmp / cfg.label.replace(" ", "-"), train=WORKLOAD.format(run_s=cfg.run_s),
                          run={"deadline_seconds": cfg.run_s + 60},
                          slots={"count": cfg.count, "lookahead": cfg.lookahead})
    proposer = FixedLatencyProposer(cfg.latency_s)
    Daemon(root, max_experiments=cfg.experiments,
           proposer_factory=lambda config, kind=None: proposer).run()
    log = EventLog.open(root / ".autoresearch" / "events.sqlite", create=False)
    events = list(log.events())
    log.close()
    return figures(cfg, events)


def figures(cfg: Config, events: list) -> Figures:
    exps: dict[int, dict] = {}
    for e in events:
        if e.experiment is None:
            continue
        x = exps.setdefault(e.experiment, {"launches": []})
        t = parse_utc(e.time)
        if e.trigger == "start":
            x["kind"] = e.payload.get("kind")
        elif e.trigger == "launch":
            x["launches"].append((t, e.payload["slot"]))
        elif e.trigger == "finish":
            x["finish"] = t
            found = END.findall(e.payload.get("log_tail") or "")
            x["end"] = float(found[-1]) if found else None
        elif e.trigger in (*OUTCOMES, "reject", "skip", "give_up", "fail"):
            x["outcome"], x["outcome_t"] = e.trigger, t
    trials = {n: x for n, x in exps.items() if x.get("kind") == "experiment"}
    # Each experiment is launched once, runs to its end and is discarded; anything else (a
    # retry after a lost run, a crash) is a fault the figures would hide: say it instead.
    wrong = {n: (x.get("outcome"), len(x["launches"])) for n, x in trials.items()
             if x.get("outcome") != "discard" or not x.get("end") or len(x["launches"]) != 1}
    if wrong:
        raise SystemExit(f"{cfg.label}: experiments not launched once, run and discarded "
                         f"(experiment: (outcome, launches)): {wrong}")
    ran = [x for x in trials.values() if x.get("outcome") in OUTCOMES]
    wall = max(x["outcome_t"] for x in ran) - min(x["launches"][0][0] for x in ran)

    # Per slot, each run's end -> the next launch there (the baseline's end is the start-up).
    by_slot: dict[int, list[tuple[float, dict]]] = {}
    for x in exps.values():
        for t, slot in x["launches"]:
            by_slot.setdefault(slot, []).append((t, x))
    gaps, parts = [], {"end -> finish": [], "finish -> outcome": [], "outcome -> launch": []}
    for runs in by_slot.values():
        runs.sort(key=lambda r: r[0])
        for (_, a), (launch, _) in zip(runs, runs[1:]):
            if a.get("kind") != "experiment":
                continue
            gaps.append((launch - a["end"]) * 1000)
            parts["end -> finish"].append((a["finish"] - a["end"]) * 1000)
            parts["finish -> outcome"].append((a["outcome_t"] - a["finish"]) * 1000)
            parts["outcome -> launch"].append((launch - a["outcome_t"]) * 1000)
    return Figures(cfg, len(ran), wall, gaps, parts)


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)] if values else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: short runs, few experiments (seconds)")
    args = ap.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # no console noise
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}; {date.today().isoformat()}{' (--quick)' if args.quick else ''}")
    # Throughput: runs of R s, proposals of R/10 (a 30 s proposal on a 5-minute run);
    # the slow proposer: 3 s proposals on 5 s runs, with lookahead 1 and 0.
    run_s, rounds, slow = (0.3, 2, (0.4, 0.6, 2)) if args.quick else (2.0, 10, (3.0, 5.0, 5))
    scale = [Config(f"{c} slot{'s' if c > 1 else ''}", c, 1, run_s, run_s / 10, rounds * c) for c in (1, 2, 4)]
    slow_cfgs = [Config(f"1 slot, {slow[0]:g} s proposer, lookahead {la}", 1, la, slow[1], slow[0], slow[2])
                 for la in (1, 0)]
    # Slower proposals on 4 slots (0.4 x the run: 2 minutes on 5-minute runs): lookahead 1 and 2.
    deep = [Config(f"4 slots, {0.4 * run_s:g} s proposer, lookahead {la}", 4, la, run_s, 0.4 * run_s,
                   4 * max(2, rounds * 6 // 10)) for la in (1, 2)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_config(cfg, Path(tmp)) for cfg in scale + slow_cfgs + deep]
        loop_root = make_workspace(Path(tmp) / "loop")
        loop_events, _ = loop_run(loop_root, 8 if args.quick else 40)
    overhead = loop_measure(loop_events)[0]

    print(f"\n{'configuration':<36} {'runs':>5} {'run s':>6} {'prop. s':>7} {'per min':>8} {'x 1 slot':>8} "
          f"{'gap med ms':>10} {'gap p90 ms':>10}")
    one = results[0].per_minute
    for f in results:
        c = f.cfg
        speedup = f"{f.per_minute / one:.2f}" if c.count > 1 or c in scale else ""
        print(f"{c.label + f', lookahead {c.lookahead}' * (c in scale):<36} {f.finished:>5} {c.run_s:>6g} "
              f"{c.latency_s:>7g} {f.per_minute:>8.1f} {speedup:>8} {median(f.gaps_ms):>10.0f} {p90(f.gaps_ms):>10.0f}")
    print("\nwhere a gap goes (median ms):")
    for f in results[:4]:
        print(f"  {f.cfg.label:<36} " + ", ".join(f"{k} {median(v):.0f}" for k, v in f.parts_ms.items()))

    rows = []  # (figure, measured, target, met)
    for f in results[1:3]:
        ratio = f.per_minute / (one * f.cfg.count)
        rows.append((f"throughput, {f.cfg.count} slots / ({f.cfg.count} x 1 slot's)", f"{ratio:.3f} x",
                     f">= {TARGET_SCALING} x", ratio >= TARGET_SCALING))
    for f in results[:3]:
        gap = median(f.gaps_ms)
        rows.append((f"idle gap per slot, {f.cfg.label}, proposals {f.cfg.latency_s:g} s, median",
                     f"{gap:.0f} ms", f"<= {TARGET_GAP_MS:.0f} ms", gap <= TARGET_GAP_MS))
    ahead, before = results[3], results[4]
    gap = median(ahead.gaps_ms)
    rows.append((f"idle gap, 1 slot, {slow[0]:g} s proposals, {slow[1]:g} s runs, median", f"{gap:.0f} ms",
                 f"<= {TARGET_SLOW_GAP_MS:.0f} ms", gap <= TARGET_SLOW_GAP_MS))
    rows.append(("  the same with lookahead 0 (a proposal after each run, as before slots)",
                 f"{median(before.gaps_ms):.0f} ms", "", None))
    loop = median(overhead)
    rows.append(("loop overhead per experiment (bench/loop.py's method), median", f"{loop:.0f} ms",
                 f"<= {TARGET_LOOP_MS:.0f} ms", loop <= TARGET_LOOP_MS))
    width = max(len(r[0]) for r in rows)
    if args.quick:
        print("\n(--quick: a smoke test, too few and too short runs for the targets to mean anything)")
    print(f"\n{'figure':<{width}}  {'measured':>9}  {'target':<10}  verdict")
    for name, measured, target, met in rows:
        print(f"{name:<{width}}  {measured:>9}  {target:<10}  {'' if met is None else verdict(met)}")
    (l1, l2) = results[5:7]
    print(f"\n4 slots, proposals {l1.cfg.latency_s:g} s (0.4 x the run): lookahead 1: "
          f"{l1.per_minute / (4 * one):.2f} x 4 x 1 slot's throughput, gap median {median(l1.gaps_ms):.0f} ms; "
          f"lookahead 2: {l2.per_minute / (4 * one):.2f} x, {median(l2.gaps_ms):.0f} ms\n"
          f"(slots free every run/count on average: lookahead >= count x proposal / run keeps each one fed)")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
