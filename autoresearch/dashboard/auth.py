"""The dashboard's access token.

On loopback the page needs no token (unless asked for with --token): only this machine
can reach it. Anywhere else a token is required. It is generated once, shown once, and
only its SHA-256 is stored, outside the workspace (the agent's code and anyone who can
read the workspace must not find it), in the user's state directory by default:
  $XDG_STATE_HOME/autoresearch/dashboard/<workspace hash>.token   (mode 0600)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from ..errors import SystemRefusedError, UserError

COOKIE = "autoresearch_dashboard"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_token_file(root: Path) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(base) / "autoresearch" / "dashboard" / f"{key}.token"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_digest(path: Path) -> str | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the dashboard token file {path}: {exc}") from None
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"{path} is not a dashboard token file; delete it, or use --new-token")
    return text


def create(path: Path) -> str:
    """A new token; its digest replaces whatever `path` held (written tmp + rename, mode 0600)."""
    token = secrets.token_urlsafe(24)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(digest(token) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SystemRefusedError(f"cannot store the dashboard token in {path}: {exc.strerror or exc}") from None
    return token


def matches(token: str | None, expected_digest: str) -> bool:
    return bool(token) and hmac.compare_digest(digest(token), expected_digest)
