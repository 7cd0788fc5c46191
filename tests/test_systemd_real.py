"""The service under a real systemd: install, READY, STATUS, journal fields, pause across a
restart, a graceful stop, the watchdog killing a stuck daemon, Restart=, uninstall.

PID 1 of this machine is not systemd, so the test boots one: the distribution's own
/lib/systemd/systemd as PID 1 of new PID, mount and UTS namespaces (root only). Inside,
before systemd starts, /run and /etc/systemd/system become empty tmpfs (the unit file that
`service install` writes never reaches the host), and the units that would touch the host's
files are masked -- above all systemd-tmpfiles-setup, whose `--boot --remove` empties /tmp.
Skipped where any of that is not possible.

The unit runs the README's editable install made in a clone under /tmp, which the unit's
PrivateTmp= hides unless `service install` binds the package's source and venv back in.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from daemon_fixtures import editable_install, make_workspace, wait_for

SYSTEMD = Path("/lib/systemd/systemd")
MASKED = """
systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer
systemd-tmpfiles-clean.service ldconfig.service systemd-sysusers.service systemd-firstboot.service
systemd-machine-id-commit.service systemd-update-utmp.service systemd-update-utmp-runlevel.service
systemd-logind.service getty.target console-getty.service systemd-remount-fs.service
systemd-random-seed.service systemd-journal-flush.service systemd-hwdb-update.service
systemd-journal-catalog-update.service systemd-update-done.service apt-daily.timer
apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer cron.service
""".split()

BOOT = """#!/bin/sh
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /etc/systemd/system
mkdir -p /run/systemd/system
for unit in {masked}; do ln -s /dev/null /run/systemd/system/$unit; done
export container=other
exec {systemd} --system --unit=multi-user.target
"""


def _can_boot() -> str:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs Linux and root"
    if not SYSTEMD.exists() or not shutil.which("nsenter") or not shutil.which("unshare"):
        return "needs /lib/systemd/systemd, nsenter and unshare"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        return "this kernel or container refuses new PID/mount namespaces"
    return ""


pytestmark = pytest.mark.skipif(bool(_can_boot()), reason=_can_boot() or "ok")


class Systemd:
    """A systemd booted as PID 1 of fresh namespaces; `run` executes a command inside."""

    def __init__(self, scratch: Path):
        boot = scratch / "boot.sh"
        boot.write_text(BOOT.format(masked=" ".join(MASKED), systemd=SYSTEMD))
        boot.chmod(0o755)
        self.log = open(scratch / "systemd.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc", str(boot)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = None
        try:
            wait_for(lambda: self._pid1() or self.proc.poll() is not None, timeout=30, interval=0.1)
            self.pid = self._pid1()
            assert self.pid, "systemd exited"
            wait_for(lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip()
                     in ("running", "degraded"), timeout=60, interval=0.2)
        except AssertionError:
            # The machine, not the product: say why, and skip.
            self.close()
            tail = (scratch / "systemd.log").read_text(errors="replace")[-500:]
            pytest.skip(f"systemd did not boot in a namespace here: {tail or 'no output'}")

    def _pid1(self) -> int | None:
        """Host PID of the namespace's PID 1 (the child of `unshare --fork`), once it is systemd."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pid = int(children[0])
            return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" else None
        except (OSError, IndexError, ValueError):
            return None

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--", *argv],
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {out.returncode}: {out.stdout}{out.stderr}")
        return out

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def close(self) -> None:
        # Killing PID 1 of a PID namespace kills every process in it; its mounts go with it.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def install():
    """The README's editable install in a clone under /tmp, which the unit's PrivateTmp= hides
    unless `service install` binds it back in: (the console script, the venv's python)."""
    clone = Path(tempfile.mkdtemp(prefix="autoresearch-clone-", dir="/tmp"))
    try:
        script = editable_install(clone)
        yield str(script), str(script.parent / "python")
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def _private_dirs() -> set[Path]:
    return {p for d in ("/tmp", "/var/tmp") for p in Path(d).glob("systemd-private-*-autoresearch@*")}


@pytest.fixture
def systemd(tmp_path):
    before = _private_dirs()
    sd = Systemd(tmp_path)
    try:
        yield sd
    finally:
        sd.close()
        for path in _private_dirs() - before:  # PrivateTmp= dirs of a unit killed with PID 1
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workspace(install):
    # Where system services keep their state; not under /tmp (the unit has PrivateTmp=).
    base = Path("/var/lib/autoresearch-tests") / uuid.uuid4().hex[:12]
    root = make_workspace(base / "lab", run={"command": f"{install[1]} train.py"})
    try:
        yield root
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _events(sd: Systemd, ar: str, root: Path) -> list[str]:
    out = sd.run(ar, "history", str(root))
    return [line.split()[4] for line in out.stdout.splitlines() if line.strip()]


def test_the_service_under_a_real_systemd(systemd, install, workspace):
    try:
        _scenario(systemd, install[0], workspace)
    except BaseException:
        out = systemd.run("journalctl", "--no-pager", "-o", "short-precise", check=False)
        print("journal of the namespace's systemd:\n" + out.stdout[-10000:])
        raise


def _scenario(sd: Systemd, ar: str, workspace: Path) -> None:
    unit = "autoresearch@lab.service"
    # Install as the README says: rendered, daemon-reload, enable --now.
    out = sd.run(ar, "service", "install", str(workspace))
    assert f"installed and started {unit}" in out.stdout, out.stdout + out.stderr
    assert not (Path("/etc/systemd/system") / unit).exists()  # stayed inside the namespace
    # READY=1 made it active; STATUS= is the daemon's own line; experiments are kept/discarded.
    wait_for(lambda: sd.show(unit, "ActiveState") == "active", timeout=30, interval=0.2)
    wait_for(lambda: re.search(r"\d+ kept / [1-9]", sd.show(unit, "StatusText")), timeout=60, interval=0.2)
    assert sd.show(unit, "Result") == "success"
    # The journal's fields are queryable.
    out = sd.run("journalctl", "-u", unit, "EXPERIMENT=1", "TRIGGER=launch", "-o", "cat", "--no-pager")
    assert "experiment:1 launch: committed -> training" in out.stdout, out.stdout
    out = sd.run("journalctl", "-u", unit, "STATE=running", "-o", "json", "--no-pager")
    assert '"_SYSTEMD_UNIT":"autoresearch@lab.service"' in out.stdout.replace(" ", "")
    # A pause outlives a restart by systemd.
    assert sd.run(ar, "pause", str(workspace)).returncode == 0
    sd.run("systemctl", "restart", unit)
    wait_for(lambda: sd.show(unit, "StatusText").startswith("paused"), timeout=30, interval=0.2)
    main = sd.show(unit, "MainPID")
    assert sd.run(ar, "resume", str(workspace)).returncode == 0
    # A stuck main loop stops pinging: systemd's watchdog kills it and Restart= brings it back.
    sd.run("mkdir", "-p", f"/run/systemd/system/{unit}.d")
    mode = workspace.parent / "mode"  # the fixture workload's switch (see daemon_fixtures)
    mode.write_text("")
    sd.run("sh", "-c", f"printf '[Service]\\nWatchdogSec=4\\nRestartSec=1\\n"
                       f"Environment=AUTORESEARCH_TEST_MODE={mode}\\n' "
                       f"> /run/systemd/system/{unit}.d/fast.conf")
    sd.run("systemctl", "daemon-reload")
    sd.run("systemctl", "restart", unit)
    wait_for(lambda: sd.show(unit, "ActiveState") == "active", timeout=30, interval=0.2)
    stuck = sd.show(unit, "MainPID")
    assert stuck != main
    sd.run("sh", "-c", f"kill -STOP {stuck}")
    t_stuck = time.monotonic()
    wait_for(lambda: sd.show(unit, "NRestarts") == "1" and sd.show(unit, "ActiveState") == "active",
             timeout=60, interval=0.2)
    print(f"a stuck daemon was back after {time.monotonic() - t_stuck:.1f} s "
          "(WatchdogSec=4, RestartSec=1)")
    out = sd.run("journalctl", "-u", unit, "-o", "cat", "--no-pager")
    assert "Watchdog timeout" in out.stdout and "Failed with result 'watchdog'" in out.stdout
    # A graceful stop: well within TimeoutStopSec, the run interrupted, no process left.
    mode.write_text("sleep:60")  # runs from now on last until they are stopped
    wait_for(lambda: "training" in sd.show(unit, "StatusText"), timeout=30, interval=0.2)
    t0 = time.monotonic()
    sd.run("systemctl", "stop", unit)
    assert time.monotonic() - t0 < 10
    assert sd.show(unit, "Result") == "success"
    triggers = _events(sd, ar, workspace)
    assert triggers[-2:] == ["interrupt", "stop"], triggers[-5:]
    assert triggers.count("boot") == 4  # install, two restarts, the watchdog's restart
    out = sd.run(ar, "verify", str(workspace))
    assert "hash chain intact" in out.stdout
    assert "train.py" not in sd.run("ps", "-eo", "args").stdout
    # Uninstall: disabled, stopped, removed.
    out = sd.run(ar, "service", "uninstall", str(workspace))
    assert sd.show(unit, "LoadState") == "not-found"


def test_the_user_unit_under_a_real_user_manager(systemd, install, workspace):
    """`service install --user`: a user manager (user@0.service; without logind, its runtime
    directory is made by hand) runs the user unit; journal fields; uninstall."""
    sd, ar, unit = systemd, install[0], "autoresearch@lab.service"
    env = ["env", "XDG_RUNTIME_DIR=/run/user/0", "XDG_CONFIG_HOME=/run/user/0/config"]
    sd.run("sh", "-c", "mkdir -p -m 700 /run/user/0 /run/systemd/system/user@0.service.d && printf "
                       "'[Service]\\nEnvironment=XDG_RUNTIME_DIR=/run/user/0 XDG_CONFIG_HOME=/run/user/0/config\\n'"
                       " > /run/systemd/system/user@0.service.d/runtime.conf")
    sd.run("systemctl", "daemon-reload")
    sd.run("systemctl", "start", "user@0.service")
    try:
        out = sd.run(*env, ar, "service", "install", "--user", str(workspace))
        assert f"installed and started {unit}" in out.stdout, out.stdout + out.stderr

        def status() -> str:
            return sd.run(*env, "systemctl", "--user", "show", "-p", "StatusText", "--value", unit).stdout

        wait_for(lambda: re.search(r"\d+ kept / [1-9]", status()), timeout=60, interval=0.2)
        out = sd.run("journalctl", "--user-unit", unit, "EXPERIMENT=1", "TRIGGER=launch", "-o", "cat",
                     "--no-pager")
        assert "experiment:1 launch: committed -> training" in out.stdout, out.stdout
        out = sd.run(*env, ar, "service", "uninstall", "--user", str(workspace))
        assert f"stopped and removed {unit}" in out.stdout
        assert _events(sd, ar, workspace)[-1] == "stop"
        assert "hash chain intact" in sd.run(ar, "verify", str(workspace)).stdout
    except BaseException:
        out = sd.run("journalctl", "--no-pager", "-o", "short-precise", check=False)
        print("journal of the namespace's systemd:\n" + out.stdout[-10000:])
        raise
