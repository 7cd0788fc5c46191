"""Chaos runs against the real daemon process (issues 6 and 11).

    python bench/chaos.py --kills 200 [--seed 1] [--slots 2]  # random SIGKILL soak
    python bench/chaos.py --damage 60 [--seed 1]     # damaged state: files, WAL, git, the lock
    python bench/chaos.py --outage 600               # the API unreachable for 600 s

--kills N: the daemon (offline proposer, instant fixture workload) is started
and SIGKILLed at a random instant, N times; after every kill the log must
verify. Every 25 kills, and at the end, it is run to quiescence (one more
experiment) and all invariants (tests/chaos_fixtures.py) are checked.
Prints tried / survived / lost and where the kills landed. With --slots K
(K > 1), K experiments train at once (runs of 0.5 s, so that they overlap)
and it also counts the kills that landed with several runs training.

--damage N: N rounds, each one fault picked at random: delete `-wal` while the daemon runs
then SIGKILL it (random instants), a plain SIGKILL, truncate the log file (1-3 pages), flip
one byte of a random event's payload, delete the last experiment's rows, SIGKILL inside
git's rollback (`reset`) or commit, delete daemon.lock and start a second daemon. After
each: `verify` must call the log damaged exactly when the fault damaged it; `repair` (when
needed) must print counts that add up to the events the anchors know and keep exactly
what it says; then the daemon runs one more experiment, numbered above every experiment
ref git holds, with no ref moved, and all invariants must hold.

--outage S: the Anthropic API (a loopback fake) answers 529 for S seconds,
then comes back. The daemon runs under a fake systemd (NOTIFY_SOCKET,
WATCHDOG_USEC=2 s): we count watchdog pings, the largest gap between them,
`block` events, requests, and experiments burned during the outage (must be
0), then wait for the first experiment after the API returns.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from autoresearch.eventlog import verify_path  # noqa: E402
from autoresearch.state import fold  # noqa: E402
from chaos_fixtures import (ApiLog, anchors, check_invariants, exp_refs, git_killed_inside,  # noqa: E402
                            kept_or_discarded, refs_overwritten)
from daemon_fixtures import cli, events, kill_runs, make_workspace, spawn_daemon  # noqa: E402


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _last_trigger(root: Path) -> str:
    db = root / ".autoresearch" / "events.sqlite"
    if not db.exists():
        return "(before the log existed)"
    evs = events(root)
    return evs[-1].trigger if evs else "(empty log)"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def _boots(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM events WHERE trigger = 'boot'").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists but its tables not yet (being created)
        return 0
    finally:
        con.close()


def soak(workdir: Path, kills: int, seed: int = 1, max_delay: float = 1.0, check_every: int = 25,
         startup_share: float = 0.1, slots: int = 1) -> dict:
    """Kill the daemon at random instants `kills` times; returns the figures (see module doc)."""
    rng = random.Random(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_workspace(workdir / "ws", **({"slots": {"count": slots}} if slots > 1 else {}))
    mode = workdir / "mode"  # several slots: runs long enough to overlap, so that kills find several training
    mode.write_text("sleep:0.5" if slots > 1 else "")
    env = {"AUTORESEARCH_TEST_MODE": str(mode)}
    landed: collections.Counter = collections.Counter()
    training: collections.Counter = collections.Counter()  # runs training when the kill landed -> kills
    problems: list[str] = []
    survived = 0
    t0 = time.monotonic()

    def to_quiescence(label: str) -> None:
        out = cli("run", str(root), "--max-experiments", "1", env=env, timeout=120)
        if out.returncode != 0:
            problems.append(f"{label}: restart exited {out.returncode}: {out.stderr[-500:]}")
        problems.extend(f"{label}: {p}" for p in check_invariants(root))

    db = root / ".autoresearch" / "events.sqlite"
    in_startup = 0
    for i in range(1, kills + 1):
        boots = _boots(db)
        proc = spawn_daemon(root, env=env)
        if rng.random() < startup_share:  # anywhere from exec to the first steps
            in_startup += 1
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # in the loop: a random instant after this process's `boot` event
            end = time.monotonic() + 30
            while _boots(db) == boots and proc.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, max_delay))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        elif proc.returncode != 0:  # without limits it never ends by itself: it refused to start
            problems.append(f"kill {i}: the daemon exited {proc.returncode} by itself")
            to_quiescence(f"after kill {i}")  # says why; no point in going on
            kills = i
            break
        proc.wait(timeout=30)
        landed[_last_trigger(root)] += 1
        report = verify_path(db, anchors(root)) if db.exists() else None
        if report is not None and report.ok:
            training[sum(1 for e in fold(events(root)).in_flight() if e.state == "training")] += 1
        if report is None or report.ok:
            survived += 1
        else:
            problems.append(f"kill {i}: verify: {report}")
        if i % check_every == 0 or i == kills:
            to_quiescence(f"after kill {i}")
    st = fold(events(root))
    exps = [e for e in st.experiments.values() if e.kind == "experiment"]
    ns = sorted(st.experiments)
    lost = len(set(range(len(ns))) ^ set(ns)) + sum(1 for e in st.experiments.values() if not e.terminal)
    kill_runs(root)  # only matters when an invariant already failed
    return {"tried": kills, "in_startup": in_startup, "survived": survived, "lost": lost, "problems": problems,
            "slots": slots, "training_at_kill": dict(sorted(training.items())),
            "experiments": len(exps), "counts": st.counts(), "events": st.seq, "boots": st.boots,
            "seconds": round(time.monotonic() - t0, 1), "landed": dict(landed.most_common())}


FAULTS = ("wal+kill", "kill", "truncate", "flip", "trailing", "kill-in-reset", "kill-in-commit", "lockfile")
DAMAGES_LOG = {"truncate", "flip", "trailing"}  # the faults after which `verify` must fail


def _apply(fault: str, root: Path, workdir: Path, rng: random.Random, mode: Path) -> str:
    """Inflict `fault` on the workspace; returns a note on what was done."""
    state_dir = root / ".autoresearch"
    db = state_dir / "events.sqlite"
    env = {"AUTORESEARCH_TEST_MODE": str(mode)}
    if fault in ("wal+kill", "kill"):
        mode.write_text("sleep:0.2")
        proc = spawn_daemon(root, env=env)
        time.sleep(rng.uniform(0.5, 3.0))
        if fault == "wal+kill":
            Path(f"{db}-wal").unlink(missing_ok=True)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait(timeout=30)
        kill_runs(root)
        mode.write_text("")
        return f"killed after {_last_trigger(root)}"
    if fault == "lockfile":
        mode.write_text("sleep:0.5")
        proc = spawn_daemon(root, env=env)
        end = time.monotonic() + 30
        while not (state_dir / "daemon.lock").exists() and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        (state_dir / "daemon.lock").unlink(missing_ok=True)
        second = cli("run", str(root), "--max-experiments", "1", env=env, timeout=60)
        cli("stop", str(root), "--timeout", "30")
        rc = proc.wait(timeout=60)
        mode.write_text("")
        if second.returncode != 3:
            return f"VIOLATION: a second daemon started (exit {second.returncode}): {second.stderr[-300:]}"
        return f"second daemon refused; first exited {rc}"
    if fault in ("kill-in-reset", "kill-in-commit"):
        verb = fault.rsplit("-", 1)[1]
        if verb == "reset":
            mode.write_text("crash")  # the experiment crashes: its rollback is a reset
        out = cli("run", str(root), "--max-experiments", "1", env={**env, **git_killed_inside(workdir, verb)},
                  timeout=120)
        mode.write_text("")
        (workdir / f"kill-in-{verb}").unlink(missing_ok=True)
        return f"exit {out.returncode}"
    # File faults, on a log at rest (the daemon stopped, everything in the main file).
    evs = events(root)
    if fault == "truncate":
        pages = rng.randint(1, 3)
        data = db.read_bytes()
        db.write_bytes(data[: max(4096, len(data) - pages * 4096)])
        return f"cut {pages} page(s)"
    if fault == "flip":
        data = bytearray(db.read_bytes())
        for _ in range(50):  # a payload that occurs once in the file, so the flip hits that event
            victim = rng.choice(evs[1:])
            text = json.dumps(victim.payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
            if len(text) >= 30 and data.count(text) == 1:
                break
        else:
            return "skipped: no unique payload found in the file"
        at = data.find(text)
        i = at + rng.randrange(len(text))
        data[i] ^= 1 << rng.randrange(8)
        db.write_bytes(bytes(data))
        return f"flipped a bit of event {victim.seq}"
    if fault == "trailing":
        last_n = max(e.experiment for e in evs if e.experiment is not None)
        first = min(e.seq for e in evs if e.experiment == last_n)
        con = sqlite3.connect(db)
        con.execute("DELETE FROM events WHERE seq >= ?", [first])
        con.commit()
        con.close()
        return f"deleted events {first}-{evs[-1].seq}"
    raise ValueError(fault)


def damage(workdir: Path, rounds: int, seed: int = 1) -> dict:
    """`rounds` random faults on one workspace; returns the figures (see module doc)."""
    rng = random.Random(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_workspace(workdir / "ws")
    mode = workdir / "mode"
    mode.write_text("")
    db = root / ".autoresearch" / "events.sqlite"
    tried: collections.Counter = collections.Counter()
    survived: collections.Counter = collections.Counter()
    repaired = {"kept": 0, "quarantined": 0, "lost": 0}
    problems: list[str] = []
    t0 = time.monotonic()
    out = cli("run", str(root), "--max-experiments", "2", env={"AUTORESEARCH_TEST_MODE": str(mode)})
    if out.returncode != 0:
        return {"problems": [f"setup: {out.stderr[-500:]}"]}
    for i in range(1, rounds + 1):
        fault = rng.choice(FAULTS)
        tried[fault] += 1
        bad: list[str] = []
        note = _apply(fault, root, workdir, rng, mode)
        if note.startswith("VIOLATION"):
            bad.append(note)
        refs = exp_refs(root)
        total = max((s for s, _ in anchors(root)), default=0)
        v = cli("verify", str(root))
        damaged = fault in DAMAGES_LOG and not note.startswith("skipped")
        if damaged and v.returncode == 0:
            bad.append(f"verify says ok after {fault} ({note})")
        if not damaged and v.returncode != 0:
            bad.append(f"verify fails after {fault} ({note}): {v.stderr[-300:]}")
        if v.returncode != 0:
            r = cli("repair", str(root))
            m = re.search(r"kept (\d+) of (\d+) events, quarantined (\d+).*lost (\d+)", r.stdout)
            e = re.search(r"(\d+) recorded as damaged by an earlier repair", r.stdout)
            if r.returncode != 0 or m is None:
                bad.append(f"repair failed: {r.stdout[-200:]} {r.stderr[-300:]}")
            else:
                kept, of, quarantined, lost = map(int, m.groups())
                earlier = int(e.group(1)) if e else 0
                actual = len(events(root))
                if kept + quarantined + lost + earlier != of or of < total or actual != kept:
                    bad.append(f"repair's counts do not add up: {m.group(0)}; anchors {total}; in the log {actual}")
                repaired["kept"] += kept
                repaired["quarantined"] += quarantined
                repaired["lost"] += lost
        taken = max((int(n.rsplit("/", 1)[1]) for n in refs), default=-1)
        # Two outcomes: an experiment whose start survived but not its commit ends first (given up).
        out = cli("run", str(root), "--max-experiments", "2", env={"AUTORESEARCH_TEST_MODE": str(mode)}, timeout=120)
        if out.returncode != 0:
            bad.append(f"restart exited {out.returncode}: {out.stderr[-500:]}")
        bad += [f"ref moved: {m}" for m in refs_overwritten(refs, root)]
        st = fold(events(root))
        newer = [n for n in st.experiments if n > taken]
        if out.returncode == 0 and not newer:
            bad.append(f"no experiment numbered above {taken} after the restart")
        bad += check_invariants(root)
        if bad:
            problems += [f"round {i} ({fault}: {note}): {b}" for b in bad]
        else:
            survived[fault] += 1
    kill_runs(root)
    st = fold(events(root)) if db.exists() else None
    return {"rounds": rounds, "tried": dict(tried), "survived": dict(survived), "repaired": repaired,
            "experiments": len(st.experiments) if st else 0, "events": st.seq if st else 0,
            "seconds": round(time.monotonic() - t0, 1), "problems": problems}


def outage(workdir: Path, seconds: float, recover_timeout: float = 900.0) -> dict:
    from anthropic_fake import FakeAnthropic, error_reply, tweak_constant

    root = make_workspace(Path(workdir) / "ws", proposer={"kind": "anthropic", "fallback": "reject"},
                          anthropic={"timeout_seconds": 2.0, "deadline_seconds": 30.0,
                                     "block_after_failures": 2})
    sock_path = str(Path(workdir) / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    pings: list[float] = []
    done = threading.Event()

    def listen():
        while not done.is_set():
            try:
                if b"WATCHDOG=1" in sock.recv(65536):
                    pings.append(time.monotonic())
            except socket.timeout:
                pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    down = [True]
    overloaded = error_reply(529, "overloaded_error", "Overloaded")
    api_log = ApiLog(lambda req: overloaded if down[0] else tweak_constant()(req))
    with FakeAnthropic() as api:
        api.default = api_log
        env = {"ANTHROPIC_API_KEY": "sk-ant-chaos-outage", "ANTHROPIC_BASE_URL": api.url,
               "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"}
        proc = spawn_daemon(root, env=env)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < seconds and proc.poll() is None:
                time.sleep(1)
            t_up = time.monotonic()
            alive = proc.poll() is None
            st = fold(events(root))
            burned = sum(st.counts().values())
            requests_down = len(api.requests)
            blocks = sum(1 for e in events(root) if e.trigger == "block")
            outage_pings = [t for t in pings if t0 <= t <= t_up]
            cpu_s = _cpu_seconds(proc.pid)
            down[0] = False
            recovered = None
            while proc.poll() is None and time.monotonic() - t_up < recover_timeout:
                if kept_or_discarded(root) >= 1:
                    recovered = time.monotonic() - t_up
                    break
                time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            done.set()
            listener.join(timeout=5)
            sock.close()
    gaps = [b - a for a, b in zip(outage_pings, outage_pings[1:])]
    problems = check_invariants(root, api_log)
    kill_runs(root)
    return {"outage_s": seconds, "alive_through_outage": alive, "experiments_burned": burned,
            "blocks": blocks, "requests_during_outage": requests_down,
            "daemon_cpu_s": cpu_s, "watchdog_pings": len(outage_pings), "max_ping_gap_s": round(max(gaps), 2) if gaps else None,
            "daemon_state_at_end_of_outage": st.daemon, "recovered_after_s": None if recovered is None
            else round(recovered, 1), "exit_code": rc, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, help="SIGKILL the daemon at N random instants")
    ap.add_argument("--damage", type=int, metavar="N", help="N rounds of random damage (files, WAL, git, lock)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slots", type=int, default=1, help="--kills with this many experiments training at once")
    ap.add_argument("--outage", type=float, nargs="?", const=600.0,
                    help="make the API unreachable for SECONDS (default 600)")
    args = ap.parse_args()
    if args.kills is None and args.outage is None and args.damage is None:
        ap.error("give --kills N, --damage N and/or --outage [SECONDS]")
    print(f"machine: {machine()}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.kills is not None:
            r = soak(Path(tmp) / "soak", args.kills, args.seed, slots=args.slots)
            print(f"soak ({r['slots']} slot(s)): tried {r['tried']} ({r['in_startup']} during start-up), "
                  f"survived {r['survived']}, lost {r['lost']} ({r['seconds']} s; {r['experiments']} experiments "
                  f"{r['counts']}, {r['events']} events, {r['boots']} boots)")
            print("  runs training when the kill landed -> kills: "
                  + ", ".join(f"{k}: {v}" for k, v in r["training_at_kill"].items()))
            print("  kills landed after: " + ", ".join(f"{k} {v}" for k, v in r["landed"].items()))
            for p in r["problems"]:
                print("  VIOLATION:", p)
            ok &= not r["problems"] and r["survived"] == r["tried"] and r["lost"] == 0
        if args.damage is not None:
            r = damage(Path(tmp) / "damage", args.damage, args.seed)
            print(f"damage: {r.get('rounds')} rounds in {r.get('seconds')} s; tried {r.get('tried')}; "
                  f"survived {r.get('survived')}; repair kept/quarantined/lost {r.get('repaired')}; "
                  f"{r.get('experiments')} experiments, {r.get('events')} events at the end")
            for p in r["problems"]:
                print("  VIOLATION:", p)
            ok &= not r["problems"]
        if args.outage is not None:
            r = outage(Path(tmp) / "outage", args.outage)
            print("outage: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "problems"))
            for p in r["problems"]:
                print("  VIOLATION:", p)
            ok &= (not r["problems"] and r["alive_through_outage"] and r["experiments_burned"] == 0
                   and r["recovered_after_s"] is not None)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
