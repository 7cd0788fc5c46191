"""The contract between the daemon and every proposer (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol


@dataclass(frozen=True)
class HistoryRow:
    n: int  # experiment number (0 = baseline)
    status: str  # kept | discarded | crashed | rejected | baseline
    metric: float | None
    description: str
    commit: str | None = None
    files: Mapping[str, str] | None = None  # editable files of that experiment, if recorded
    change: str = ""  # what it changed against its parent (prompt.change_summary); '' = unknown


@dataclass(frozen=True)
class InFlight:
    """An experiment running or queued while another proposal is asked for: the agent is told
    about it so that it does not propose the same change twice (text untrusted, like history)."""

    n: int
    state: str  # its state now (proposing, training, evaluating, queued, ...)
    description: str
    files: Mapping[str, str] | None = None  # the editable files it runs; None = not known yet
    change: str = ""  # what it changes against its parent (prompt.change_summary); '' = unknown


@dataclass(frozen=True)
class ProposalContext:
    workspace: Path
    n: int
    program: str
    editable: tuple[str, ...]
    files: Mapping[str, str]  # current (= best) content of each editable file
    history: tuple[HistoryRow, ...]
    best_metric: float | None
    direction: str  # minimize | maximize
    last_failure: str | None  # log tail of the last crashed run (untrusted text)
    harness_dir: Path | None
    deadline: float  # time.monotonic() by which propose must return
    cancel: threading.Event = field(default_factory=threading.Event)
    in_flight: tuple[InFlight, ...] = ()  # experiments running or queued now (never this one)


ZERO_USAGE = {
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
}


@dataclass
class Proposal:
    description: str  # one line
    files: dict[str, str] | None  # new content of changed editable files; None = worktree edited
    proposer: str
    usage: dict[str, int] = field(default_factory=lambda: dict(ZERO_USAGE))
    cost_usd: float | None = 0.0  # None: the model's price is unknown (recorded as such, never $0)
    meta: dict = field(default_factory=dict)


class Proposer(Protocol):
    name: str
    # True for one that edits the human's worktree itself (an agent CLI: Proposal.files None): the
    # daemon runs one such proposal at a time. In-memory proposers may leave it out (False).
    edits_worktree: bool

    def propose(self, ctx: ProposalContext) -> Proposal: ...


class ProposerError(Exception):
    def __init__(self, reason: str, *, usage: dict | None = None, cost_usd: float | None = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.usage = dict(usage or ZERO_USAGE)
        self.cost_usd = cost_usd


class NoEdit(ProposerError):
    """The agent produced no usable edit: the daemon falls back or rejects."""


class ProposerUnavailable(ProposerError):
    """Outage, rate limit, timeout: the daemon enters `blocked` and retries later."""

    def __init__(self, reason: str, *, retry_after: float | None = None, **kw):
        super().__init__(reason, **kw)
        self.retry_after = retry_after


class ProposerAuthError(ProposerUnavailable):
    """401/403: blocked with a long backoff; no retry storm."""
