"""The built-in workload: settings, BPB, tokenizer, corpora, prepare, train.py end to end."""

from __future__ import annotations

import ast
import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from autoresearch.errors import ConfigError
from autoresearch.trainer import PROFILES, TEMPLATE_DEFAULTS, detect_profile, harness_dir, workload_files
from autoresearch.trainer import harness, prepare, tokenizer
from autoresearch.trainer.settings import budget_seconds, read_settings, Settings
from autoresearch.trainer.sources import DataError, DirCorpus, StdlibCorpus
from trainer_fixtures import (PYTHON, cache, mixed_text, session_cache, small_corpus,  # noqa: F401
                              subprocess_env, workspace, write_corpus)

METRIC_RE = r"^val_bpb:\s*([0-9.eE+-]+|nan|inf|-inf)"  # the daemon's default regexes
MEMORY_RE = r"^peak_vram_mb:\s*([0-9.]+)"


# --- profiles, template, settings -------------------------------------------------------

def test_profiles_and_workload_files():
    assert PROFILES["cpu"]["budget_seconds"] == 60 and PROFILES["gpu"]["budget_seconds"] == 300
    assert PROFILES["gpu"]["seq_len"] == 2048
    assert detect_profile() in PROFILES
    assert (harness_dir() / "harness.py").is_file()
    for profile in PROFILES:
        files = workload_files(profile)
        assert set(files) == {"train.py", "program.md"}
        tree = ast.parse(files["train.py"])  # substituted template is valid Python
        constants = {}
        for node in tree.body:  # top-level UPPERCASE hyperparameters are plain numeric literals
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, (int, float)):
                    constants[node.targets[0].id] = node.value.value
        assert constants == TEMPLATE_DEFAULTS[profile]
        for name in constants:  # one per line, `NAME = value  # comment`, as the proposer parses them
            assert re.search(rf"^{name} = [0-9.e+-]+  # \S", files["train.py"], re.M), name
        assert "val_bpb" in files["program.md"] and "train.py" in files["program.md"]


def test_program_md_at_the_root_is_the_packaged_default():
    # One file: the repository root shows the package's own program.md (like systemd/), so a
    # newcomer finds it where autoresearch keeps it and the installed package still ships it.
    root = Path(__file__).resolve().parents[1]
    top = root / "program.md"
    assert top.is_symlink() and top.resolve() == (harness_dir() / "program.md").resolve()
    assert workload_files("cpu")["program.md"] == top.read_text(encoding="utf-8")
    with pytest.raises(ConfigError):
        workload_files("tpu")


def test_settings(tmp_path, monkeypatch):
    assert read_settings(tmp_path) == Settings(detect_profile(), "stdlib", "")
    workspace(tmp_path, "gpu", "dir:/data/x", 'data_url = "http://127.0.0.1:1/"\n')
    assert read_settings(tmp_path) == Settings("gpu", "dir:/data/x", "http://127.0.0.1:1")
    for body, needle in [('profile = "tpu"', "profile"), ('data = "web"', "data"),
                         ('data = "dir:rel/path"', "absolute"), ("profile = 3", "string")]:
        (tmp_path / "autoresearch.toml").write_text(f"[workload]\n{body}\n")
        with pytest.raises(ConfigError, match=needle):
            read_settings(tmp_path)
    (tmp_path / "autoresearch.toml").write_text("[workload\n")
    with pytest.raises(ConfigError):
        read_settings(tmp_path)
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    assert budget_seconds("cpu") == 60
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "3")
    assert budget_seconds("cpu") == 3
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "-1")
    with pytest.raises(ConfigError):
        budget_seconds("cpu")


# --- BPB ------------------------------------------------------------------------------------

class Uniform(torch.nn.Module):
    """Predicts the uniform distribution over `vocab` ids."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


def test_bpb_uniform_model_is_exactly_log2_v_times_tokens_over_bytes():
    V, T, bos = 50, 8, 49
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=200).astype(np.uint16)
    tokens[::7] = bos  # special tokens among the targets: excluded from both sums
    nbytes = torch.tensor([1 + i % 4 for i in range(V - 1)] + [0])
    eval_tokens = 100
    n_targets = eval_tokens // T * T
    targets = tokens[1:n_targets + 1].astype(np.int64)
    counted = targets != bos
    expected = math.log2(V) * counted.sum() / nbytes[targets].sum().item()
    for batch in (1, 3, 64):
        got = harness.evaluate_bpb(Uniform(V), tokens, nbytes, T, eval_tokens, batch)
        assert got == pytest.approx(expected, rel=1e-6)


def byte_level_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(name="bytes", pat_str=tokenizer.SPLIT_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={tokenizer.BOS: 256})


def test_bpb_counts_raw_bytes_of_partial_utf8_tokens():
    enc = byte_level_encoding()
    text = "€ 🙂 naïve"
    ids = enc.encode_ordinary(text)
    assert enc.decode([ids[0]]) == "\ufffd"  # a lone lead byte decodes to U+FFFD (3 bytes) ...
    lengths = tokenizer.token_byte_lengths(enc)
    assert lengths[ids[0]] == 1  # ... but is one raw byte
    assert lengths[256] == 0  # BOS
    tokens = np.array([256, *ids], dtype=np.uint16)
    got = harness.evaluate_bpb(Uniform(257), tokens, torch.tensor(lengths), len(ids), len(ids), 1)
    assert got == pytest.approx(math.log2(257) * len(ids) / len(text.encode()), rel=1e-6)


class Bigram(torch.nn.Module):
    def __init__(self, vocab, fail_above=None):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)
        self.fail_above = fail_above
        self.calls = []

    def forward(self, idx):
        self.calls.append(idx.size(0))
        if self.fail_above and idx.size(0) > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.table(idx)


def test_evaluation_is_deterministic_and_retries_smaller_batch_on_oom(capsys):
    V = 64
    tokens = np.random.default_rng(1).integers(0, V, size=4000).astype(np.uint16)
    nbytes = torch.ones(V, dtype=torch.int64)
    ref = harness.evaluate_bpb(Bigram(V), tokens, nbytes, 32, 2048, 16)
    assert harness.evaluate_bpb(Bigram(V), tokens, nbytes, 32, 2048, 16) == ref
    assert harness.evaluate_bpb(Bigram(V), tokens, nbytes, 32, 2048, 5) == pytest.approx(ref, rel=1e-9)
    flaky = Bigram(V, fail_above=4)
    assert harness.evaluate_bpb(flaky, tokens, nbytes, 32, 2048, 16) == pytest.approx(ref, rel=1e-9)
    assert flaky.calls[:3] == [16, 8, 4] and flaky.training
    assert "retrying with batch size 4" in capsys.readouterr().out


# --- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path):
    import random

    texts = [mixed_text(random.Random(i), 30) for i in range(40)]
    enc = tokenizer.train(texts, vocab_size=400, max_chars=10**9)
    assert enc.n_vocab == 400 and enc.encode_single_token(tokenizer.BOS) == 399
    tokenizer.save(enc, tmp_path / "tok.json")
    loaded = tokenizer.load(tmp_path / "tok.json")
    samples = ["def f(x):\n    return x ** 2  # squares\n", "naïve café 東京 данные λ→≤ ñandú",
               "emoji 🙂🚀👩‍👩‍👧 and \t tabs\r\n", "", "x" * 1000, "\x00\x7f\ufffd control and replacement"]
    for text in samples:
        ids = loaded.encode_ordinary(text)
        assert ids == enc.encode_ordinary(text)
        assert loaded.decode(ids) == text
        assert b"".join(loaded.decode_single_token_bytes(i) for i in ids) == text.encode()
    assert len(loaded.encode_ordinary(texts[0])) < len(texts[0].encode()) / 2  # merges were learned


# --- corpora and splits --------------------------------------------------------------------

def test_validation_split_never_overlaps_training(small_corpus):
    corpus = DirCorpus(small_corpus, val_percent=10)
    train, val = list(corpus.documents("train")), list(corpus.documents("val"))
    everything = sorted(p.read_text(encoding="utf-8") for p in small_corpus.glob("*.txt"))
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == everything
    again = DirCorpus(small_corpus, val_percent=10)
    assert list(again.documents("val")) == val and again.fingerprint() == corpus.fingerprint()


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    write_corpus(tmp_path / "c", n_docs=2, lines=3)
    corpus = DirCorpus(tmp_path / "c", val_percent=1)
    assert len(list(corpus.documents("val"))) == 1 and len(list(corpus.documents("train"))) == 1
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one")
    with pytest.raises(DataError, match="at least 2 documents"):
        DirCorpus(tmp_path / "one", 5).fingerprint()


def test_dir_corpus_reads_txt_jsonl_parquet_and_reports_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "d"
    root.mkdir()
    (root / "a.txt").write_text("plain text document")
    (root / "b.jsonl").write_text('{"text": "first row"}\n\n{"text": "second row", "id": 2}\n')
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"], "n": [1, 2]}), root / "c.parquet")
    corpus = DirCorpus(root, val_percent=30)
    docs = sorted(list(corpus.documents("train")) + list(corpus.documents("val")))
    assert docs == ["first row", "parquet one", "parquet two", "plain text document", "second row"]
    with pytest.raises(DataError, match="does not exist"):
        DirCorpus(tmp_path / "missing", 5)
    (root / "b.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match='"text"'):
        DirCorpus(root, 5).fingerprint()


def test_stdlib_corpus_excludes_tests_and_site_packages():
    corpus = StdlibCorpus(val_percent=5)
    keys = [key for key, _ in corpus.units()]
    assert len(keys) > 100 and "json/decoder.py" in keys
    assert not [k for k in keys if "site-packages" in k or k.startswith(("test/", "idlelib/idle_test/"))]
    assert all(k.endswith(".py") for k in keys)


# --- prepare -------------------------------------------------------------------------------

def test_prepare_is_idempotent_and_writes_consistent_files(tmp_path, cache, small_corpus):
    settings = Settings("cpu", f"dir:{small_corpus}")
    entry = prepare.ensure(settings)
    meta = json.loads((entry / "meta.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert prepare.ensure(settings) == entry
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps  # nothing rebuilt
    assert meta["fingerprint"] == DirCorpus(small_corpus, PROFILES["cpu"]["val_percent"]).fingerprint()
    train = np.fromfile(entry / "train.bin", dtype=np.uint16)
    assert train.size == meta["train"]["tokens"] and (train == meta["bos_id"]).sum() == meta["train"]["documents"]
    assert train.max() < meta["vocab_size"]
    # A different corpus never shares an entry.
    other = write_corpus(tmp_path / "other", n_docs=10, lines=20, seed=7)
    assert prepare.ensure(Settings("cpu", f"dir:{other}")) != entry


def test_prepare_cli_one_line_error_and_noop(tmp_path, cache, small_corpus):
    ws = workspace(tmp_path / "ws", data=f"dir:{tmp_path / 'nowhere'}")
    run = subprocess.run([PYTHON, "-m", "autoresearch.trainer.prepare"], cwd=ws, env=subprocess_env(cache),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and "does not exist" in run.stderr
    workspace(ws, data=f"dir:{small_corpus}")
    for _ in range(2):
        run = subprocess.run([PYTHON, "-m", "autoresearch.trainer.prepare"], cwd=ws, env=subprocess_env(cache),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""  # not a terminal: no progress output
        assert "prepared dir:" in run.stdout


def test_prepare_killed_midway_leaves_no_entry_and_rerun_matches(tmp_path):
    corpus = write_corpus(tmp_path / "big", n_docs=400, lines=150, seed=3)
    ws = workspace(tmp_path / "ws", data=f"dir:{corpus}")
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([PYTHON, "-m", "autoresearch.trainer.prepare"], cwd=ws, env=subprocess_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache_dir.glob(".tmp-*")):  # building has started
        assert proc.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(cache_dir.glob("cpu-*"))  # nothing that looks finished
    run = subprocess.run([PYTHON, "-m", "autoresearch.trainer.prepare"], cwd=ws, env=subprocess_env(cache_dir),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    entries = list(cache_dir.glob("cpu-*"))
    assert len(entries) == 1 and not list(cache_dir.glob(".tmp-*"))
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["fingerprint"] == DirCorpus(corpus, PROFILES["cpu"]["val_percent"]).fingerprint()


# --- train.py end to end ---------------------------------------------------------------------

def run_train(ws: Path, cache_dir: Path, budget: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "train.py"], cwd=ws, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(cache_dir, AUTORESEARCH_TIME_BUDGET=budget))


def test_train_py_end_to_end_on_stdlib(tmp_path, cache):
    ws = workspace(tmp_path / "lab")
    (ws / "train.py").write_text(workload_files("cpu")["train.py"])
    # Streamed, to see when each line arrives: never silent for much longer than 5 s, whether a
    # step takes 0.1 s or 10 s (a busy 2-core machine), during imports and evaluation too.
    proc = subprocess.Popen([PYTHON, "train.py"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=subprocess_env(cache, AUTORESEARCH_TIME_BUDGET="7"))
    arrivals, lines = [time.monotonic()], []
    for line in proc.stdout:
        arrivals.append(time.monotonic())
        lines.append(line)
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    stdout = "".join(lines)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 6.5, (gaps, stdout[-3000:])
    assert re.search(r"^step +\d+ \| loss [0-9.]+ \| .*\d+s since start$", stdout, re.M), stdout[-3000:]
    run = subprocess.CompletedProcess(proc.args, 0, stdout, "")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", run.stdout.split("\n---\n", 1)[1], re.M))
    val_bpb = float(re.findall(METRIC_RE, run.stdout, re.M)[-1])
    assert float(re.findall(MEMORY_RE, run.stdout, re.M)[-1]) > 0
    assert 7.0 <= float(summary["training_seconds"]) < 90 and int(summary["num_steps"]) >= 1
    # It learned: better than the uniform distribution over the vocabulary on the same bytes.
    entry = harness.load(ws).entry
    meta = json.loads((entry / "meta.json").read_text())
    val = np.fromfile(entry / "val" / "val.bin", dtype=np.uint16)[1:PROFILES["cpu"]["eval_tokens"] // 256 * 256 + 1]
    lengths = np.array(tokenizer.token_byte_lengths(tokenizer.load(entry / "tokenizer.json")))
    uniform = math.log2(meta["vocab_size"]) * (lengths[val] > 0).sum() / lengths[val].sum()
    assert 0 < val_bpb < uniform
    assert meta["corpus"] == "stdlib"


def test_train_py_fails_fast_on_divergence(tmp_path, cache):
    ws = workspace(tmp_path / "lab")
    text = workload_files("cpu")["train.py"]
    # A NaN in the logits from the first step on (an agent's broken edit), whatever the machine's speed.
    text = re.sub(r"^SOFTCAP = .*$", 'SOFTCAP = float("nan")  # broken', text, flags=re.M)
    (ws / "train.py").write_text(text)
    run = run_train(ws, cache, "30")
    assert run.returncode != 0
    assert re.search(r"^FAIL: training loss nan at step 0: diverged", run.stdout, re.M), run.stdout[-2000:] + run.stderr[-2000:]
    assert not re.search(METRIC_RE, run.stdout, re.M)


@pytest.mark.skipif(__import__("autoresearch.sandbox").sandbox.bwrap_usable()[0] is None,
                    reason="no bubblewrap here")
def test_a_sandboxed_run_uses_the_prepared_cache_read_only(tmp_path, cache, small_corpus):
    """A run sees the data cache read-only: it uses the entry the daemon's prepare step built
    (no lock file, nothing written), and says in one line when there is none."""
    from autoresearch import sandbox
    from autoresearch.config import SandboxConfig
    from autoresearch.runner import Run

    ws = workspace(tmp_path / "lab", data=f"dir:{small_corpus}")
    entry = prepare.ensure(read_settings(ws))
    before = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    code = "from autoresearch.trainer import prepare; print('entry', prepare.ensure()); print('val_bpb: 1')"

    def run(cache_dir: Path):
        layout = sandbox.Layout(checkout=ws, read_only=(cache_dir, small_corpus))
        return Run.start([PYTHON, "-c", code], ws, tmp_path / "run.log", 60, 10**6,
                         SandboxConfig("strict", 0, 4096, 4096), layout, r"^val_bpb: (\S+)",
                         env=subprocess_env(cache_dir)).wait(60)

    res = run(cache)
    assert res.ok and res.sandbox["kind"] == "bwrap", res.log_tail
    assert f"entry {entry}" in res.log_tail
    assert sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*")) == before
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    res = run(empty)
    assert res.exit_code == 1 and "is read-only here and holds no prepared data" in res.log_tail, res.log_tail
    assert list(empty.iterdir()) == []
