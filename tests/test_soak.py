"""The random-kill soak, CI size: the daemon SIGKILLed at random instants, then run to quiescence,
with 1, 2 and 3 slots.

bench/chaos.py --kills 200 [--slots K] is the full one (figures in docs/RELIABILITY.md); this runs
the same code with fewer kills so that CI stays within its time.
"""

from __future__ import annotations

import sys

import pytest

from daemon_fixtures import REPO

sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402

# slots -> kills: one slot as before; 2 and 3 slots (runs of 0.5 s, so that kills land with
# several training) with fewer kills each, so that the three stay within CI's time.
KILLS = {1: 40, 2: 20, 3: 20}


@pytest.mark.slow
@pytest.mark.parametrize("slots", sorted(KILLS))
def test_random_kills_lose_nothing(tmp_path, slots):
    kills = KILLS[slots]
    r = chaos.soak(tmp_path, kills, seed=7, slots=slots)
    print({k: v for k, v in r.items() if k != "problems"})
    assert r["problems"] == []
    assert (r["tried"], r["survived"], r["lost"]) == (kills, kills, 0)
    assert r["boots"] >= kills * 0.8  # most kills landed in a running daemon, not before it booted
    if slots > 1:  # several runs training at once when some kills landed: what this soak is for
        assert sum(v for k, v in r["training_at_kill"].items() if k >= 2) >= kills * 0.2, r["training_at_kill"]
