"""The Anthropic API key: where it comes from, and keeping it out of every log.

The key is read from ``ANTHROPIC_API_KEY`` or, under systemd, from the
credential file ``$CREDENTIALS_DIRECTORY/anthropic_api_key``
(``LoadCredential=anthropic_api_key:/path`` in the unit). Every key loaded
here is remembered so ``redact`` can scrub it from any text: error messages,
log records, event payloads.

``install_log_guard`` pins the HTTP/SDK loggers to WARNING (at DEBUG they log
request bodies, i.e. whole prompts) and adds a redacting filter; call it once
at daemon start-up, after the logging handlers exist. For structlog, put
``structlog_redactor`` in the processor chain.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Mapping

CREDENTIAL_NAME = "anthropic_api_key"
ENV_NAME = "ANTHROPIC_API_KEY"
REDACTED = "[REDACTED]"

# Loggers that would print prompts or headers at DEBUG/INFO. The SDK moved
# from httpx/httpcore to httpx2/httpcore2; pin both generations.
NOISY_LOGGERS = ("anthropic", "httpx", "httpx2", "httpcore", "httpcore2")

# Shapes of well-known keys, scrubbed even if the key was never loaded through this
# module (echoed by an agent CLI, read by a run from a file): Anthropic and OpenAI-style
# sk-..., GitHub, AWS access key ids, Slack, Hugging Face, PEM private keys.
_KEY_SHAPE = re.compile(
    r"sk-ant-[A-Za-z0-9_\-]{8,}|\bsk-[A-Za-z0-9_\-]{20,}|\bgh[pousr]_[A-Za-z0-9]{30,}"
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bhf_[A-Za-z0-9]{30,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)?")

# Environment variable names that hold secrets: never passed to a run (runner.scrubbed_env)
# and their values redacted wherever they turn up.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION)",
                         re.IGNORECASE)

_known: set[str] = set()
_lock = threading.Lock()


def remember(secret: str) -> None:
    """Register a secret so that `redact` removes it. Short strings are ignored
    (redacting "a" everywhere would mangle logs and hide nothing)."""
    if secret and len(secret) >= 8:
        with _lock:
            _known.add(secret)


def remember_environment(env: Mapping[str, str] | None = None) -> None:
    """Remember the values of secret-named variables and of every file in the systemd
    credentials directory (each whole file and each of its lines): whatever a run manages
    to print of them is redacted."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if SECRET_NAME.search(name) and name != "CREDENTIALS_DIRECTORY":
            remember(value.strip())
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return
    try:
        entries = list(Path(cred_dir).iterdir())
    except OSError:
        return
    for path in entries:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        remember(text.strip())
        for line in text.splitlines():
            remember(line.strip())


def load_api_key(env: Mapping[str, str] | None = None) -> str | None:
    """The API key from the environment or the systemd credential, or None."""
    env = os.environ if env is None else env
    key = (env.get(ENV_NAME) or "").strip()
    if not key:
        cred_dir = env.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            try:
                key = (Path(cred_dir) / CREDENTIAL_NAME).read_text(encoding="utf-8").strip()
            except OSError:
                key = ""
    if not key:
        return None
    remember(key)
    return key


def redact(text: str) -> str:
    """`text` with every known secret (and anything shaped like an Anthropic key) replaced."""
    if not isinstance(text, str):
        text = str(text)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _KEY_SHAPE.sub(REDACTED, text)


def redact_obj(value):
    """Redact strings inside a JSON-like structure (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_obj(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with secrets removed (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):
            # A structlog event dict on its way to a ProcessorFormatter: it must stay a
            # dict (the formatter copies it), so redact its values in place of the text.
            record.msg = redact_obj(record.msg)
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatted tracebacks include str(exc); pre-render it redacted.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_filter = RedactingFilter()


def install_log_guard() -> None:
    """Pin SDK/HTTP loggers to WARNING and add the redacting filter. Idempotent.

    Imports the SDK first: at import it may raise its own logger's level from
    ``ANTHROPIC_LOG``, which must not win over this pin.
    """
    try:
        import anthropic  # noqa: F401
    except ImportError:  # the offline proposer runs without it
        pass
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
    for handler in logging.getLogger().handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)


def structlog_redactor(_logger, _method, event_dict: dict) -> dict:
    """A structlog processor: redact every string value of the event."""
    return redact_obj(event_dict)
