"""Fault injection for the crash tests: inert unless AUTORESEARCH_CRASH_AT or _FAIL_AT is set.

AUTORESEARCH_CRASH_AT names points where the daemon SIGKILLs itself, so the
tests can prove that a kill at any instant loses nothing:

  post:<trigger>      after that trigger's event is durable, before its side effect
  pre:<trigger>       after the previous side effect, just before that trigger's event
  <point>@<k>         only the k-th time the point is reached in this process (default 1)

Several points may be given, separated by commas. Examples:
  AUTORESEARCH_CRASH_AT=post:commit        kill right after the commit event is written
  AUTORESEARCH_CRASH_AT=pre:launch@2       kill just before the 2nd launch event

AUTORESEARCH_FAIL_AT takes the same points but raises InjectedFailure there instead: an
unexpected exception (a bug), to test that the daemon logs it and exits non-zero.
Never set either outside tests.
"""

from __future__ import annotations

import os
import signal


class InjectedFailure(RuntimeError):
    """The exception raised at an AUTORESEARCH_FAIL_AT point."""


def _parse(variable: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (s.strip() for s in os.environ.get(variable, "").split(","))):
        name, _, k = item.partition("@")
        points[name] = int(k or 1)
    return points


_points = _parse("AUTORESEARCH_CRASH_AT")
_failures = _parse("AUTORESEARCH_FAIL_AT")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process (or raise) if `name` is an armed point (no-op otherwise)."""
    if name not in _points and name not in _failures:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _points.get(name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _seen[name] == _failures.get(name):
        raise InjectedFailure(f"injected failure at {name}")
