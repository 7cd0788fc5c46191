"""A fake journald for tests: a real AF_UNIX datagram socket that parses the native protocol."""

from __future__ import annotations

import fcntl
import os
import socket
import struct


def parse(data: bytes) -> dict[str, bytes]:
    """Parse the native protocol the way journald does (both field encodings)."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[name.decode()] = value
    return fields


class FakeJournal:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(2)
        self.via_memfd = False
        self.seals = 0

    def receive(self) -> dict[str, bytes]:
        """One record, whether sent inline or as a memfd passed with SCM_RIGHTS."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
        self.via_memfd = bool(fds)
        if fds:
            assert data == b""
            (fd,) = fds
            self.seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            with os.fdopen(fd, "rb") as fh:
                fh.seek(0)  # the passed descriptor shares the sender's file offset
                data = fh.read()
        return parse(data)

    def close(self):
        self.sock.close()
