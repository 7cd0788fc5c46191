"""What a run's own output says, for display only: its progress and its last lines.

A run's output is written by code the agent controls, so nothing here is
trusted beyond being shown: it passes sanitize.clean (terminal escapes,
control characters, secrets) and lengths are capped before anything reaches a
terminal or a status line. The metric that decides keep or discard is read elsewhere
(runner.py), never from here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import sanitize

READ_BYTES = 16 * 1024  # progress lines are near the end of the log
# "step 125", "step: 125", "iter 125" (nanoGPT), "step 125/1000"
_STEP = re.compile(r"\b(?:step|iter)\b[\s:=#]*(\d{1,12})", re.IGNORECASE)
# "loss 3.2100", "loss: 3.21", "train_loss=3.21", "loss 1.2e-3"
_LOSS = re.compile(r"\b(?:train_)?loss\b[\s:=]*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", re.IGNORECASE)


def clean(text: str, width: int = 200) -> str:
    """One displayable line: escapes, control characters and secrets removed, whitespace squeezed, capped."""
    text = " ".join(sanitize.clean(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def last_lines(text: str, count: int = 3, width: int = 160) -> str:
    """The last `count` non-empty lines of `text`, cleaned, joined with ' | '."""
    lines = [clean(line, width) for line in sanitize.strip_controls(text).splitlines()]
    return " | ".join([line for line in lines if line][-count:])


@dataclass(frozen=True)
class Progress:
    step: int | None = None
    loss: float | None = None

    def __str__(self) -> str:
        parts = []
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}" if abs(self.loss) < 1e6 else f"loss {self.loss:.3g}")
        return " · ".join(parts)


def parse(text: str) -> Progress:
    """The latest step and loss that `text` mentions (each from the last line that has one)."""
    step = loss = None
    for line in reversed(sanitize.strip_controls(text).splitlines()):
        if step is None and (m := _STEP.search(line)):
            step = int(m.group(1))
        if loss is None and (m := _LOSS.search(line)):
            try:
                loss = float(m.group(1))
            except ValueError:
                pass
        if step is not None and loss is not None:
            break
    return Progress(step, loss)


def tail(log_path: Path | str, size: int = READ_BYTES) -> str:
    """The last `size` bytes of a log file as text, from its first whole line; '' when it cannot be read."""
    try:
        with open(log_path, "rb") as f:
            length = f.seek(0, os.SEEK_END)
            f.seek(max(0, length - size))
            text = f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return ""
    if length > size and "\n" in text:
        text = text.split("\n", 1)[1]  # the cut first line would parse as a wrong figure
    return text


def read(log_path: Path | str) -> Progress:
    """The progress in the tail of a run's log file; an empty Progress when it cannot be read."""
    return parse(tail(log_path))
