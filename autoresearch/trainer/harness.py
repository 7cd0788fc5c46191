"""The fixed harness train.py imports: constants, the dataloader and evaluate_bpb.

The agent edits train.py, never this file: the metric is computed here, from
the model's logits, on a pinned validation split.

    from autoresearch.trainer import harness
    W = harness.load()                 # reads ./autoresearch.toml, prepares data if needed
    W.seq_len, W.vocab_size, W.budget_seconds, W.profile
    batches = W.train_batches(batch_size, device, seed)   # iterator of (x, y) int64 (B, T)
    val_bpb = W.submit(model, device)     # hands the model over (model(x) -> logits (B, T, vocab_size))

submit() exports the model as a graph (torch.export, static shapes: the evaluation
batch and context) to ./model.pt2; the daemon's evaluator (evaluate.py, a separate
process in its own sandbox) computes the trusted val_bpb from that graph. Under
bubblewrap the training run cannot see the validation split at all, so submit()
returns None there; where it can (no sandbox) it returns evaluate_bpb's figure.

val_bpb is the summed cross-entropy (nats) over the first `eval_tokens`
target tokens of the validation split, divided by ln 2 and by the summed raw
UTF-8 byte length of those targets; targets that are special tokens (BOS) are
excluded from both sums. It is deterministic for a given model and data.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from autoresearch.errors import UserError
from autoresearch.trainer import prepare as _prepare
from autoresearch.trainer import tokenizer as _tokenizer
from autoresearch.trainer.settings import Settings, budget_seconds, read_settings

from autoresearch.trainer import EXPORT_NAME, VAL_DIR  # noqa: E402

# Peak dense bf16 tensor throughput (FLOP/s) by CUDA device name, for MFU.
CUDA_PEAK_FLOPS = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.5e12, "H200": 989.5e12, "GH200": 989.5e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@dataclass
class Workload:
    settings: Settings
    entry: Path
    meta: dict
    encoding: object  # tiktoken.Encoding
    train_tokens: np.ndarray
    budget_seconds: float

    @property
    def profile(self) -> str:
        return self.settings.profile

    @property
    def seq_len(self) -> int:
        return self.settings.constants["seq_len"]

    @property
    def eval_tokens(self) -> int:
        return self.settings.constants["eval_tokens"]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self.meta["bos_id"]

    def train_batches(self, batch_size: int, device="cpu", seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return train_batches(self.train_tokens, self.seq_len, batch_size, device, seed)

    @property
    def eval_batch_size(self) -> int:
        return self.settings.constants["eval_batch_size"]

    @property
    def val_path(self) -> Path:
        return self.entry / VAL_DIR / "val.bin"

    @property
    def val_tokens(self) -> np.ndarray:
        """The validation split; hidden from the training sandbox (FileNotFoundError there)."""
        return np.memmap(self.val_path, dtype=np.uint16, mode="r")

    def evaluate_bpb(self, model, device="cpu", batch_size: int | None = None) -> float:
        return evaluate_bpb(model, self.val_tokens, token_bytes(self.encoding), self.seq_len, self.eval_tokens,
                            batch_size or self.eval_batch_size, device)

    def submit(self, model, device="cpu") -> float | None:
        """Hand the trained model to the harness: export it to ./model.pt2 for the trusted
        evaluation, and return evaluate_bpb's figure where this process can read the
        validation split (None where the sandbox hides it, as it does under bubblewrap)."""
        t0 = time.perf_counter()
        path = export_model(model, self.eval_batch_size, self.seq_len, device)
        print(f"export: {path} {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s",
              flush=True)
        if not self.val_path.is_file():
            print("submit: the validation split is hidden here; the daemon's evaluator measures val_bpb",
                  flush=True)
            return None
        return self.evaluate_bpb(model, device)


def load(workspace: Path | None = None) -> Workload:
    """Settings from `workspace` (default cwd), data prepared on first use."""
    _keep_freed_memory()
    try:
        settings = read_settings(workspace)
        entry = _prepare.ensure(settings)
    except UserError as exc:  # bad config, missing data: one line, not a traceback
        raise SystemExit(f"autoresearch: {exc}") from None
    meta = json.loads((entry / "meta.json").read_text())
    return Workload(
        settings=settings, entry=entry, meta=meta,
        encoding=_tokenizer.load(entry / "tokenizer.json"),
        train_tokens=np.memmap(entry / "train.bin", dtype=np.uint16, mode="r"),
        budget_seconds=budget_seconds(settings.profile),
    )


def _keep_freed_memory() -> None:
    """Stop glibc from returning big freed blocks to the kernel after every step.

    Training frees and reallocates the same large activations each step; by
    default glibc serves them with mmap/munmap, and the page faults on every
    fresh mapping cost more CPU time than the matmuls on a small machine
    (measured: MFU 29% -> 45% on 2 cores).
    """
    if os.environ.get("AUTORESEARCH_NO_MALLOPT"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # C int: stay below 2**31
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def token_bytes(encoding) -> torch.Tensor:
    return torch.tensor(_tokenizer.token_byte_lengths(encoding), dtype=torch.int64)


def train_batches(tokens: np.ndarray, seq_len: int, batch_size: int, device="cpu", seed: int = 0):
    """Endless batches of random windows of the training tokens (seeded: reproducible)."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    high = len(tokens) - seq_len - 1
    if high <= 0:
        raise ValueError(f"training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    device = torch.device(device)
    pin = device.type == "cuda"
    while True:
        starts = rng.integers(0, high, size=batch_size)
        rows = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
        if pin:
            rows = rows.pin_memory()
        rows = rows.to(device, non_blocking=True)
        yield rows[:, :-1], rows[:, 1:]


def _autocast(device: torch.device):
    """The precision the metric is computed in: bf16 autocast on CUDA, full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def export_model(model, batch_size: int, seq_len: int, device="cpu", out: Path | None = None) -> Path:
    """Export `model` (tokens (B, T) int64 -> logits) with torch.export at the evaluation's
    static shapes, in eval mode and the metric's precision, to `out` (default ./model.pt2).
    Written to a temporary name and renamed: a killed export leaves no file that looks whole."""
    device = torch.device(device)
    out = Path(out or EXPORT_NAME).absolute()
    example = (torch.zeros(batch_size, seq_len, dtype=torch.int64, device=device),)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device):
            program = torch.export.export(model, example, strict=False)
    finally:
        model.train(was_training)
    tmp = out.with_name(f".tmp-{out.name}")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, tmp)
    os.replace(tmp, out)
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def evaluate_bpb(model, tokens: np.ndarray, token_bytes: torch.Tensor, seq_len: int, eval_tokens: int,
                 batch_size: int, device="cpu") -> float:
    """Bits per byte of `model` on the first `eval_tokens` targets of `tokens`.

    On out-of-memory it retries from scratch with half the batch: the result
    does not depend on the batch size, and the training run is not lost.
    """
    while True:
        try:
            return _evaluate(model, tokens, token_bytes, seq_len, eval_tokens, batch_size, device)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or batch_size == 1:
                raise
            batch_size //= 2
            print(f"evaluate_bpb: out of memory, retrying with batch size {batch_size}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@torch.no_grad()
def _evaluate(model, tokens, token_bytes, seq_len, eval_tokens, batch_size, device) -> float:
    device = torch.device(device)
    n_windows = min(eval_tokens, len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    table = token_bytes.to(device)
    autocast = _autocast(device)
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for first in range(0, n_windows, batch_size):
            idx = np.arange(first, min(first + batch_size, n_windows))[:, None] * seq_len + np.arange(seq_len + 1)
            rows = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with autocast:
                logits = model(x)
            nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            nbytes = table[y.reshape(-1)]
            counted = nbytes > 0  # special tokens: excluded from both sums
            total_nats += nats[counted].double().sum()
            total_bytes += nbytes.sum()
    finally:
        model.train(was_training)
    return total_nats.item() / (math.log(2) * total_bytes.item())


def peak_flops(device) -> tuple[float | None, str]:
    """The device's peak FLOP/s for MFU, and where the figure comes from."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in CUDA_PEAK_FLOPS.items():  # ordered: specific names before their prefixes
            if key in name:
                return flops, f"{name} bf16 spec"
        return None, f"{name}: peak unknown"
    if device.type == "cpu":
        return measure_matmul_flops(), "fp32 matmul measured in this run"
    return None, f"{device.type}: peak unknown"


def measure_matmul_flops(n: int = 512, seconds: float = 0.5) -> float:
    """This machine's fp32 matmul throughput (FLOP/s), best of several timed bursts."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool start, allocation
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_memory_mb(device) -> float:
    """Peak accelerator memory (CUDA), else the process's peak resident memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
