"""Event log figures: durable append rate, and replay (read + fold) of 100,000 events.

    python bench/eventlog.py [--appends 5000] [--events 100000]

Targets (issue 2): append >= 5,000 events/s durable (WAL, synchronous=FULL,
one transaction per event); replay of 100,000 events <= 1 s.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch.eventlog import (GENESIS_HASH, INSERT_SQL, EventLog, canonical_payload, event_hash,  # noqa: E402
                                   utc_now)
from autoresearch.state import fold  # noqa: E402

# A realistic mix: one experiment's worth of events, payloads of the sizes the daemon writes.
CYCLE = [
    ("start", "new", "proposing", {"kind": "experiment", "proposer": "offline"}),
    ("proposed", "proposing", "proposing", {"description": "MATRIX_LR 0.04 -> 0.06", "proposer": "offline",
                                            "files": {"train.py": "x = 1\n" * 60}, "usage": {}, "cost_usd": 0.0}),
    ("commit", "proposing", "committed", {"commit": "a" * 40, "parent": "b" * 40, "added": 1, "removed": 1,
                                          "hashes": {"train.py": "c" * 64}}),
    ("launch", "committed", "training", {"log": ".autoresearch/runs/1.log", "attempt": 1, "sandbox": "auto"}),
    ("finish", "training", "judging", {"exit_code": 0, "metric": 0.987654, "memory_gb": 44.1,
                                       "duration_s": 300.2, "log_tail": "step 100 loss 3.2\n" * 40}),
    ("discard", "judging", "discarded", {"metric": 0.987654, "reason": "no improvement"}),
]


def bench_append(n: int, folder: Path) -> float:
    log = EventLog.open(folder / "append.sqlite")
    t0 = time.perf_counter()
    for i in range(n):
        trigger, src, dst, payload = CYCLE[i % len(CYCLE)]
        log.append(f"experiment:{i // len(CYCLE)}", trigger, src, dst, payload)
    elapsed = time.perf_counter() - t0
    log.close()
    return n / elapsed


def build_log(n: int, path: Path) -> None:
    """Write n valid, chained events fast (one transaction): only the replay is measured."""
    log = EventLog.open(path)
    prev, rows = GENESIS_HASH, []
    for i in range(n):
        trigger, src, dst, payload = CYCLE[i % len(CYCLE)]
        seq, t, agg, text = i + 1, utc_now(), f"experiment:{i // len(CYCLE)}", canonical_payload(payload)
        digest = event_hash(seq, t, agg, trigger, src, dst, text, prev)
        rows.append((seq, t, agg, trigger, src, dst, text, prev, digest))
        prev = digest
    with log.db.conn:
        log.db.conn.executemany(INSERT_SQL, rows)
    log.close()


def bench_replay(path: Path, repeats: int = 5) -> tuple[float, float, int]:
    replays, verifies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        log = EventLog.open(path, create=False)
        state = fold(log.events())
        replays.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert log.verify().ok
        verifies.append(time.perf_counter() - t0)
        log.close()
    return statistics.median(replays), statistics.median(verifies), len(state.experiments)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appends", type=int, default=5000)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        rates = [bench_append(args.appends, folder / str(i)) if (folder / str(i)).mkdir() is None else 0
                 for i in range(3)]
        print(f"durable append: median {statistics.median(rates):,.0f} events/s over 3 x {args.appends} "
              f"(WAL, synchronous=FULL, one commit per event; target >= 5,000)")
        path = folder / "replay.sqlite"
        build_log(args.events, path)
        replay, verify, exps = bench_replay(path)
        print(f"replay {args.events:,} events (open + read + fold, {exps:,} experiments): median {replay:.3f} s "
              f"(target <= 1 s)")
        print(f"verify {args.events:,} events (sequence + hash chain): median {verify:.3f} s")


if __name__ == "__main__":
    main()
