"""The random-kill soak, CI size: the daemon SIGKILLed at random instants, then run to quiescence.

bench/chaos.py --kills 200 is the full one (figures in docs/RELIABILITY.md); this runs the same
code with fewer kills so that CI stays within its time.
"""

from __future__ import annotations

import sys

import pytest

from daemon_fixtures import REPO

sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402

KILLS = 100


@pytest.mark.slow
def test_random_kills_lose_nothing(tmp_path):
    r = chaos.soak(tmp_path, KILLS, seed=7)
    print({k: v for k, v in r.items() if k != "problems"})
    assert r["problems"] == []
    assert (r["tried"], r["survived"], r["lost"]) == (KILLS, KILLS, 0)
    assert r["boots"] >= KILLS * 0.8  # most kills landed in a running daemon, not before it booted
