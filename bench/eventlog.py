"""Event log figures, each beside a reference measured in the same run on the same disk.

    python bench/eventlog.py [--appends 200] [--rounds 10] [--events 100000]

Absolute times differ from machine to machine (a disk's fsync, a CPU's speed, other load),
so the targets are ratios to references that move with the machine:

- durable append (WAL, synchronous=FULL, one transaction per event) against the floor,
  a raw write+fsync of the same record to a file, and against a peer's durable journal,
  Optuna's JournalFileBackend (one fsync per append too). Targets: >= 0.5 x each (within
  2 x of one fsync per event, which is what both references pay and nothing more). Rounds alternate the three, so a change in the
  machine's load hits all of them; each ratio is the median of the rounds' ratios.
- replay of 100,000 events (open + read + fold into the daemon's state) against Optuna's
  replay of a journal of as many records of the same sizes (JournalStorage over
  JournalFileBackend, which reads and applies every record when it opens).
  Target: <= 0.4 x Optuna's time.
- verify (sequence and hash chain of every event), shown against the same replay of Optuna's.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend  # noqa: E402
from optuna.study import StudyDirection  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from autoresearch.clock import utc_iso  # noqa: E402
from autoresearch.eventlog import GENESIS_HASH, INSERT_SQL, EventLog, canonical_payload, event_hash  # noqa: E402

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

TARGETS = {"append_raw": 0.5, "append_optuna": 0.5, "replay_optuna": 0.4}


def record(i: int) -> dict:
    """Event i as a JSON-ready record: what the references append and replay."""
    trigger, src, dst, payload = CYCLE[i % len(CYCLE)]
    return {"seq": i + 1, "time": utc_iso(precision="microseconds"), "aggregate": f"experiment:{i // len(CYCLE)}", "trigger": trigger,
            "source": src, "dest": dst, "payload": payload, "prev_hash": "d" * 64, "hash": "e" * 64}


# -- durable append ---------------------------------------------------------------------------


def append_ours(n: int, folder: Path) -> float:
    log = EventLog.open(folder / "append.sqlite")
    t0 = time.perf_counter()
    for i in range(n):
        trigger, src, dst, payload = CYCLE[i % len(CYCLE)]
        log.append(f"experiment:{i // len(CYCLE)}", trigger, src, dst, payload)
    elapsed = time.perf_counter() - t0
    log.close()
    return n / elapsed


def append_raw(n: int, folder: Path) -> float:
    """The floor: each record encoded (as every journal must), appended to a file and fsync'ed, nothing else."""
    records = [record(i) for i in range(n)]
    fd = os.open(folder / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for rec in records:
            os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
            os.fsync(fd)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n / elapsed


def append_optuna(n: int, folder: Path) -> float:
    backend = JournalFileBackend(str(folder / "optuna.log"))
    records = [record(i) for i in range(n)]
    t0 = time.perf_counter()
    for rec in records:
        backend.append_logs([rec])
    return n / (time.perf_counter() - t0)


# -- replay -------------------------------------------------------------------------------------


def build_log(n: int, path: Path) -> None:
    """Write n valid, chained events fast (one transaction): only the replay is measured."""
    log = EventLog.open(path)
    prev, rows = GENESIS_HASH, []
    for i in range(n):
        trigger, src, dst, payload = CYCLE[i % len(CYCLE)]
        seq, t, agg, text = i + 1, utc_iso(precision="microseconds"), f"experiment:{i // len(CYCLE)}", canonical_payload(payload)
        digest = event_hash(seq, t, agg, trigger, src, dst, text, prev)
        rows.append((seq, t, agg, trigger, src, dst, text, prev, digest))
        prev = digest
    with log.db.conn:
        log.db.conn.executemany(INSERT_SQL, rows)
    log.close()


class _Memory(BaseJournalBackend):
    """Collects the records Optuna's own API writes, to put them in a file in one go."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def read_logs(self, log_number_from: int):
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict]) -> None:
        self.logs.extend(logs)


def build_optuna_journal(n: int, path: Path) -> int:
    """A journal of n records made through Optuna's API: per experiment a trial with the same
    payloads as user attributes and its result, six records like our six events."""
    memory = _Memory()
    storage = JournalStorage(memory)
    study = storage.create_new_study([StudyDirection.MINIMIZE], "bench")
    while len(memory.logs) < n:
        trial = storage.create_new_trial(study)
        for trigger, _, _, payload in CYCLE[1:5]:
            storage.set_trial_user_attr(trial, trigger, payload)
        storage.set_trial_state_values(trial, TrialState.COMPLETE, [0.987654])
    JournalFileBackend(str(path)).append_logs(memory.logs[:n])
    return study


def replay_pair(path: Path, journal: Path, study: int, repeats: int) -> tuple[list[float], list[float], int, int]:
    ours, peer = [], []
    for _ in range(repeats):  # alternate, so that a change of load hits both
        t0 = time.perf_counter()
        log = EventLog.open(path, create=False)
        state = log.state()
        log.close()
        ours.append(time.perf_counter() - t0)
        del log
        gc.collect()
        t0 = time.perf_counter()
        trials = JournalStorage(JournalFileBackend(str(journal))).get_all_trials(study, deepcopy=False)
        peer.append(time.perf_counter() - t0)
        gc.collect()
    return ours, peer, len(state.experiments), len(trials)


def verify_times(path: Path, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        log = EventLog.open(path, create=False)
        t0 = time.perf_counter()
        assert log.verify().ok
        out.append(time.perf_counter() - t0)
        log.close()
    return out


def _meets(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appends", type=int, default=200, help="appends per kind and round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5, help="replays and verifies")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}, load {os.getloadavg()[0]:.1f}; {date.today().isoformat()}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        rates: dict[str, list[float]] = {"ours": [], "raw": [], "optuna": []}
        kinds = [("ours", append_ours), ("raw", append_raw), ("optuna", append_optuna)]
        for r in range(args.rounds):
            for name, fn in kinds[r % 3:] + kinds[:r % 3]:  # each goes first in turn
                sub = folder / f"{name}-{r}"
                sub.mkdir()
                rates[name].append(fn(args.appends, sub))
        vs_raw = statistics.median(o / w for o, w in zip(rates["ours"], rates["raw"]))
        vs_optuna = statistics.median(o / p for o, p in zip(rates["ours"], rates["optuna"]))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"durable append, {args.rounds} rounds x {args.appends} each (one commit / fsync per event):")
        print(f"  ours (WAL, synchronous=FULL)          {med['ours']:>8,.0f} events/s")
        print(f"  raw write+fsync of the same records   {med['raw']:>8,.0f} records/s -> ours = {vs_raw:.2f} x "
              f"(target >= {TARGETS['append_raw']}: {_meets(vs_raw >= TARGETS['append_raw'])})")
        print(f"  Optuna JournalFileBackend             {med['optuna']:>8,.0f} records/s -> ours = {vs_optuna:.2f} x "
              f"(target >= {TARGETS['append_optuna']}: {_meets(vs_optuna >= TARGETS['append_optuna'])})")

        path, journal = folder / "replay.sqlite", folder / "replay.optuna.log"
        build_log(args.events, path)
        study = build_optuna_journal(args.events, journal)
        gc.collect()
        ours, peer, exps, trials = replay_pair(path, journal, study, args.repeats)
        ratio = statistics.median(o / p for o, p in zip(ours, peer))
        print(f"replay of {args.events:,} events, median of {args.repeats} (alternating):")
        print(f"  ours (open, read, fold: {exps:,} experiments)  {statistics.median(ours):.3f} s")
        print(f"  Optuna journal replay ({trials:,} trials)       {statistics.median(peer):.3f} s -> ours = "
              f"{ratio:.2f} x (target <= {TARGETS['replay_optuna']}: {_meets(ratio <= TARGETS['replay_optuna'])})")
        verify = statistics.median(verify_times(path, args.repeats))
        print(f"verify of {args.events:,} events (sequence + hash chain): median {verify:.3f} s = "
              f"{verify / statistics.median(peer):.2f} x Optuna's replay")


if __name__ == "__main__":
    main()
