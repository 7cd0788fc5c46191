"""Git that runs no program the repository (or anyone who could write its config) supplies.

Git executes commands named in its configuration: ``core.fsmonitor`` on every
status, hooks, filter drivers (``clean``/``smudge``/``process``) on status,
commit and checkout, ``diff.external`` and ``diff.<driver>.command``/``textconv``
on diff, ``core.pager``, ``core.sshCommand``, ``gpg.program`` ... Whoever can
write ``.git/config`` (an agent CLI editing the worktree, say) could make the
daemon's own git calls run a program with the daemon's secrets.

``env(cwd)`` is the environment for one git call: the system config is
ignored (GIT_CONFIG_NOSYSTEM) and every configured key that names a program
is overridden on the command line level (GIT_CONFIG_COUNT, which wins over
every file) with a value that runs nothing. The keys are listed fresh each
time (``git config --list`` itself runs nothing) because the config may change
between two calls. Callers that diff also pass ``DIFF_FLAGS``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Mapping

IDENTITY = ("autoresearch", "autoresearch@localhost")

# Flags for every diff the daemon or the CLI asks for: never an external diff or textconv program.
DIFF_FLAGS = ("--no-ext-diff", "--no-textconv", "--no-color")

# Always set, whatever the config says.
_FIXED = {
    "core.fsmonitor": "false",
    "core.hooksPath": os.devnull,
    "core.pager": "cat",
    "core.quotePath": "false",
    "commit.gpgSign": "false",
    "tag.gpgSign": "false",
    "diff.external": "",
    "core.sshCommand": "",
}

# Configured keys (as `git config --list` prints them: section and key lower-cased) that
# name a program; each found is overridden with a value that runs nothing.
_PROGRAM_KEY = re.compile(
    r"^(?:core\.(?:editor|askpass|gitproxy|alternaterefscommand)"
    r"|sequence\.editor|gpg\.program|gpg\..+\.program|credential\.helper|credential\..+\.helper"
    r"|(?:diff|merge|filter)\..+\.(?:command|textconv|driver|clean|smudge|process)"
    r"|(?:difftool|mergetool)\..+\.cmd|pager\..+|remote\..+\.(?:uploadpack|receivepack|vcs)"
    r"|submodule\..+\.update|uploadpack\.packobjectshook)$")

# Environment variables that name a program git would run.
_PROGRAM_ENV = ("GIT_EXTERNAL_DIFF", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_PAGER", "GIT_EDITOR",
                "GIT_ASKPASS", "GIT_PROXY_COMMAND", "PAGER")


def _configured_keys(cwd: Path | str, base: Mapping[str, str]) -> list[str]:
    env = {**base, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_COUNT": "0"}
    try:
        out = subprocess.run(["git", "config", "--list", "--includes", "--name-only", "-z"],
                             cwd=cwd, env=env, capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [k for k in out.decode("utf-8", "replace").split("\0") if k]


def env(cwd: Path | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables to add to a git call made in ``cwd`` (values "" mean: set to empty)."""
    base = os.environ if base is None else base
    overrides = dict(_FIXED)
    for key in _configured_keys(cwd, base):
        low = key.lower()
        if low.startswith("pager."):
            overrides[key] = "false"
        elif _PROGRAM_KEY.match(low):
            overrides[key] = ""
    out = {
        "GIT_AUTHOR_NAME": IDENTITY[0], "GIT_AUTHOR_EMAIL": IDENTITY[1],
        "GIT_COMMITTER_NAME": IDENTITY[0], "GIT_COMMITTER_EMAIL": IDENTITY[1],
        "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_ATTR_NOSYSTEM": "1",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_CONFIG_COUNT": str(len(overrides)),
    }
    for i, (key, value) in enumerate(overrides.items()):
        out[f"GIT_CONFIG_KEY_{i}"] = key
        out[f"GIT_CONFIG_VALUE_{i}"] = value
    for name in _PROGRAM_ENV:
        out[name] = ""
    return out


def run(args: list[str], cwd: Path | str, *, extra_env: Mapping[str, str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """``git <args>`` in ``cwd`` with the safe environment (kwargs go to subprocess.run).
    ``extra_env``: more variables for this call (e.g. GIT_INDEX_FILE); the safe ones win."""
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **(extra_env or {}), **env(cwd)}, **kwargs)
