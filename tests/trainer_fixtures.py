"""Shared fixtures for the trainer tests: a session cache dir, small corpora, a workspace."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("def class return import self value data model train token loss batch "
         "über naïve café 東京 данные λ → ≤ 🙂 🚀 ñandú").split()


def mixed_text(rng: random.Random, n_lines: int) -> str:
    """Code-like lines mixed with Unicode and emoji."""
    lines = []
    for _ in range(n_lines):
        words = rng.choices(WORDS, k=rng.randint(2, 9))
        indent = "    " * rng.randint(0, 2)
        lines.append(f"{indent}{words[0]}_{rng.randint(0, 99)} = {' '.join(words[1:])}  # {rng.random():.3f}")
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n_docs: int, lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:04d}.txt").write_text(mixed_text(rng, lines), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer-cache")


@pytest.fixture
def cache(session_cache, monkeypatch) -> Path:
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(session_cache))
    return session_cache


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=60, lines=40)


def workspace(path: Path, profile: str = "cpu", data: str = "stdlib", extra: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "autoresearch.toml").write_text(
        f'[workload]\nprofile = "{profile}"\ndata = {json.dumps(data)}\n{extra}', encoding="utf-8")
    return path


def subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["AUTORESEARCH_CACHE_DIR"] = str(cache_dir)
    env.pop("AUTORESEARCH_TIME_BUDGET", None)
    env.update(extra)
    return env


PYTHON = sys.executable
