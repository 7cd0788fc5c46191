"""The one exit-code scheme of the `autoresearch` command, and the errors that carry its codes.

This module is the single source: every command exits with an ``Exit`` code, docs/CLI.md
lists them (tests/test_exit_codes.py checks that list against this one), and the systemd
unit's RestartPreventExitStatus= names the codes a restart cannot fix.

A user's problem is raised as one of the errors below; the CLI prints ``str(exc)`` on
one line and exits with its ``exit_code``, never with a traceback.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Exit codes of every `autoresearch` command (the docstring of each is its meaning in docs/CLI.md)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    BUSY = 3
    CORRUPT = 4
    SYSTEM = 5
    DECLINED = 6
    INTERRUPTED = 130


MEANING = {
    Exit.OK: "done",
    Exit.FAILED: "an unexpected failure (a bug): a traceback, or daemon.log, says where; or `run` "
                 "finding no Ray cluster at ray.address (a restart may find it)",
    Exit.USAGE: "a mistake in what was asked: a bad option, a directory that is not a workspace, "
                "an invalid autoresearch.toml, or something that does not exist (yet): an unknown "
                "experiment, a workspace where the daemon never ran, nothing finished to plot; or an event "
               "log written by a newer autoresearch (upgrade autoresearch)",
    Exit.BUSY: "the daemon is in the way or missing: another daemon holds the workspace (`run`, "
               "`repair`), none runs (`skip`, `stop`), or it did not answer within `--timeout`",
    Exit.CORRUPT: "the event log is damaged or cut short: `verify` says what is wrong or missing, `repair` "
                  "keeps every event that proves itself and records the rest as quarantined or lost",
    Exit.SYSTEM: "the machine refused: permission denied, a read-only or full file system, the event "
                 "log's `-wal` deleted under the daemon, systemd missing or `systemctl` failing",
    Exit.DECLINED: "the daemon answered that the request does not apply (`resume` while not paused)",
    Exit.INTERRUPTED: "interrupted by Ctrl-C (`tail -f`; for `run`, Ctrl-C is a graceful stop: 0)",
}


# What `run` may exit with that a restart cannot fix (the units' RestartPreventExitStatus=).
NO_RESTART = (Exit.USAGE, Exit.BUSY, Exit.CORRUPT, Exit.SYSTEM)


class UserError(Exception):
    """A problem the user can fix: the CLI prints ``str(exc)`` on one line and exits with ``exit_code``."""

    exit_code = Exit.USAGE


class ConfigError(UserError):
    """autoresearch.toml is missing, unreadable or invalid."""


class WorkspaceError(UserError):
    """The workspace is not usable (not a git repo, uncommitted user changes, no event log yet, ...)."""


class NewerLogError(UserError):
    """The event log was written by a newer autoresearch (a schema version this one does not know):
    reading it could misread it, writing it could damage it. Upgrading autoresearch fixes it."""


class BusyError(UserError):
    """The workspace's daemon is in the way (it runs) or missing (none runs, none answers)."""

    exit_code = Exit.BUSY


class LockedError(BusyError):
    """Another daemon holds the workspace lock."""


class CorruptLogError(UserError):
    """The event log failed verification; `autoresearch verify` names the first bad event."""

    exit_code = Exit.CORRUPT


class SystemRefusedError(UserError):
    """The machine refused: permissions, a read-only or full file system, systemd unavailable,
    a `-wal` deleted under the daemon. Never answered with advice to repair."""

    exit_code = Exit.SYSTEM


class ClusterUnreachableError(UserError):
    """[executor] kind = "ray" and nothing answers at ray.address: one line, and the exit status of
    a failure, so that systemd starts the daemon again (the head may be back by then)."""

    exit_code = Exit.FAILED


class DeclinedError(UserError):
    """The daemon recorded that a request does not apply."""

    exit_code = Exit.DECLINED
