"""Fault injection for the crash tests: inert unless AUTORESEARCH_CRASH_AT is set.

AUTORESEARCH_CRASH_AT names points where the daemon SIGKILLs itself, so the
tests can prove that a kill at any instant loses nothing:

  post:<trigger>      after that trigger's event is durable, before its side effect
  pre:<trigger>       after the previous side effect, just before that trigger's event
  <point>@<k>         only the k-th time the point is reached in this process (default 1)

Several points may be given, separated by commas. Examples:
  AUTORESEARCH_CRASH_AT=post:commit        kill right after the commit event is written
  AUTORESEARCH_CRASH_AT=pre:launch@2       kill just before the 2nd launch event
Never set it outside tests.
"""

from __future__ import annotations

import os
import signal

_points: dict[str, int] = {}
for _item in filter(None, (s.strip() for s in os.environ.get("AUTORESEARCH_CRASH_AT", "").split(","))):
    _name, _, _k = _item.partition("@")
    _points[_name] = int(_k or 1)
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if `name` is an armed crash point (no-op otherwise)."""
    if not _points or name not in _points:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _points[name]:
        os.kill(os.getpid(), signal.SIGKILL)
