"""Corpora behind one interface: a fingerprint and the documents of each split.

* stdlib: the running Python's standard library ``.py`` files (no tests, no
  site-packages), one document per file;
* dir: a directory of ``.txt`` (one document per file), ``.jsonl`` and
  ``.parquet`` (one document per row, field/column ``text``);
* climbmix, tinystories: public corpora, downloaded once into the cache.

Local corpora pin their validation split by a stable hash of each unit's
relative path (a row of a jsonl/parquet file is ``path#row``), so the split
never depends on the machine, the order of the walk or the corpus size. The
fingerprint hashes every unit's path, split and content.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from autoresearch.errors import UserError
from autoresearch.trainer.download import download, sha256_file

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # autoresearch's pinned validation shard (the last one)
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
STORY_SEPARATOR = "<|endoftext|>"

Progress = Callable[[str, int, int | None], None]


class DataError(UserError):
    """The corpus cannot be read or fetched (missing directory, download failed...)."""


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000


class LocalCorpus:
    """Units (key, text) from files; the split of each unit is pinned by hashing its key."""

    def __init__(self, name: str, val_percent: int):
        self.name = name
        self.val_percent = val_percent
        self._forced_val: str | None = None
        self._fingerprint: str | None = None

    def units(self) -> Iterator[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fetch(self, progress: Progress | None = None) -> None:
        """Local corpora need no download."""

    def _in_val(self, key: str) -> bool:
        return _bucket(key) < self.val_percent * 100 or key == self._forced_val

    def fingerprint(self) -> str:
        """Hash of every unit's key, split and content; also pins a non-empty val split."""
        if self._fingerprint is None:
            keys, n_val, h = [], 0, hashlib.sha256(f"{self.name}\0{self.val_percent}\0".encode())
            for key, text in self.units():
                keys.append(key)
                n_val += self._in_val(key)
                h.update(key.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
            if len(keys) < 2:
                raise DataError(f"corpus {self.name}: need at least 2 documents, found {len(keys)}")
            if n_val == 0:  # tiny corpus: pin the unit with the lowest hash so val is never empty
                self._forced_val = min(keys, key=_bucket)
            elif n_val == len(keys):
                raise DataError(f"corpus {self.name}: every document hashed into the validation split")
            h.update(f"\0forced={self._forced_val}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def documents(self, split: str) -> Iterator[str]:
        self.fingerprint()  # settles the forced val unit, if any
        want_val = split == "val"
        for key, text in self.units():
            if self._in_val(key) == want_val:
                yield text


class StdlibCorpus(LocalCorpus):
    def __init__(self, val_percent: int, root: Path | None = None):
        super().__init__("stdlib", val_percent)
        self.root = Path(root or sysconfig.get_paths()["stdlib"])

    def _paths(self) -> list[Path]:
        paths = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("lib-dynload"))
            paths += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_")]
        return paths

    def units(self) -> Iterator[tuple[str, str]]:
        for path in self._paths():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few legacy files are not UTF-8; skipping them is stable per machine
            if text.strip():
                yield path.relative_to(self.root).as_posix(), text


class DirCorpus(LocalCorpus):
    SUFFIXES = (".txt", ".jsonl", ".parquet")

    def __init__(self, root: Path, val_percent: int):
        super().__init__(f"dir:{root}", val_percent)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data directory {self.root} does not exist")

    def _paths(self) -> list[Path]:
        paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix in self.SUFFIXES)
        if not paths:
            raise DataError(f"data directory {self.root} has no .txt, .jsonl or .parquet files")
        return paths

    def units(self) -> Iterator[tuple[str, str]]:
        for path in self._paths():
            rel = path.relative_to(self.root).as_posix()
            if path.suffix == ".txt":
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield rel, text
            elif path.suffix == ".jsonl":
                yield from _jsonl_rows(path, rel)
            else:
                for i, text in enumerate(_parquet_texts(path)):
                    if text and text.strip():
                        yield f"{rel}#{i}", text


def _jsonl_rows(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{i + 1}: not valid JSON") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{i + 1}: no string "text" field')
            if text.strip():
                yield f"{rel}#{i}", text


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f'{path}: no "text" column')
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def _check_parquet(path: Path) -> None:
    """A downloaded shard must open and have a text column; else drop it so a re-run fetches it again."""
    try:
        next(iter(_parquet_texts(path)), None)
    except DataError:
        path.unlink(missing_ok=True)
        raise


class DownloadedCorpus:
    """Files fetched into the cache; the split is pinned by file (as upstream does)."""

    def __init__(self, name: str, base_url: str, files: dict[str, list[str]], store: Path):
        self.name, self.base_url, self.files, self.store = name, base_url, files, store

    def fetch(self, progress: Progress | None = None) -> None:
        for split in ("train", "val"):
            for fname in self.files[split]:
                dest = self.store / fname
                if dest.exists():
                    continue
                cb = (lambda got, total, f=fname: progress(f"download {f}", got, total)) if progress else None
                try:
                    download(f"{self.base_url}/{fname}", dest, progress=cb)
                except Exception as exc:
                    raise DataError(f"corpus {self.name}: {exc}") from None
                if fname.endswith(".parquet"):
                    _check_parquet(dest)
                self._record_hash(dest)

    def _record_hash(self, path: Path) -> str:
        # Hash once at download time: re-hashing gigabytes on every warm start would be slow.
        marker = path.with_name(path.name + ".sha256")
        if not marker.exists():
            tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
            tmp.write_text(sha256_file(path))
            os.replace(tmp, marker)
        return marker.read_text().strip()

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for split in ("train", "val"):
            for fname in self.files[split]:
                h.update(f"\0{split}\0{fname}\0{self._record_hash(self.store / fname)}".encode())
        return h.hexdigest()

    def documents(self, split: str) -> Iterator[str]:
        for fname in self.files[split]:
            path = self.store / fname
            if fname.endswith(".parquet"):
                yield from (t for t in _parquet_texts(path) if t)
            else:
                yield from _split_stories(path)


def _split_stories(path: Path) -> Iterator[str]:
    """TinyStories: stories separated by <|endoftext|> lines, streamed."""
    buf: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip() == STORY_SEPARATOR:
                if (story := "".join(buf).strip()):
                    yield story
                buf = []
            else:
                buf.append(line)
    if (story := "".join(buf).strip()):
        yield story


def open_corpus(data: str, constants: dict, cache: Path, data_url: str = ""):
    """The corpus named by workload.data, for a profile's constants."""
    val_percent = constants["val_percent"]
    if data == "stdlib":
        return StdlibCorpus(val_percent)
    if data.startswith("dir:"):
        return DirCorpus(Path(data[4:]), val_percent)
    if data == "climbmix":
        n = constants["climbmix_train_shards"]
        files = {"train": [f"shard_{i:05d}.parquet" for i in range(n)],
                 "val": [f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"]}
        return DownloadedCorpus("climbmix", data_url or CLIMBMIX_URL, files, cache / "downloads" / "climbmix")
    if data == "tinystories":
        files = {k: [v] for k, v in TINYSTORIES_FILES.items()}
        return DownloadedCorpus("tinystories", data_url or TINYSTORIES_URL, files, cache / "downloads" / "tinystories")
    raise DataError(f"unknown data source {data!r}")
