"""The built-in workload: data, tokenizer, harness and the train.py template.

The agent edits only the workspace's ``train.py``; everything in this package
is the fixed harness (read-only to the agent, see :func:`harness_dir`).

Workspace configuration, table ``[workload]`` of ``autoresearch.toml``
(read from the current directory by the harness; every key optional)::

    [workload]
    profile = "cpu"        # "cpu" | "gpu": fixes sequence length, vocab, eval tokens and
                           # the time budget (PROFILES below). Never change it mid-run:
                           # results of different profiles are not comparable.
    data = "stdlib"        # "stdlib"       the running Python's standard library .py sources
                           #                (offline, no download; the default)
                           # "dir:/abs/path" a directory of .txt / .jsonl / .parquet files
                           #                (jsonl and parquet: a "text" field/column)
                           # "climbmix"     autoresearch's ClimbMix shards (downloaded)
                           # "tinystories"  TinyStories V2 (downloaded)
    data_url = ""          # optional base URL replacing the public host of the
                           # downloaded corpora (a mirror, or a test server)

Without ``autoresearch.toml`` the profile comes from :func:`detect_profile` and
the data is "stdlib".

Environment:

* ``AUTORESEARCH_CACHE_DIR``: where prepared data lives (default
  ``$XDG_CACHE_HOME/autoresearch``, else ``~/.cache/autoresearch``). Each
  prepared corpus is keyed by its content fingerprint and the profile, so
  different corpora never mix.
* ``AUTORESEARCH_TIME_BUDGET``: TEST ONLY. Overrides the profile's training
  budget in seconds (e.g. 3) so test suites can run train.py end to end.
  Never set it for real runs: results with different budgets are not comparable.

MPS (Apple silicon) machines get the "cpu" profile: the "gpu" profile's sizes
assume a CUDA data-centre card; train.py still runs on MPS when it is present.
"""

from __future__ import annotations

import string
from pathlib import Path

# Fixed constants per profile. budget_seconds is the training time budget;
# seq_len and eval_tokens define the metric (changing them breaks comparisons);
# vocab_size includes the one special token (BOS); val_percent is the share of
# documents (by stable hash) pinned to the validation split; the *_chars caps
# bound preparation time on large corpora.
PROFILES: dict[str, dict] = {
    "cpu": {
        "budget_seconds": 60,
        "seq_len": 256,
        "vocab_size": 2048,
        "eval_tokens": 32768,
        "eval_batch_size": 32,
        "val_percent": 5,
        "tokenizer_chars": 20_000_000,
        "max_train_chars": 100_000_000,
        "climbmix_train_shards": 1,
    },
    "gpu": {
        "budget_seconds": 300,
        "seq_len": 2048,
        "vocab_size": 8192,
        "eval_tokens": 40 * 524288,
        "eval_batch_size": 32,
        "val_percent": 5,
        "tokenizer_chars": 1_000_000_000,
        "max_train_chars": 4_000_000_000,
        "climbmix_train_shards": 10,
    },
}

# The hyperparameters written into each profile's train.py (the agent and the
# offline proposer change them there; these are only the starting point).
TEMPLATE_DEFAULTS: dict[str, dict] = {
    "cpu": {
        "DEPTH": 4,
        "MODEL_DIM": 128,
        "HEAD_DIM": 64,
        "MLP_RATIO": 4,
        "TOTAL_BATCH_TOKENS": 4096,
        "DEVICE_BATCH_SIZE": 16,
        "MATRIX_LR": 0.02,
        "EMBED_LR": 0.3,
        "UNEMBED_LR": 0.006,
        "WEIGHT_DECAY": 0.0,
        "ADAM_BETA1": 0.8,
        "ADAM_BETA2": 0.95,
        "MUON_MOMENTUM": 0.95,
        "WARMUP_RATIO": 0.0,
        "WARMDOWN_RATIO": 0.4,
        "FINAL_LR_FRAC": 0.0,
        "SOFTCAP": 15.0,
        "SEED": 42,
    },
    "gpu": {
        "DEPTH": 8,
        "MODEL_DIM": 512,
        "HEAD_DIM": 128,
        "MLP_RATIO": 4,
        "TOTAL_BATCH_TOKENS": 524288,
        "DEVICE_BATCH_SIZE": 32,
        "MATRIX_LR": 0.04,
        "EMBED_LR": 0.6,
        "UNEMBED_LR": 0.004,
        "WEIGHT_DECAY": 0.0,
        "ADAM_BETA1": 0.8,
        "ADAM_BETA2": 0.95,
        "MUON_MOMENTUM": 0.95,
        "WARMUP_RATIO": 0.0,
        "WARMDOWN_RATIO": 0.5,
        "FINAL_LR_FRAC": 0.0,
        "SOFTCAP": 15.0,
        "SEED": 42,
    },
}

_HERE = Path(__file__).resolve().parent
EXPORT_NAME = "model.pt2"  # where train.py's W.submit() writes the exported model (its working dir)
VAL_DIR = "val"  # a prepared entry's validation split: hidden from training runs, read by the evaluator


def detect_profile() -> str:
    """'gpu' when CUDA is available, else 'cpu' (MPS gets 'cpu', see module doc)."""
    import torch  # imported here: `autoresearch init` should not pay for torch unless asked

    return "gpu" if torch.cuda.is_available() else "cpu"


def _check_profile(profile: str) -> None:
    from autoresearch.errors import ConfigError

    if profile not in PROFILES:
        raise ConfigError(f"unknown workload profile {profile!r} (expected one of: {', '.join(PROFILES)})")


def workload_files(profile: str) -> dict[str, str]:
    """The files laid into a new workspace: train.py (for `profile`) and program.md."""
    _check_profile(profile)
    template = string.Template((_HERE / "train.py.template").read_text(encoding="utf-8"))
    values = {k: repr(v) for k, v in TEMPLATE_DEFAULTS[profile].items()}
    values["PROFILE"] = profile
    return {
        "train.py": template.substitute(values),
        "program.md": (_HERE / "program.md").read_text(encoding="utf-8"),
    }


def harness_dir() -> Path:
    """The directory of the harness source (this package) that the agent may read."""
    return _HERE
