"""The built-in workload's trusted evaluation, cheat by cheat, as real experiments.

One workspace (module-scoped: one daemon run, a tiny model, a 1 s budget) under bubblewrap; a
scripted command agent turns train.py into one cheat per experiment; each outcome is read from
the event log and the run logs, from outside. Plus the honest case without a sandbox, where
train.py can print its own figure: it must match the trusted one.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)  # one daemon run of six real (tiny) trainings and evaluations

from autoresearch import sandbox
from autoresearch.judge import TRUST_TOLERANCE
from autoresearch.state import fold

from daemon_fixtures import cli, events, make_workspace
from trainer_fixtures import PYTHON, subprocess_env, workspace, write_corpus

TINY = '''import sys
import torch, torch.nn as nn, torch.nn.functional as F
from autoresearch.trainer import harness
CHEAT = ""
STEPS = 15
W = harness.load()
torch.manual_seed(0)

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(W.vocab_size, 32)
        self.head = nn.Linear(32, W.vocab_size)
    def forward(self, idx):
        h = self.emb(idx)
        if CHEAT == "future":  # position t also sees token t+1
            h = h + self.emb(torch.roll(idx, -1, dims=1))
        if CHEAT == "custom_op" and not self.training:  # only in the exported graph
            h = peek(h)
        return self.head(h)

if CHEAT == "custom_op":
    @torch.library.custom_op("cheat::peek", mutates_args=())
    def peek(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
    @peek.register_fake
    def _(x):
        return torch.empty_like(x)

if CHEAT == "peek_val":
    path = W.entry / "val" / "val.bin"
    try:
        open(path, "rb").read(16)
        print(f"validation split readable at {path}")
    except OSError as exc:
        print(f"validation split hidden: {type(exc).__name__} {path}")
        sys.exit(3)

model = Tiny()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _, (x, y) in zip(range(0 if CHEAT == "fake" else STEPS), W.train_batches(8)):
    loss = F.cross_entropy(model(x).view(-1, W.vocab_size), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
if CHEAT == "fake":
    W.submit(model)
    print("val_bpb: 0.000100")
elif CHEAT == "no_handover":
    print("val_bpb: 1.000000")
else:
    val_bpb = W.submit(model)
    if val_bpb is not None:
        print(f"val_bpb: {val_bpb:.6f}")
'''

CHEATS = ["fake", "peek_val", "future", "no_handover", "custom_op"]

AGENT = r'''
import pathlib, re, sys
n = int(re.search(r"^# Experiment (\d+)", sys.stdin.read(), re.M).group(1))
cheats = %r
train = pathlib.Path("train.py")
train.write_text(re.sub(r'^CHEAT = ".*"$', f'CHEAT = "{cheats[n - 1]}"', train.read_text(), flags=re.M))
print(f"cheat {cheats[n - 1]}")
''' % (CHEATS,)


@pytest.fixture(scope="module")
def cheated(tmp_path_factory):
    kind, why = sandbox.expected("auto")
    if kind != "bwrap":
        pytest.skip(f"needs bubblewrap: {why}")
    tmp = tmp_path_factory.mktemp("trusted")
    corpus = write_corpus(tmp / "corpus", n_docs=60, lines=40)
    agent = tmp / "agent.py"
    agent.write_text(AGENT)
    root = make_workspace(tmp / "ws", train=TINY,
                          run={"command": "python train.py", "prepare_command": "python -m autoresearch.trainer.prepare",
                               "budget_seconds": 1.0, "deadline_seconds": 300.0},
                          sandbox={"mode": "strict"},
                          workload={"profile": "cpu", "data": f"dir:{corpus}"},
                          eval={},  # no [eval] command: the built-in evaluator
                          proposer={"kind": "command", "fallback": "reject"},
                          command={"argv": [sys.executable, str(agent)], "deadline_seconds": 30.0})
    cache = tmp / "cache"
    out = cli("run", str(root), "--max-experiments", str(len(CHEATS)), timeout=850,
              env={"AUTORESEARCH_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stderr[-3000:]
    st = fold(events(root))
    by_cheat = {CHEATS[n - 1]: e for n, e in st.experiments.items() if n >= 1}
    return root, cache, st.experiments[0], by_cheat


def _log(root, name):
    return (root / ".autoresearch" / "runs" / name).read_text()


def test_honest_baseline_is_measured_by_the_evaluator(cheated):
    root, cache, base, _ = cheated
    assert base.state == "kept", base.reason
    assert base.printed is None  # the validation split is hidden from train.py: it cannot print one
    assert 0 < base.metric < 12  # bits per byte of a briefly trained tiny model
    assert re.search(r"^val_bpb:\s+[0-9.]+$", _log(root, "0-eval.log"), re.M)


def test_a_fake_printed_figure_is_discarded(cheated):
    exp = cheated[3]["fake"]
    assert exp.state == "discarded" and exp.printed == pytest.approx(1e-4)
    assert exp.reason.startswith("reported metric differs from trusted evaluation"), exp.reason
    assert exp.metric > 1  # the untrained model's trusted figure
    show = cli("show", str(cheated[0]), str(exp.n))
    assert "reported metric differs from trusted evaluation" in show.stdout
    results = cli("results", str(cheated[0]))
    assert re.search(r"\tdiscard\tcheat fake \(reported metric differs from trusted evaluation", results.stdout)


def test_the_validation_split_does_not_exist_for_train_py(cheated):
    root, cache, _, by = cheated
    exp = by["peek_val"]
    log = _log(root, f"{exp.n}.log")
    assert "validation split hidden: FileNotFoundError" in log, log[-2000:]
    assert exp.state == "crashed" and exp.reason == "exit code 3"
    assert list(cache.glob("cpu-*/val/val.bin"))  # it exists on the host: hidden, not missing


def test_a_model_that_sees_the_future_is_crashed_by_the_causality_probe(cheated):
    exp = cheated[3]["future"]
    assert exp.state == "crashed"
    assert exp.reason.startswith("evaluation: causality probe"), exp.reason
    assert "the model sees the future" in exp.reason


def test_skipping_the_hand_over_is_a_crash_with_the_reason(cheated):
    exp = cheated[3]["no_handover"]
    assert exp.state == "crashed"
    assert "no exported model at model.pt2: train.py must hand its model over" in exp.reason, exp.reason


def test_a_custom_operator_in_the_export_is_refused(cheated):
    exp = cheated[3]["custom_op"]
    assert exp.state == "crashed"
    assert exp.reason == "evaluation: forbidden operator(s) in the exported graph: cheat::peek", exp.reason


def test_honest_printed_figure_matches_the_trusted_one_without_a_sandbox(tmp_path):
    """Where train.py can read the validation split (no sandbox), its printed figure is the
    trusted one within the judge's tolerance: the same computation in another process."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=60, lines=40)
    ws = workspace(tmp_path / "ws", data=f"dir:{corpus}")
    (ws / "train.py").write_text(TINY)
    env = subprocess_env(tmp_path / "cache")
    train = subprocess.run([PYTHON, "train.py"], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    printed = float(re.findall(r"^val_bpb: ([0-9.]+)$", train.stdout, re.M)[-1])
    ev = subprocess.run([PYTHON, "-m", "autoresearch.trainer.evaluate"], cwd=ws, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    trusted = float(re.findall(r"^val_bpb:\s+([0-9.]+)$", ev.stdout, re.M)[-1])
    assert abs(printed - trusted) <= TRUST_TOLERANCE * max(1.0, trusted)
