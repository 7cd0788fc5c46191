"""Make tests/data/workspace-v1.tar.gz: a workspace as autoresearch left it before issue 12 (slots).

The fixture is history: it was made once, with the code of commit d29c175 (main on 29 Nov 2026,
before the coordinator), and is committed so that tests/test_history_compat.py can check that
every later version still reads, verifies and resumes it. Re-running this script with newer code
makes a different fixture (that is not the point of it); it is kept to say exactly how the file
was made:

  python tests/data/make_v1_workspace.py --force  # from the repository root; replaces the tarball

(without --force it refuses to replace the committed fixture: a fixture made by newer code
would no longer test what older versions wrote).

What it does, with the real daemon (`autoresearch run`, a subprocess) on the fixture workload
(tests/daemon_fixtures.make_workspace; the offline proposer, seed 0, sandbox off):
  1. `run --max-experiments 4`: the baseline (experiment 0) and experiments 1-4; with this
     proposer 1, 2 and 4 are kept and 3 is discarded;
  2. the fixture's runs made to sleep 60 s, `run` again, and the daemon SIGKILLed while
     experiment 5 is training; its orphaned run is killed too (as a reboot would).
The workspace directory (the git repository, .autoresearch/ with events.sqlite and its -wal /
-shm as the kill left them, the runs' logs of a few hundred bytes, the slot worktree) is packed
under workspace/, next to fixture.json: the commit of the code that made it, where the
workspace lived (the slot worktree's git link still points there), and what `autoresearch
results` printed then.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemon_fixtures import cli, current, kill9, kill_runs, make_workspace, spawn_daemon, state, wait_for  # noqa: E402

OUT = HERE / "workspace-v1.tar.gz"


def _skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # git's sample hooks are templates git init copies; nothing reads them (and they are most of the size).
    if "/.git/hooks/" in info.name and info.name.endswith(".sample"):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def main() -> int:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="autoresearch-v1-") as tmp:
        root = make_workspace(Path(tmp) / "workspace")
        out = cli("run", str(root), "--max-experiments", "4")
        if out.returncode != 0:
            sys.exit(f"run failed: {out.stderr[-2000:]}")
        results = cli("results", str(root)).stdout

        mode = Path(tmp) / "mode"
        mode.write_text("sleep:60")
        proc = spawn_daemon(root, env={"AUTORESEARCH_TEST_MODE": str(mode)})
        try:
            wait_for(lambda: current(root, "training", 5) or proc.poll() is not None, timeout=60)
            if proc.poll() is not None:
                sys.exit(f"the daemon exited ({proc.returncode}) before experiment 5 trained")
            time.sleep(0.3)  # the run is under way, its log started
            kill9(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_runs(root)
        # Packed as the kill left it: reading the log would checkpoint and remove its -wal.
        snapshot = Path(tmp) / "snapshot"
        shutil.copytree(root, snapshot, symlinks=True)
        st = state(root)
        summary = {n: (e.state, e.metric) for n, e in sorted(st.experiments.items())}
        fixture = {"made_by_commit": commit, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "path": str(root), "results_tsv": results, "in_flight": 5, "events": st.seq}
        (Path(tmp) / "fixture.json").write_text(json.dumps(fixture, indent=2) + "\n")
        with tarfile.open(OUT, "w:gz") as tar:
            tar.add(Path(tmp) / "fixture.json", arcname="fixture.json", filter=_skip)
            tar.add(snapshot, arcname="workspace", filter=_skip)
    print(f"{OUT}: {OUT.stat().st_size} bytes; experiments {summary}")
    return 0


if __name__ == "__main__":
    if OUT.exists() and sys.argv[1:] != ["--force"]:
        sys.exit(f"{OUT} exists: it is history (made by the code before slots); --force replaces it")
    os.environ.pop("AUTORESEARCH_CRASH_AT", None)
    sys.exit(main())
