"""Dashboard figures: page load with 1,000 experiments, the server's memory, the loop with the page open.

    python bench/dashboard.py [--experiments 1000] [--loads 7] [--loop-experiments 40] [--rounds 3]

1. Page load: a workspace whose event log holds N experiments (written here through
   EventLog.append, as the daemon writes them: every transition legal, each proposal's
   full train.py and each run's 4,000-character log tail in the payloads; `verify` passes).
   A real `autoresearch dashboard` serves it; headless Chromium opens the page afresh,
   and the time from navigation to the page showing all N points in the chart and the
   table (its first page of 100 rows, of N) is measured (median of --loads). Target <= 1 s.
2. Memory: the server's resident set (VmRSS) after those loads, and its peak (VmHWM).
   Target <= 100 MB.
3. The daemon's loop overhead (bench/loop.py's measure: propose, commit, launch, judge,
   rollback; the run excluded) without the dashboard, then with the dashboard serving that
   workspace and the page open in Chromium (following every event live), alternating
   --rounds times, same machine, same run of this script.

Needs Debian's chromium and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import structlog  # noqa: E402

from autoresearch.eventlog import EventLog  # noqa: E402
from dashboard_fixtures import Dashboard  # noqa: E402
from daemon_fixtures import make_workspace  # noqa: E402
from loop import measure, run_daemon  # noqa: E402

TRAIN = (REPO / "autoresearch" / "trainer" / "train.py.template").read_text()


def sha(i: int) -> str:
    return f"{i:040x}"


def synthesize(root: Path, n: int) -> None:
    """An event log of `n` experiments after the baseline, with a few blocked and paused periods."""
    rng = random.Random(0)
    (root / ".autoresearch").mkdir(exist_ok=True)
    log = EventLog.open(root / ".autoresearch" / "events.sqlite")
    tail = ("step 00100 | loss 3.1234 | lr x1.00 | 12,345 tok/s\n" * 80)[-4000:]

    def exp(i, trigger, source, dest, **payload):
        log.append(f"experiment:{i}", trigger, source, dest, payload)

    log.append("daemon", "boot", "stopped", "starting", {"pid": 1, "version": "bench"})
    log.append("daemon", "prepare", "starting", "preparing", {})
    log.append("daemon", "begin_baseline", "preparing", "baseline", {})
    exp(0, "adopt", "new", "committed", commit=sha(1), parent=None, files={"train.py": TRAIN},
        description="baseline", hashes={})
    exp(0, "launch", "committed", "training", attempt=1, sandbox="auto", log=".autoresearch/runs/0.log")
    best = 1.10
    exp(0, "finish", "training", "judging", exit_code=0, metric=best, log_tail=tail, duration_s=300.0)
    exp(0, "keep", "judging", "kept", metric=best, reason="baseline")
    log.append("daemon", "baseline_done", "baseline", "running",
               {"n": 0, "commit": sha(1), "metric": best, "sigma": None, "threshold": 0.0})
    best_sha = sha(1)
    for i in range(1, n + 1):
        if i % 250 == 0:  # an outage, then a pause, as an overnight run has
            log.append("daemon", "block", "running", "blocked", {"reason": "proposer unavailable: 529",
                                                                 "retry_at": "2026-01-01T00:00:00Z"})
            log.append("daemon", "unblock", "blocked", "preparing", {})
            log.append("daemon", "resume_loop", "preparing", "running", {})
        exp(i, "start", "new", "proposing", kind="experiment", proposer="anthropic")
        exp(i, "proposed", "proposing", "proposing", description=f"DEPTH {i % 12} -> {i % 12 + 1}, lr warmup",
            files={"train.py": TRAIN.replace("DEPTH", f"DEPTH_{i}", 1)}, proposer="anthropic",
            usage={"input_tokens": 9000, "output_tokens": 700}, cost_usd=0.04)
        exp(i, "commit", "proposing", "committed", commit=sha(i + 1), parent=best_sha, hashes={}, added=3, removed=2)
        exp(i, "launch", "committed", "training", attempt=1, sandbox="auto", log=f".autoresearch/runs/{i}.log")
        r = rng.random()
        if r < 0.1:
            exp(i, "finish", "training", "judging", exit_code=1, metric=None, log_tail=tail, duration_s=40.0)
            exp(i, "crash", "judging", "crashed", reason="exit code 1")
            continue
        metric = best + rng.uniform(-0.004, 0.03)
        exp(i, "finish", "training", "judging", exit_code=0, metric=metric, log_tail=tail, duration_s=300.0)
        if metric < best:
            best, best_sha = metric, sha(i + 1)
            exp(i, "keep", "judging", "kept", metric=metric, reason="improved")
        else:
            exp(i, "discard", "judging", "discarded", metric=metric, reason="no improvement")
    log.append("daemon", "stop", "running", "stopped", {"reason": "bench"})
    log.close()


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def page_load(driver, url: str, points: int, rows: int) -> tuple[float, float]:
    """(seconds from navigation until the page shows every point and row, as the page itself timed
    it: its `autoresearch:rendered` mark, set once its first full render is on screen; and the
    same seen from outside, through the driver's round trips)."""
    driver.get("about:blank")
    script = ("return document.querySelectorAll('#chart-svg .pt').length === arguments[0] && "
              "document.getElementById('experiments').dataset.rows === String(arguments[1]) && "
              "document.querySelectorAll('#experiments tbody tr').length === Math.min(100, arguments[1]) && "
              "performance.getEntriesByName('autoresearch:rendered').map(e => e.startTime)[0]")
    t0 = time.perf_counter()
    driver.get(url)
    while not (mark := driver.execute_script(script, points, rows)):
        time.sleep(0.005)
    return mark / 1000, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=1000)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--loop-experiments", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_workspace(tmp / "big")
        t0 = time.perf_counter()
        synthesize(root, args.experiments)
        print(f"event log: {args.experiments} experiments written in {time.perf_counter() - t0:.1f} s")
        check = subprocess.run([sys.executable, "-m", "autoresearch", "verify", str(root)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
        driver = browser(tmp / "profile")
        try:
            t0 = time.perf_counter()
            dash = Dashboard(root)
            print(f"dashboard started (the log folded) in {time.perf_counter() - t0:.2f} s")
            try:
                timed = [page_load(driver, dash.url, args.experiments + 1, args.experiments + 1)
                         for _ in range(args.loads)]
                loads, outside = [t[0] for t in timed], [t[1] for t in timed]
                print(f"page load, {args.experiments} experiments: median {statistics.median(loads) * 1000:.0f} ms "
                      f"(min {min(loads) * 1000:.0f}, max {max(loads) * 1000:.0f}; {args.loads} loads; "
                      f"target <= 1000 ms); seen through the driver: median {statistics.median(outside) * 1000:.0f} ms")
                rss, peak = rss_mb(dash.proc.pid)
                print(f"server memory after the loads: {rss:.0f} MB resident, peak {peak:.0f} MB (target <= 100 MB)")
            finally:
                dash.stop()

            without, with_open, server_cpu = [], [], []
            for r in range(args.rounds):
                for open_page in (False, True):
                    ws = make_workspace(tmp / f"loop-{r}-{int(open_page)}")
                    dash = None
                    if open_page:
                        dash = Dashboard(ws)
                        driver.get(dash.url)
                        time.sleep(2)  # started and settled: what is measured is the page following the loop
                        cpu0 = cpu_seconds(dash.proc.pid)
                    try:
                        events, _ = run_daemon(ws, args.loop_experiments)
                    finally:
                        if dash is not None:
                            time.sleep(1.5)  # the last events reach the page
                            shown = driver.execute_script("return document.getElementById('seq').textContent")
                            used = cpu_seconds(dash.proc.pid) - cpu0
                            dash.stop()
                    overhead = measure(events)[0]
                    (with_open if open_page else without).extend(overhead)
                    label = "with the page open" if open_page else "without the dashboard"
                    extra = ""
                    if open_page:
                        server_cpu.append(used * 1000 / args.loop_experiments)
                        extra = (f"; the page showed event {shown} of {len(events)}; the server used "
                                 f"{server_cpu[-1]:.1f} ms CPU per experiment")
                    print(f"  round {r + 1}, {label}: loop overhead median {statistics.median(overhead):.0f} ms{extra}")
            if not args.rounds:
                return
            print(f"loop overhead per experiment: without the dashboard median {statistics.median(without):.0f} ms "
                  f"(p90 {sorted(without)[int(len(without) * 0.9)]:.0f}); with the dashboard and the page open "
                  f"median {statistics.median(with_open):.0f} ms (p90 {sorted(with_open)[int(len(with_open) * 0.9)]:.0f})")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
