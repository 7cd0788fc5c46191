"""Any external agent CLI as a proposer (Claude Code print mode, Codex exec, a script...).

The agent runs in the workspace with the prompt (prompt.command_prompt) on
its stdin and edits the worktree itself, so the Proposal has ``files=None``:
the daemon then judges the worktree diff exactly like any other proposal,
scope guard included. This module never decides what is in scope.

Process hygiene (procgroup.GroupSupervisor, as for a training run): the agent
gets its own process group (start_new_session); on the deadline or ``ctx.cancel``
the whole group is killed (SIGTERM, then SIGKILL after a grace period), and after
a normal exit any process the agent left behind in its group is killed too, so
nothing outlives the proposal.
A process that leaves the group on purpose (setsid, double fork into a new
session) is beyond reach; run the daemon under systemd (KillMode=control-group)
for that.

Environment: the agent inherits the daemon's environment minus systemd's
notify/watchdog variables (an agent must not ping the daemon's watchdog). It
keeps credentials (ANTHROPIC_API_KEY, OPENAI_API_KEY, ...) because an agent CLI
needs its own key; under systemd the key from the ``anthropic_api_key``
credential is exported as ANTHROPIC_API_KEY. This is the agent, not the
training run: runs get a scrubbed environment (runner.scrubbed_env).

What the agent changed is what differs between a snapshot of the repository
taken before it starts and one taken after it exits (HEAD, the branch, and
the content of every path that differs from HEAD): edits the person left
uncommitted (program.md, the config) are neither the agent's change nor its
absence. An agent that moved HEAD (its own `git commit`, a branch switch) is
returned as a proposal with ``meta["head_moved"]``, for the daemon to reject.

Output (stdout and stderr, line by line, secrets redacted) goes to
``.autoresearch/proposals/<n>.log``, capped in size.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import gitsafe, secrets
from ..procgroup import GroupSupervisor
from .base import NoEdit, Proposal, ProposalContext, ProposerUnavailable
from ..sanitize import strip_controls
from ..workspace import STATUS_FLAGS, parse_status
from .prompt import command_prompt, one_line

DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LOG_MAX_BYTES = 5_000_000
KILL_GRACE_S = 2.0
DESCRIPTION_MAX = 200
_TAIL_BYTES = 16_384
_TRUNCATED = b"\n[... log truncated at the size cap ...]\n"


def agent_env(base) -> dict[str, str]:
    """The agent's environment: the daemon's, minus systemd notify/watchdog, plus the API key
    from the systemd credential when the environment lacks one."""
    env = {k: v for k, v in base.items() if k not in DROP_ENV}
    if not env.get(secrets.ENV_NAME):
        key = secrets.load_api_key(base)
        if key:
            env[secrets.ENV_NAME] = key
    env.setdefault("NO_COLOR", "1")  # fewer escape sequences in the log
    return env


class _CappedLog:
    """Thread-safe append-only log that stops at max_bytes with a marker line."""

    def __init__(self, path: Path, max_bytes: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb")
        self._left = max_bytes
        self._lock = threading.Lock()
        self.truncated = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.truncated:
                return
            chunk = data[: self._left]
            self._f.write(chunk)
            self._left -= len(chunk)
            if len(chunk) < len(data):
                self._f.write(_TRUNCATED)
                self.truncated = True

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _pump(pipe, log: _CappedLog, tail: bytearray) -> None:
    """Copy a pipe to the log line by line (so redaction sees whole lines), keep its tail."""
    try:
        for line in iter(lambda: pipe.readline(65_536), b""):
            clean = secrets.redact(line.decode("utf-8", "replace")).encode()
            log.write(clean)
            tail.extend(clean)
            del tail[:-_TAIL_BYTES]
    except (OSError, ValueError):
        pass
    finally:
        pipe.close()


def _feed(pipe, data: bytes) -> None:
    """Write the prompt; an agent that exits or never reads stdin is fine."""
    try:
        pipe.write(data)
    except (OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _git(workspace: Path, *args: str) -> str | None:
    """A git command's stdout; None when it fails (no such ref, git missing, ...)."""
    try:
        # The agent may have edited .git/config: gitsafe runs none of the programs it names.
        return gitsafe.run(list(args), workspace, capture_output=True, timeout=60,
                           check=True).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None


def _changed_paths(workspace: Path) -> list[str] | None:
    """Paths git sees as changed or new (ignored files excluded); None if git cannot tell."""
    out = _git(workspace, "status", *STATUS_FLAGS)
    return None if out is None else [path for _, path in parse_status(out)]


def _digest(path: Path) -> str | None:
    """What a changed path holds now (content hash, or the link target); None when absent."""
    try:
        if path.is_symlink():
            return "link:" + os.readlink(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, unreadable: still a state to compare
        return f"error:{exc.errno}"


@dataclass(frozen=True)
class _Snapshot:
    """The repository as the agent found it or left it: HEAD, the branch, and every path that
    differs from HEAD with what it holds. Comparing two snapshots tells what the AGENT did,
    whatever the person had left uncommitted (their edits of program.md or the config)."""

    head: str
    branch: str
    dirty: dict[str, str | None]

    @classmethod
    def take(cls, workspace: Path) -> "_Snapshot | None":
        paths = _changed_paths(workspace)
        if paths is None:
            return None
        return cls(head=(_git(workspace, "rev-parse", "-q", "--verify", "HEAD") or "").strip(),
                   branch=(_git(workspace, "symbolic-ref", "-q", "HEAD") or "").strip(),
                   dirty={p: _digest(workspace / p) for p in paths})

    def changed_since(self, before: "_Snapshot") -> list[str]:
        paths = set(self.dirty) | set(before.dirty)
        return sorted(p for p in paths if self.dirty.get(p, "clean") != before.dirty.get(p, "clean"))


def _last_line(data: bytes) -> str:
    for line in reversed(strip_controls(data.decode("utf-8", "replace")).splitlines()):
        if line.strip():
            return one_line(line, DESCRIPTION_MAX)
    return ""


class CommandProposer:
    """Proposer(cfg): cfg has argv (sequence of str) and deadline_seconds."""

    name = "command"
    edits_worktree = True  # the agent edits the human's worktree: one proposes at a time

    def __init__(self, cfg, *, log_max_bytes: int = LOG_MAX_BYTES, kill_grace: float = KILL_GRACE_S):
        self.cfg = cfg
        self.log_max_bytes = log_max_bytes
        self.kill_grace = kill_grace

    def propose(self, ctx: ProposalContext) -> Proposal:
        argv = [str(a) for a in self.cfg.argv]
        if not argv:
            raise ProposerUnavailable("[command] argv is empty in autoresearch.toml", retry_after=600.0)
        started = time.monotonic()
        deadline = min(ctx.deadline, started + self.cfg.deadline_seconds)
        log_path = Path(ctx.workspace) / ".autoresearch" / "proposals" / f"{ctx.n}.log"
        before = _Snapshot.take(Path(ctx.workspace))
        log = _CappedLog(log_path, self.log_max_bytes)
        log.write(f"$ {' '.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(argv, cwd=ctx.workspace, env=agent_env(os.environ),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            log.close()
            # A missing or non-executable agent is a setup problem: block with a clear reason
            # rather than silently falling back to the offline proposer every experiment.
            raise ProposerUnavailable(f"cannot start the agent {argv[0]!r}: {exc.strerror}",
                                      retry_after=300.0) from None
        out_tail, err_tail = bytearray(), bytearray()
        threads = [threading.Thread(target=_feed, args=(proc.stdin, command_prompt(ctx).encode()), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stdout, log, out_tail), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, log, err_tail), daemon=True)]
        for t in threads:
            t.start()

        group = GroupSupervisor(proc, deadline=deadline, grace_s=self.kill_grace)
        while not group.tick():
            if group.reason is not None:
                time.sleep(0.02)  # stopping: SIGKILL follows after the grace
            elif ctx.cancel.wait(0.05):
                group.stop("cancel")
        # Whatever is left in the group (children the agent left behind after a normal exit)
        # dies now, before the leader is reaped.
        code = group.finish()
        killed = group.reason
        for t in threads:
            t.join(timeout=5)
        seconds = time.monotonic() - started
        note = f"; killed: {killed}" if killed else ""
        log.write(f"\n[agent exit status {code} after {seconds:.1f}s{note}]\n".encode())
        log.close()

        meta = {"exit_code": code, "seconds": round(seconds, 3), "log": str(log_path),
                "log_truncated": log.truncated}
        if killed == "cancel":
            raise ProposerUnavailable("proposal cancelled")
        if killed == "deadline":
            raise NoEdit(f"agent {argv[0]!r} passed its {deadline - started:.0f}s deadline and was killed")
        if code != 0:
            detail = _last_line(bytes(err_tail)) or _last_line(bytes(out_tail))
            raise NoEdit(f"agent {argv[0]!r} exited with status {code}" + (f": {detail}" if detail else ""))
        after = _Snapshot.take(Path(ctx.workspace))
        changed = None if before is None or after is None else after.changed_since(before)
        moved = None not in (before, after) and (after.head, after.branch) != (before.head, before.branch)
        if moved:
            # Its own commit (or a branch switch) leaves a clean tree: the daemon must still see
            # it, to reject the experiment (only the daemon commits) and restore the branch.
            meta["head_moved"] = {"from": before.head, "to": after.head,
                                  "branch_from": before.branch, "branch_to": after.branch}
            committed = _git(Path(ctx.workspace), "diff", "--name-only", "-z", before.head, after.head) or ""
            changed = sorted(set(changed or []) | {p for p in committed.split("\0") if p})
        elif changed == []:
            raise NoEdit(f"agent {argv[0]!r} exited without changing any file")
        description = _last_line(bytes(out_tail))
        if not description:
            description = "edit " + ", ".join(changed[:5]) if changed else f"{argv[0]} edit"
        meta["changed"] = changed
        return Proposal(description=description, files=None, proposer=self.name, meta=meta)
