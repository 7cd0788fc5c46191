"""Text that came from a run or an agent, made safe to store and to print.

Two steps, always together for anything a run produced (its log file, the
events' log_tail, `show` and `tail` output): terminal control sequences are
stripped (a run must not retitle, recolour, rewrite or hide lines of the
human's terminal), then secrets are redacted (secrets.redact).
"""

from __future__ import annotations

import re

from .secrets import redact

# CSI (colours, cursor moves), OSC (titles, hyperlinks), DCS/SOS/PM/APC strings and lone
# escapes; then any other C0/C1 control except tab and newline, and the Unicode bidi
# overrides that make displayed text differ from what is stored.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def strip_controls(text: str) -> str:
    """Remove terminal escapes and control characters; \\r-overwritten progress lines keep their last state."""
    text = _ESCAPES.sub("", text)
    # A progress bar rewrites its line with \r: keep what was finally shown.
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return _CONTROL.sub("", "\n".join(lines))


def clean(text: str) -> str:
    """strip_controls, then redact: what may be stored or printed of a run's output."""
    return redact(strip_controls(text))
