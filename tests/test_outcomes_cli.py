"""results, show and plot agree on how each experiment ended, as a user reads them.

One workspace driven by a scripted agent CLI (a real `command` proposer) through every
outcome: a fallback to the offline search (the agent changed nothing), a rejection with its
own description, a crash, a skip in mid-run (a real `autoresearch skip`), and a kept change
with a long description as the last experiment.
"""

from __future__ import annotations

import csv
import io
import sys

import pytest

from daemon_fixtures import cli, current, make_workspace, spawn_daemon, state, wait_for

AGENT = r'''
import pathlib, re, sys
prompt = sys.stdin.read()
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
counter.with_name(f"prompt-{n}").write_text(prompt)
train = pathlib.Path("train.py")
text = train.read_text()
if n == 0:
    print("I have no idea")                      # changes nothing: the daemon falls back
elif n == 1:
    pathlib.Path("notes.txt").write_text("x")   # out of scope: rejected with this description
    train.write_text(text + "# wider\n")
    print("try a wider model and keep notes")
elif n == 2:
    train.write_text("import sys; sys.exit(1)\n" + text)
    print("exit early")
elif n == 3:
    train.write_text("import time; time.sleep(120)\n" + text)
    print("sleep for a long while")
else:
    text = re.sub(r"^LEARNING_RATE = .*$", "LEARNING_RATE = 0.1", text, flags=re.M)
    text = re.sub(r"^WIDTH = .*$", "WIDTH = 128", text, flags=re.M)
    train.write_text(text)
    print("raise LEARNING_RATE to 0.1 and WIDTH to 128 for a much faster descent")
'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("outcomes")
    agent = base / "agent.py"
    agent.write_text(AGENT)
    root = make_workspace(base / "lab", proposer={"kind": "command"}, slots={"lookahead": 0},  # in order
                          command={"argv": [sys.executable, str(agent), str(base / "calls")]})
    daemon = spawn_daemon(root)
    try:
        wait_for(lambda: current(root, "training", 4), timeout=90)
        skip = cli("skip", str(root))
        assert skip.returncode == 0, skip.stderr
        wait_for(lambda: 5 in state(root).experiments and state(root).experiments[5].terminal, timeout=90)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    st = state(root)
    assert [st.experiments[n].state for n in range(6)] == \
        ["kept", st.experiments[1].state, "rejected", "crashed", "discarded", "kept"], st.experiments
    return root


def test_results_name_each_outcome_without_inventing_a_metric(lab):
    out = cli("results", str(lab))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout), delimiter="\t"))
    assert list(rows[0]) == ["commit", "val_bpb", "memory_gb", "status", "description"]
    by_n = dict(enumerate(rows))
    assert by_n[2]["status"] == "reject" and by_n[2]["val_bpb"] == "" \
        and by_n[2]["description"] == "try a wider model and keep notes"
    assert by_n[3]["status"] == "crash" and by_n[3]["val_bpb"] == "0.000000"  # autoresearch's convention
    assert by_n[4]["status"] == "discard" and by_n[4]["val_bpb"] == "" and by_n[4]["memory_gb"] == ""
    assert by_n[4]["description"] == "sleep for a long while (skipped by user; no result)"
    # What the reference analysis does with the column: numbers, or NaN for an empty field.
    values = [float(r["val_bpb"]) for r in rows if r["val_bpb"] and r["status"] != "crash"]
    assert values and min(values) > 0.5  # no 0.000000 that reads like the best value


def test_the_agent_sees_a_rejection_with_its_description_and_its_reason(lab):
    prompt = (lab.parent / "prompt-2").read_text()  # the agent's third call: experiment 3
    row = next(line for line in prompt.splitlines() if line.startswith("| 2 |"))
    assert "try a wider model and keep notes" in row and "rejected: out of scope" in row and "notes.txt" in row


def test_show_says_why_and_works_inside_the_workspace(lab):
    fallback = cli("show", "1", cwd=lab)  # the directory defaults to the current one
    assert fallback.returncode == 0, fallback.stderr
    assert "proposer:    offline" in fallback.stdout
    assert "agent:       the command agent failed: " in fallback.stdout and "offline search proposed this" in fallback.stdout
    rejected = cli("show", ".", "2", cwd=lab)
    assert rejected.returncode == 0, rejected.stderr
    assert "description: try a wider model and keep notes" in rejected.stdout
    assert "experiment 2 (experiment): rejected" in rejected.stdout and "notes.txt" in rejected.stdout
    skipped = cli("show", str(lab), "4").stdout
    assert "experiment 4 (experiment): skipped (discarded before a result)" in skipped
    assert "metric:      -" in skipped and "reason:      skipped by user" in skipped
    bad = cli("show", str(lab), cwd=lab)  # a directory where the experiment number belongs
    assert bad.returncode == 2 and "not an experiment number" in bad.stderr


def test_plot_draws_each_outcome_and_every_label_inside_the_image(lab, tmp_path):
    import matplotlib.image

    png = tmp_path / "progress.png"
    out = cli("plot", str(lab), "-o", str(png))
    assert out.returncode == 0 and "(6 experiments)" in out.stdout, out.stderr
    pixels = matplotlib.image.imread(png)[:, :, :3]
    # The last experiment is kept, with a long label: nothing may touch the image's edges.
    for edge in (pixels[:, -8:], pixels[:8, :], pixels[:, :8], pixels[-8:, :]):
        assert edge.min() > 0.95, "something is drawn at the image's edge (a label cut off?)"


def test_plot_without_a_finished_experiment_writes_nothing(tmp_path):
    root = make_workspace(tmp_path / "ws", run={"command": "python -c 'import time; time.sleep(60)'"})
    daemon = spawn_daemon(root)
    try:
        wait_for(lambda: current(root, "training", 0), timeout=60)
        png = tmp_path / "p.png"
        out = cli("plot", str(root), "-o", str(png))
        assert out.returncode == 2 and "nothing to plot yet" in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and not png.exists()
        assert list(tmp_path.glob(".p.png*")) == []
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
