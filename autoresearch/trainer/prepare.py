"""Prepare a workspace's data: fetch the corpus, train the tokenizer, cache the tokens.

Run as ``python -m autoresearch.trainer.prepare`` in a workspace (the daemon
does, in its `preparing` state), or lazily through ``harness.load()``.

Layout under the cache dir (see settings.cache_dir)::

    <profile>-<key>/        key = hash(corpus fingerprint, profile constants, format)
      tokenizer.json        BPE ranks + split pattern (loaded into tiktoken)
      train.bin, val/val.bin  uint16 token ids, each document preceded by BOS (the
                            validation split in its own directory: the training
                            sandbox hides that directory, the evaluator reads it)
      meta.json             fingerprint, counts; written last
    downloads/<corpus>/     downloaded files (+ .sha256 recorded at download)

Each entry is built in a temporary directory and renamed into place in one
step, under a lock, so a killed prepare leaves nothing that looks finished and
the next run starts clean. A finished entry is never rebuilt: re-running is a
no-op.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from autoresearch.errors import UserError
from autoresearch.trainer import tokenizer
from autoresearch.trainer.settings import Settings, cache_dir, read_settings
from autoresearch.trainer.sources import open_corpus

from autoresearch.trainer import VAL_DIR  # noqa: E402

FORMAT = 1  # bump when the on-disk layout or the split/tokenization rules change
# Profile constants that shape the prepared data (the budget does not).
DATA_CONSTANTS = ("vocab_size", "val_percent", "tokenizer_chars", "max_train_chars", "eval_tokens",
                  "climbmix_train_shards")
ENCODE_BATCH = 256


class Progress:
    """A self-overwriting status line on a terminal; silent when stderr is a log."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        of = f"/{total:,}" if total else ""
        sys.stderr.write(f"\r\x1b[K{stage}: {done:,}{of}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # flock is released by the kernel when a holder dies, so a killed prepare never wedges the next.
    try:
        f = open(path, "a")
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield  # a read-only cache (a sandboxed run's view): nobody can write it, nothing to lock
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def entry_key(settings: Settings, fingerprint: str) -> str:
    constants = {k: settings.constants[k] for k in DATA_CONSTANTS}
    blob = json.dumps([FORMAT, fingerprint, constants], sort_keys=True)
    return f"{settings.profile}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def ensure(settings: Settings | None = None, progress: Progress | None = None) -> Path:
    """Return the prepared entry for `settings` (default: ./autoresearch.toml), building it if needed."""
    settings = settings or read_settings()
    progress = progress or Progress()
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache directory {root}: {exc.strerror}") from None
    corpus = open_corpus(settings.data, settings.constants, root, settings.data_url)
    if not os.access(root, os.W_OK):
        # A run's sandbox sees the cache read-only: the daemon's prepare step built the entry.
        final = root / entry_key(settings, corpus.fingerprint())
        if (final / "meta.json").is_file():
            return final
        raise UserError(f"the data cache {root} is read-only here and holds no prepared data for this "
                        "workload: run `python -m autoresearch.trainer.prepare` (the daemon's prepare step)")
    with _locked(root / ".prepare.lock"):
        corpus.fetch(progress)
        fingerprint = corpus.fingerprint()
        final = root / entry_key(settings, fingerprint)
        if (final / "meta.json").is_file():
            move_val(final)
            return final
        for stale in root.glob(".tmp-*"):  # we hold the lock: any temp dir is from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            _build(tmp, corpus, settings, fingerprint, progress)
            shutil.rmtree(final, ignore_errors=True)  # an entry without meta.json is incomplete
            os.replace(tmp, final)
        finally:
            progress.done()
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def move_val(entry: Path) -> None:
    """An entry prepared before the split had its own directory: move val.bin into it (once)."""
    old = entry / "val.bin"
    if old.is_file():
        (entry / VAL_DIR).mkdir(exist_ok=True)
        os.replace(old, entry / VAL_DIR / "val.bin")


def _build(out: Path, corpus, settings: Settings, fingerprint: str, progress: Progress) -> None:
    c = settings.constants
    t0 = time.monotonic()
    progress("training tokenizer", 0)
    enc = tokenizer.train(corpus.documents("train"), c["vocab_size"], c["tokenizer_chars"])
    tokenizer.save(enc, out / "tokenizer.json")
    bos = enc.encode_single_token(tokenizer.BOS)
    train = _write_tokens(out / "train.bin", enc, bos, corpus.documents("train"),
                          max_chars=c["max_train_chars"], max_tokens=None, stage="tokenizing train", progress=progress)
    # The metric reads the first eval_tokens of val: tokenizing more would be wasted time.
    (out / VAL_DIR).mkdir()
    val = _write_tokens(out / VAL_DIR / "val.bin", enc, bos, corpus.documents("val"),
                        max_chars=None, max_tokens=c["eval_tokens"] + 1, stage="tokenizing val", progress=progress)
    meta = {
        "format": FORMAT, "fingerprint": fingerprint, "corpus": corpus.name, "data": settings.data,
        "profile": settings.profile, "vocab_size": enc.n_vocab, "bos_id": bos,
        "train": train, "val": val, "seconds": round(time.monotonic() - t0, 2),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _write_tokens(path: Path, enc, bos: int, docs: Iterable[str], *, max_chars, max_tokens, stage, progress) -> dict:
    n_docs = n_tokens = n_chars = 0
    with open(path, "wb") as f:
        batch: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
                arr = np.asarray([bos, *ids], dtype=np.uint16)
                f.write(arr.tobytes())
                n_tokens += arr.size
            batch.clear()
            progress(stage, n_tokens)

        for doc in docs:
            batch.append(doc)
            n_docs += 1
            n_chars += len(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
            if (max_chars and n_chars >= max_chars) or (max_tokens and n_tokens >= max_tokens):
                break
        if batch:
            flush()
    if n_tokens < 2:
        raise UserError(f"prepare: the {path.stem} split is empty")
    return {"documents": n_docs, "tokens": n_tokens, "chars": n_chars}


def main() -> int:
    t0 = time.monotonic()
    try:
        entry = ensure()
    except UserError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions: the daemon blocks on it, no traceback
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    meta = json.loads((entry / "meta.json").read_text())
    print(f"prepared {meta['corpus']} ({meta['profile']} profile): {meta['train']['tokens']:,} train tokens, "
          f"{meta['val']['tokens']:,} val tokens, vocab {meta['vocab_size']} in {entry} "
          f"({time.monotonic() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
