"""sd_notify against real AF_UNIX datagram sockets (filesystem and abstract namespace)."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from autoresearch.notify import Notifier, WatchdogTimer, format_status


@pytest.fixture
def fs_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


@pytest.fixture
def abstract_socket():
    name = f"autoresearch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    yield "@" + name, sock
    sock.close()


def recv(sock) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def pending(sock) -> int:
    sock.setblocking(False)
    n = 0
    try:
        while True:
            sock.recv(4096)
            n += 1
    except BlockingIOError:
        return n
    finally:
        sock.settimeout(2)


@pytest.mark.parametrize("which", ["fs_socket", "abstract_socket"])
def test_messages_arrive_as_single_datagrams(which, request):
    address, sock = request.getfixturevalue(which)
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready(status="replayed 12 events")
    assert recv(sock) == {"READY": "1", "STATUS": "replayed 12 events"}
    assert n.status("exp 42 training 3:12/5:00 · best 0.9812 · 9 kept / 41")
    assert recv(sock) == {"STATUS": "exp 42 training 3:12/5:00 · best 0.9812 · 9 kept / 41"}
    n.watchdog()
    assert recv(sock) == {"WATCHDOG": "1"}
    n.extend_timeout(30_000_000)
    assert recv(sock) == {"EXTEND_TIMEOUT_USEC": "30000000"}
    n.stopping()
    assert recv(sock) == {"STOPPING": "1"}
    n.reloading()
    msg = recv(sock)
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
    n.close()


def test_newline_in_status_cannot_inject_a_field(fs_socket):
    address, sock = fs_socket
    Notifier({"NOTIFY_SOCKET": address}).status("line one\nREADY=1")
    assert recv(sock) == {"STATUS": "line one READY=1"}


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval() is None
    assert WatchdogTimer(n).tick() is False


def test_missing_socket_never_raises_and_logs_once(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level("WARNING", logger="autoresearch.notify"):
        assert n.ready() is False
        assert n.status("x") is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_unset_environment_hides_the_socket_from_children(fs_socket):
    address, _ = fs_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier(env, unset_environment=True)
    assert env == {}
    assert n.enabled and n.watchdog_interval() == 0.5


def test_watchdog_interval_is_half_and_respects_watchdog_pid(fs_socket):
    address, _ = fs_socket
    assert Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000"}).watchdog_interval() == 30
    mine = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval() == 1
    other = dict(mine, WATCHDOG_PID=str(os.getpid() + 1))
    assert Notifier(other).watchdog_interval() is None
    assert Notifier(dict(mine, WATCHDOG_USEC="0")).watchdog_interval() is None
    assert Notifier(dict(mine, WATCHDOG_USEC="soon")).watchdog_interval() is None


def test_watchdog_timer_pings_at_half_the_interval(fs_socket):
    address, sock = fs_socket
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"})  # 10 s -> every 5 s
    timer = WatchdogTimer(n)
    assert timer.interval == 5
    # A main loop turning every 0.5 s for 30 simulated seconds.
    sent = [t / 2 for t in range(61) if timer.tick(now=t / 2)]
    assert sent == [0, 5, 10, 15, 20, 25, 30]
    assert pending(sock) == 7
    assert timer.seconds_until_due(now=31) == 4


def test_watchdog_timer_with_a_real_clock_from_the_calling_thread(fs_socket):
    address, sock = fs_socket
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})  # ping every 0.1 s
    timer = WatchdogTimer(n)
    end = time.monotonic() + 0.55
    while time.monotonic() < end:
        timer.tick()
        time.sleep(0.01)
    assert 5 <= pending(sock) <= 7
    # Nobody calls tick(): no ping, whatever the time (no background thread).
    time.sleep(0.25)
    assert pending(sock) == 0


def test_format_status():
    assert format_status(state="training", experiment=42, elapsed_s=192, budget_s=300,
                         best=0.98123, kept=9, total=41) == \
        "exp 42 training 3:12/5:00 · best 0.9812 · 9 kept / 41"
    assert format_status(state="blocked", kept=0, total=0) == "blocked · 0 kept / 0"
    assert format_status(state="training", experiment=1, elapsed_s=3725) == \
        "exp 1 training 1:02:05 · 0 kept / 0"
