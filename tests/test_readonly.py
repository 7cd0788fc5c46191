"""A workspace this process may read but not write (issue 9, item 13): a read-only mount, another
user's workspace. Readers work and write nothing; writers say why in one line; nothing is called
corrupt and nobody is told to repair a healthy log.

Both need root: the read-only bind mount is made in a private mount namespace (`unshare -m`), the
other user is a throwaway uid (`setpriv`), running the system's Python with this checkout and its
dependencies on PYTHONPATH (the virtual environment's interpreter may live where that uid cannot go).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemon_fixtures import REPO, cli, make_workspace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespace, setpriv)")

READERS = [("status",), ("results",), ("history",), ("show", "{ws}", "1"), ("verify",)]
WRITERS = ["run", "pause", "resume"]
UID = 54321  # a uid no one uses


@pytest.fixture(scope="module")
def lab():
    """A workspace with two experiments, stopped, in a directory any user may enter."""
    top = Path(tempfile.mkdtemp(prefix="ar-readonly-", dir="/tmp"))
    top.chmod(0o755)
    root = make_workspace(top / "ws")
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    yield root
    shutil.rmtree(top, ignore_errors=True)


def _argv(command: tuple[str, ...], root: Path) -> list[str]:
    if "{ws}" in command:
        return [a.replace("{ws}", str(root)) for a in command]
    return [*command, str(root)]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    state = root / ".autoresearch"
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir()}


def _check(out: subprocess.CompletedProcess, command: str, writes: bool, cause: str) -> None:
    text = out.stdout + out.stderr
    assert "Traceback" not in text, f"{command}: {text}"
    assert "repair" not in out.stderr, f"{command} advises repair: {out.stderr}"
    assert "corrupt" not in out.stderr and "unreadable" not in out.stderr, f"{command}: {out.stderr}"
    if writes:
        assert out.returncode != 0 and out.stderr.startswith("autoresearch: error: "), f"{command}: {text}"
        assert out.stderr.count("\n") == 1 and cause in out.stderr, f"{command}: {out.stderr}"
    else:
        assert out.returncode == 0, f"{command}: {text}"


def test_a_read_only_mount(lab, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    before = _snapshot(lab)
    py = shlex.quote(sys.executable)
    for command in READERS + [(w,) for w in WRITERS] + [("plot", "{ws}", "-o", str(tmp_path / "p.png"))]:
        argv = " ".join(shlex.quote(a) for a in _argv(command, lab))
        script = (f"mount --bind {shlex.quote(str(lab))} {shlex.quote(str(lab))} && "
                  f"mount -o remount,bind,ro {shlex.quote(str(lab))} && "
                  f"exec {py} -m autoresearch.cli {argv}")
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        _check(out, command[0], command[0] in WRITERS, "read-only file system")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert _snapshot(lab) == before  # nothing written, no -wal / -shm created


def _system_python() -> str | None:
    """An interpreter another user can run, of this one's version (so the venv's packages import)."""
    for candidate in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                     capture_output=True, text=True).stdout.strip()
            if version == str(tuple(sys.version_info[:2])):
                return candidate
    return None


def test_another_users_workspace(lab, tmp_path):
    python = _system_python()
    if python is None or shutil.which("setpriv") is None:
        pytest.skip("needs setpriv and a system python of this version")
    site = ":".join(p for p in sys.path if p.endswith("site-packages"))  # the venv's and its base's
    out_dir = Path(tempfile.mkdtemp(prefix="ar-out-", dir="/tmp"))
    out_dir.chmod(0o777)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(out_dir), "PYTHONPATH": f"{REPO}:{site}",
           "MPLCONFIGDIR": str(out_dir)}
    before = _snapshot(lab)
    try:
        for command in READERS + [(w,) for w in WRITERS] + [("plot", "{ws}", "-o", str(out_dir / "p.png"))]:
            if command[0] == "show":
                continue  # git refuses another user's repository ("dubious ownership"): git's rule
            out = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                                  python, "-m", "autoresearch.cli", *_argv(command, lab)],
                                 capture_output=True, text=True, timeout=120, env=env, cwd=out_dir)
            _check(out, command[0], command[0] in WRITERS, f"permission denied for user {UID}")
        assert (out_dir / "p.png").stat().st_size > 0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    assert _snapshot(lab) == before
