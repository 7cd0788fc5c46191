"""journald's native protocol, written directly (no python-systemd dependency).

One datagram per record to /run/systemd/journal/socket. Each field is either
``NAME=value\\n`` or, when the value contains a newline, ``NAME\\n`` + the value's
length as a little-endian u64 + the value + ``\\n``. A record too big for one
datagram goes in a sealed memfd whose descriptor is passed with SCM_RIGHTS.
Fields are then queryable: ``journalctl -u autoresearch@lab EXPERIMENT=42``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"

_INVALID = re.compile(r"[^A-Z0-9_]")
# Fields journald reserves or that we set ourselves: a user key of that name is renamed.
_RESERVED = {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "MESSAGE_ID", "CODE_FILE",
             "CODE_LINE", "CODE_FUNC", "ERRNO", "SYSLOG_FACILITY", "SYSLOG_PID"}
_PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
               "notice": 5, "info": 6, "debug": 7}


def field_name(key: str) -> str:
    """A valid journal field name for ``key``: upper case, [A-Z0-9_], starts with a letter."""
    name = _INVALID.sub("_", key.upper()).lstrip("_")  # leading '_' is for trusted fields
    if not name:
        name = "FIELD"
    if name[0].isdigit():
        name = "F_" + name
    return name[:64]


def priority(level: str | int | None) -> int:
    """syslog priority (0-7) for a log level name; info (6) when unknown."""
    if isinstance(level, int):
        return max(0, min(7, level))
    return _PRIORITIES.get(str(level or "").lower(), 6)


def _value_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False).encode()
    return str(value).encode("utf-8", "replace")


def encode(fields: Mapping[str, object]) -> bytes:
    """Serialize fields (keys as given; call ``field_name`` first) to the wire format."""
    out = bytearray()
    for name, value in fields.items():
        data = _value_bytes(value)
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def record(message: str, /, *, priority_: int = 6, identifier: str | None = None,
           **extra: object) -> dict[str, object]:
    """Build a record: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, plus extra keys made valid.

    None values are skipped; a key colliding with a reserved field gets an ``AR_`` prefix.
    """
    fields: dict[str, object] = {"MESSAGE": message, "PRIORITY": priority_}
    if identifier:
        fields["SYSLOG_IDENTIFIER"] = identifier
    for key, value in extra.items():
        if value is None:
            continue
        name = field_name(key)
        if name in _RESERVED or name in fields:
            name = field_name("AR_" + name)
        fields[name] = value
    return fields


class JournalSender:
    """Sends records to journald (or to a test socket at ``path``)."""

    def __init__(self, path: str | os.PathLike[str] = JOURNAL_SOCKET) -> None:
        self.path = os.fspath(path)
        self._sock: socket.socket | None = None

    def available(self) -> bool:
        return socket_exists(self.path)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # journald reads fast; a stalled one must not hang the daemon forever.
            sock.settimeout(2.0)
            self._sock = sock
        return self._sock

    def send(self, message: str, /, *, priority_: int = 6, identifier: str | None = None,
             **extra: object) -> None:
        """Send one record; raises OSError when journald cannot be reached."""
        self.send_fields(record(message, priority_=priority_, identifier=identifier, **extra))

    def send_fields(self, fields: Mapping[str, object]) -> None:
        data = encode(fields)
        sock = self._socket()
        try:
            sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, data)

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        # journald only accepts a sealed memfd: it must not change under its reader.
        fd = os.memfd_create("autoresearch-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            # sendmsg, not socket.send_fds: the latter drops the address on Python 3.11.
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))
            sock.sendmsg([], [rights], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def socket_exists(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
