"""sd_notify, written directly: one AF_UNIX datagram per message to $NOTIFY_SOCKET.

The protocol is tiny (newline-separated ``KEY=value`` lines in one datagram), so
there is no dependency on libsystemd. Outside systemd (no ``NOTIFY_SOCKET``) every
call is a cheap no-op. A send never raises: a service manager that went away must
not take the daemon down with it; the first failure is logged once.

The watchdog is pinged only from the daemon's main loop (``WatchdogTimer.tick``),
never from a helper thread: a thread would keep pinging while the loop is stuck,
which is exactly what the watchdog exists to catch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

_log = logging.getLogger("autoresearch.notify")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str | bytes:
    # '@name' is Linux's abstract namespace: the kernel wants a leading NUL byte.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one."""

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str | None = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        if unset_environment:
            # Children (the training run, an agent CLI) must not talk to systemd as us.
            for key in _ENV_KEYS:
                env.pop(key, None)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased) in one datagram; True if delivered."""
        if self.socket_path is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            # A newline inside a value would start a new (bogus) assignment.
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        payload = ("\n".join(lines) + "\n").encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the main loop on a full receive queue: drop instead.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, _socket_address(self.socket_path))
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning("sd_notify to %s failed: %s (further failures not logged)",
                             self.socket_path, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        # systemd >= 253 also wants MONOTONIC_USEC with RELOADING=1; older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds before the start/stop timeout fires."""
        return self.send(EXTEND_TIMEOUT_USEC=int(usec))

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is armed."""
        if self.socket_path is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None  # the watchdog is meant for another process
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_status(
    *,
    state: str,
    experiment: int | None = None,
    elapsed_s: float | None = None,
    budget_s: float | None = None,
    best: float | None = None,
    kept: int = 0,
    total: int = 0,
) -> str:
    """The one-line STATUS= text, e.g. ``exp 42 training 3:12/5:00 · best 0.9812 · 9 kept / 41``."""
    head = f"exp {experiment} {state}" if experiment is not None else state
    if elapsed_s is not None:
        head += f" {_clock(elapsed_s)}" + (f"/{_clock(budget_s)}" if budget_s else "")
    parts = [head]
    if best is not None:
        parts.append(f"best {best:.4f}")
    parts.append(f"{kept} kept / {total}")
    return " · ".join(parts)


class WatchdogTimer:
    """Rate-limits WATCHDOG=1 to one ping per half-interval; call ``tick()`` every loop turn."""

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.interval = notifier.watchdog_interval() if interval is None else interval
        self._clock = clock
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def should_ping(self, now: float | None = None) -> bool:
        if not self.enabled:
            return False
        now = self._clock() if now is None else now
        return self._last is None or now - self._last >= self.interval

    def seconds_until_due(self, now: float | None = None) -> float | None:
        """How long the main loop may sleep before the next ping is due (None: no watchdog)."""
        if not self.enabled:
            return None
        if self._last is None:
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, self._last + self.interval - now)

    def tick(self, now: float | None = None) -> bool:
        """Ping if due; returns True when a ping was sent."""
        now = self._clock() if now is None else now
        if not self.should_ping(now):
            return False
        self._last = now
        return self.notifier.watchdog()
