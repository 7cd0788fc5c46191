"""The human-owned evaluation step ([eval] in autoresearch.toml), checked from outside.

A nanoGPT-style workspace: train.py writes out/score.txt (its "checkpoint") and prints a
val_bpb; evaluate.py, the human's file, reads the checkpoint and prints the trusted val_bpb.
Each test runs the real daemon (`autoresearch run`) with a scripted command agent.
"""

from __future__ import annotations

import signal
import sys

from autoresearch.state import fold

from daemon_fixtures import cli, events, git, make_workspace, spawn_daemon, wait_for, GIT_IDENTITY

TRAIN = '''import os, pathlib
SCORE = 2.0
PRINTED = None  # an honest run prints what it scored
os.makedirs("out", exist_ok=True)
pathlib.Path("out/score.txt").write_text(str(SCORE))
print(f"val_bpb: {SCORE if PRINTED is None else PRINTED:.6f}")
'''

EVALUATE = '''import os, pathlib, time
delay = os.environ.get("AUTORESEARCH_TEST_EVAL_DELAY")
if delay:
    time.sleep(float(delay))
try:
    pathlib.Path("out/eval-was-here").write_text("x")  # the checkout is read-only under bubblewrap
    print("checkout writable")
except OSError as exc:
    print(f"checkout read-only: {exc.strerror}")
print(f"val_bpb: {float(pathlib.Path('out/score.txt').read_text()):.6f}")
'''

# The agent: experiment n gets the edit AGENT_EDITS[n] (a Python statement run by the agent).
AGENT = r'''
import pathlib, re, sys
n = int(re.search(r"^# Experiment (\d+)", sys.stdin.read(), re.M).group(1))
train = pathlib.Path("train.py")
text = train.read_text()
edits = {
    1: lambda: train.write_text(text.replace("SCORE = 2.0", "SCORE = 1.5")),
    2: lambda: train.write_text(text.replace("SCORE = 1.5", "SCORE = 1.9").replace("PRINTED = None", "PRINTED = 0.1")),
    3: lambda: pathlib.Path("evaluate.py").write_text("print('val_bpb: 0.000001')\n"),
    4: lambda: train.write_text(text.replace("SCORE = 1.5", "SCORE = 1.2")),
}
edits.get(n, lambda: None)()
print(f"scripted edit for experiment {n}")
'''


def _workspace(tmp_path, sandbox="off"):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    root = make_workspace(tmp_path / "ws", train=TRAIN,
                          run={"command": "python train.py"},
                          sandbox={"mode": sandbox},
                          proposer={"kind": "command", "fallback": "reject"},
                          slots={"lookahead": 0},  # the agent's script edits the latest best, in order
                          command={"argv": [sys.executable, str(agent)], "deadline_seconds": 30.0},
                          eval={"command": "python evaluate.py", "files": ["evaluate.py"]})
    (root / "evaluate.py").write_text(EVALUATE)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "out/\n"
                                     if (root / ".gitignore").exists() else "out/\n")
    git(root, "add", "evaluate.py", ".gitignore")
    git(root, "commit", "-qm", "the human's evaluation")
    return root


def _experiments(root):
    return fold(events(root)).experiments


def test_eval_step_trusted_figure_cheats_and_edited_eval_file(tmp_path):
    root = _workspace(tmp_path, sandbox="auto")
    out = cli("run", str(root), "--max-experiments", "4", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    exps = _experiments(root)
    base, honest, liar, meddler, later = (exps[n] for n in range(5))
    assert base.state == "kept" and base.metric == 2.0
    assert honest.state == "kept" and honest.metric == 1.5 and honest.printed == 1.5
    # Printed 0.1, evaluated 1.9: discarded with the reason, the trusted figure recorded.
    assert liar.state == "discarded" and liar.metric == 1.9 and liar.printed == 0.1
    assert liar.reason.startswith("reported metric differs from trusted evaluation"), liar.reason
    # The agent's edit of the evaluation file is out of scope: rejected without a run.
    assert meddler.state == "rejected" and "modified: evaluate.py" in meddler.reason, meddler.reason
    assert meddler.runs == 0
    assert later.state == "kept" and later.metric == 1.2
    assert (root / "evaluate.py").read_text() == EVALUATE  # the human's file, untouched
    # The evaluation saw the run's checkout read-only (bubblewrap) and ran the human's file.
    eval_logs = sorted((root / ".autoresearch" / "runs").glob("*-eval.log"))
    assert len(eval_logs) == 4
    if fold(events(root)).experiments[1].sandbox == "bwrap":
        assert all("checkout read-only" in p.read_text() for p in eval_logs)
    evs = [e for e in events(root) if e.trigger == "evaluate"]
    import hashlib
    assert {e.payload["files"]["evaluate.py"] for e in evs} == {hashlib.sha256(EVALUATE.encode()).hexdigest()}
    # results and show say why it was discarded.
    results = cli("results", str(root))
    assert results.returncode == 0, results.stderr
    assert "reported metric differs from trusted evaluation" in results.stdout
    show = cli("show", str(root), "2")
    assert "reported metric differs from trusted evaluation" in show.stdout, show.stdout


def test_kill_during_evaluation_reruns_only_the_evaluation(tmp_path):
    root = _workspace(tmp_path)
    env = {"AUTORESEARCH_TEST_EVAL_DELAY": "30"}
    proc = spawn_daemon(root, "--max-experiments", "0", env=env)
    try:
        wait_for(lambda: any(e.trigger == "evaluate" for e in events(root))
                 if (root / ".autoresearch" / "events.sqlite").exists() else False, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = cli("run", str(root), "--max-experiments", "0", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    base = _experiments(root)[0]
    triggers = [e.trigger for e in events(root) if e.aggregate == "experiment:0"]
    assert triggers.count("launch") == 1 and triggers.count("trained") == 1, triggers
    assert triggers.count("evaluate") == 2 and triggers.count("evaluated") == 1, triggers
    assert "interrupt" not in triggers
    assert base.state == "kept" and base.metric == 2.0 and base.runs == 1
