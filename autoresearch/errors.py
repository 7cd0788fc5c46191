"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, locked workspace...).

    The CLI prints ``str(exc)`` on one line and exits with ``exit_code``;
    never a traceback.
    """

    exit_code = 2


class ConfigError(UserError):
    """autoresearch.toml is missing, unreadable or invalid."""


class WorkspaceError(UserError):
    """The workspace is not usable (not a git repo, uncommitted user changes, ...)."""


class LockedError(UserError):
    """Another daemon holds the workspace lock."""

    exit_code = 3


class CorruptLogError(UserError):
    """The event log failed verification; `autoresearch verify` names the first bad event."""

    exit_code = 4
