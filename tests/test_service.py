"""service: unit rendering, systemd-analyze verify/security, install/uninstall/status."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from autoresearch import service
from autoresearch.errors import UserError
from daemon_fixtures import editable_install

ROOT = Path(__file__).resolve().parents[1]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "lab"
    ws.mkdir()
    (ws / "autoresearch.toml").write_text("[run]\n")
    return ws


@pytest.fixture
def executable(tmp_path):
    exe = tmp_path / "bin" / "autoresearch"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_systemd_dir_holds_the_packaged_templates():
    assert (ROOT / "systemd" / "autoresearch@.service").read_text() == service.template_text(False)
    assert (ROOT / "systemd" / "user" / "autoresearch@.service").read_text() == \
        service.template_text(True)


def test_render_system_unit(workspace, executable):
    name, text = service.render_unit(workspace, user=False, gpu=None, executable=executable)
    assert name == "autoresearch@lab.service"
    d = directives(text)
    assert d["ExecStart"] == [f"{executable} run ${{AUTORESEARCH_WORKSPACE}}"]
    assert d["Environment"][0] == f'"AUTORESEARCH_WORKSPACE={workspace}"'
    assert d["WorkingDirectory"] == [str(workspace)]
    assert d["ReadWritePaths"] == [f'"{workspace}"']
    assert d["User"] == [pwd.getpwuid(os.getuid()).pw_name]
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["60"] and d["Restart"] == ["on-failure"]
    assert d["KillMode"] == ["mixed"]
    assert d["LoadCredential"] == ["anthropic_api_key:/etc/autoresearch/anthropic_api_key"]
    assert d["WantedBy"] == ["multi-user.target"]
    assert not any(v.startswith("CUDA_VISIBLE_DEVICES") for v in d["Environment"])
    assert "#Environment=CUDA_VISIBLE_DEVICES=0" in text
    for forbidden in ("PrivateDevices", "MemoryDenyWriteExecute", "PrivateNetwork"):
        assert forbidden not in d
    # tmp_path lives under /tmp, which PrivateTmp= replaces: it is bound back in.
    assert f'"{workspace}"' in d["BindPaths"]
    assert "/var/lib/autoresearch" not in text.split("[Service]")[1].split("WatchdogSec")[0]


def test_render_with_gpu_and_user_variant(workspace, executable):
    _, text = service.render_unit(workspace, user=False, gpu=2, executable=executable)
    assert "Environment=CUDA_VISIBLE_DEVICES=2" in text.splitlines()
    name, text = service.render_unit(workspace, user=True, gpu=0, executable=executable)
    d = directives(text)
    assert name == "autoresearch@lab.service"
    assert "User" not in d and "ProtectSystem" not in d
    assert "Environment=CUDA_VISIBLE_DEVICES=0" in text.splitlines()
    assert d["WantedBy"] == ["default.target"]
    assert d["WorkingDirectory"] == [str(workspace)]
    assert "%h/autoresearch" not in text


def test_render_python_dash_m_and_paths_with_spaces_and_percent(tmp_path):
    ws = tmp_path / "my lab 100%"
    ws.mkdir()
    (ws / "autoresearch.toml").write_text("")
    name, text = service.render_unit(ws, user=False, gpu=None,
                                     executable=[sys.executable, "-m", "autoresearch"])
    assert name == "autoresearch@my\\x20lab\\x20100\\x25.service"
    d = directives(text)
    assert d["ExecStart"] == [f"{sys.executable} -m autoresearch run ${{AUTORESEARCH_WORKSPACE}}"]
    assert d["WorkingDirectory"] == [str(ws).replace("%", "%%")]


@pytest.fixture(params=["/tmp", "/home"])
def clone(request):
    """A clone with the README's editable install, under /tmp (hidden by PrivateTmp=) or
    /home (hidden by ProtectHome=)."""
    if not os.access(request.param, os.W_OK):
        pytest.skip(f"{request.param} is not writable here")
    path = Path(tempfile.mkdtemp(prefix="autoresearch-clone-", dir=request.param))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _covered(path: Path, binds: list[str]) -> bool:
    return any(Path(b.strip('"')) in (path, *path.parents) for b in binds)


def test_an_editable_install_in_a_hidden_place_is_bound_read_only(clone, workspace):
    script = editable_install(clone)
    d = directives(service.render_unit(workspace, user=False, gpu=None, executable=script)[1])
    binds = d["BindReadOnlyPaths"]
    # The package's source and the venv are visible to the unit, read-only; nothing wider.
    for needed in (clone / "autoresearch", clone / ".venv"):
        assert _covered(needed, binds), (needed, binds)
    assert not any(Path(b.strip('"')) in (Path("/"), Path("/tmp"), Path("/home")) for b in binds)
    if clone.parent == Path("/home"):  # the homes: an empty tmpfs with only the binds in it
        assert d["ProtectHome"] == ["tmpfs"]
    assert d["ExecStart"] == [f"{script} run ${{AUTORESEARCH_WORKSPACE}}"]


def test_install_refuses_a_python_that_imports_the_package_only_through_pythonpath(tmp_path, workspace):
    # `PYTHONPATH=. python -m autoresearch service install`: the unit gets no PYTHONPATH.
    bare = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run([str(bare / "bin" / "python"), "-m", "autoresearch", "service", "install",
                           "--print", str(workspace)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"autoresearch: error: the service's Python {bare}/bin/python cannot "
                           "import autoresearch on its own: ModuleNotFoundError: No module named "
                           "'autoresearch' (PYTHONPATH is set here; the service does not get it); "
                           "install the package into that Python (pip install -e .)\n")


def test_render_refuses_bad_input(tmp_path, executable):
    with pytest.raises(UserError, match="does not exist"):
        service.render_unit(tmp_path / "nope", user=False, gpu=None, executable=executable)
    with pytest.raises(UserError, match="not an autoresearch workspace"):
        service.render_unit(tmp_path, user=False, gpu=None, executable=executable)
    bad = tmp_path / 'quo"te'
    bad.mkdir()
    (bad / "autoresearch.toml").write_text("")
    with pytest.raises(UserError, match="cannot carry"):
        service.render_unit(bad, user=False, gpu=None, executable=executable)
    ws = tmp_path / "ok"
    ws.mkdir()
    (ws / "autoresearch.toml").write_text("")
    with pytest.raises(UserError, match="--gpu"):
        service.render_unit(ws, user=False, gpu=-1, executable=executable)
    with pytest.raises(UserError, match="absolute"):
        service.render_unit(ws, user=False, gpu=None, executable=["autoresearch"])


def test_escape_instance_matches_systemd_escape():
    assert service.escape_instance("lab") == "lab"
    assert service.escape_instance("gpu-0 lab") == "gpu\\x2d0\\x20lab"
    assert service.escape_instance(".hidden") == "\\x2ehidden"
    tool = shutil.which("systemd-escape")
    if tool:
        for name in ("lab", "gpu-0 lab", ".hidden", "ünï"):
            expect = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
            assert service.escape_instance(name) == expect


def _analyze_env(user: bool, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    if user:  # a user-mode analysis wants a runtime directory
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


def _verify(path: Path, user: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    argv = [ANALYZE, *(["--user"] if user else []), "verify", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=_analyze_env(user, tmp_path))


@needs_analyze
@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("gpu", [None, 1])
def test_systemd_analyze_verify_is_silent(workspace, executable, tmp_path, user, gpu):
    name, text = service.render_unit(workspace, user=user, gpu=gpu, executable=executable)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / name).write_text(text)
    proc = _verify(unit_dir / name, user, tmp_path)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(workspace, tmp_path):
    # The check above can fail: a missing executable is reported.
    name, text = service.render_unit(workspace, user=False, gpu=None,
                                     executable=tmp_path / "missing" / "autoresearch")
    (tmp_path / name).write_text(text)
    proc = _verify(tmp_path / name, False, tmp_path)
    assert proc.returncode != 0 and "missing" in proc.stdout + proc.stderr


def exposure(path: Path, user: bool, tmp_path: Path) -> float:
    argv = [ANALYZE, *(["--user"] if user else []), "security", "--offline=true", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=_analyze_env(user, tmp_path))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
def test_security_exposure_of_the_units(workspace, executable, tmp_path, capsys):
    name, text = service.render_unit(workspace, user=False, gpu=0, executable=executable)
    (tmp_path / name).write_text(text)
    score = exposure(tmp_path / name, False, tmp_path)
    user_name, user_text = service.render_unit(workspace, user=True, gpu=0, executable=executable)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / user_name).write_text(user_text)
    user_score = exposure(tmp_path / "user" / user_name, True, tmp_path)
    with capsys.disabled():
        print(f"\nsystemd-analyze security exposure: system {score}, user {user_score}")
    assert score <= 5.0
    assert user_score < 9.0  # unprivileged: seccomp-based hardening only


# -- install / uninstall / status with a fake systemctl ------------------------------------


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A real `systemctl` script on PATH that records its argv (JSON, one call per line)."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    record = tmp_path / "systemctl.calls"
    script = bindir / "systemctl"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(record)!r}, "a") as fh:
            fh.write(json.dumps(sys.argv[1:]) + "\\n")
        if "status" in sys.argv:
            print("* " + sys.argv[-1] + " - autoresearch daemon (lab)")
            print("     Active: inactive (dead)")
            sys.exit(3)
        if os.environ.get("FAKE_SYSTEMCTL_FAIL") in sys.argv:
            print("Failed to enable unit: Unit file is masked.", file=sys.stderr)
            sys.exit(1)
        """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    def calls() -> list[list[str]]:
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines()]

    return calls


@pytest.mark.parametrize("user", [False, True])
def test_install_status_uninstall(workspace, executable, tmp_path, fake_systemctl, user):
    units = tmp_path / "etc-units"
    res = service.install(workspace, user=user, gpu=1, executable=executable,
                          directory=units, check_pid1=False)
    unit = "autoresearch@lab.service"
    assert res.unit == unit and res.path == units / unit
    assert res.path.read_text() == res.text
    assert oct(res.path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in units.iterdir()] == [unit]  # no temp file left behind
    flag = ["--user"] if user else []
    assert fake_systemctl() == [flag + ["daemon-reload"], flag + ["enable", "--now", unit]]

    out = service.status(workspace, user=user, directory=units, check_pid1=False)
    assert "Active: inactive (dead)" in out
    assert fake_systemctl()[-1] == flag + ["status", "--no-pager", "--full", unit]

    assert service.uninstall(workspace, user=user, directory=units, check_pid1=False) == unit
    assert not res.path.exists()
    assert fake_systemctl()[-3:] == [flag + ["disable", "--now", unit], flag + ["daemon-reload"],
                                     flag + ["reset-failed", unit]]
    with pytest.raises(UserError, match="not installed"):
        service.status(workspace, user=user, directory=units, check_pid1=False)
    with pytest.raises(UserError, match="not installed"):
        service.uninstall(workspace, user=user, directory=units, check_pid1=False)


def test_install_reinstall_and_name_collision(tmp_path, executable, fake_systemctl):
    units = tmp_path / "units"
    a, b = tmp_path / "a" / "lab", tmp_path / "b" / "lab"
    for ws in (a, b):
        ws.mkdir(parents=True)
        (ws / "autoresearch.toml").write_text("")
    service.install(a, user=False, executable=executable, directory=units, check_pid1=False)
    # Same workspace again: fine (e.g. to change the GPU).
    service.install(a, user=False, gpu=3, executable=executable, directory=units,
                    check_pid1=False)
    assert "CUDA_VISIBLE_DEVICES=3" in (units / "autoresearch@lab.service").read_text()
    with pytest.raises(UserError, match=f"already runs the workspace {a}"):
        service.install(b, user=False, executable=executable, directory=units, check_pid1=False)
    res = service.install(b, user=False, executable=executable, directory=units,
                          name="lab-b", check_pid1=False)
    assert res.unit == "autoresearch@lab\\x2db.service"


def test_systemctl_failure_is_one_clear_line(workspace, executable, tmp_path, fake_systemctl,
                                             monkeypatch):
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAIL", "enable")
    with pytest.raises(UserError) as err:
        service.install(workspace, user=False, executable=executable,
                        directory=tmp_path / "u", check_pid1=False)
    assert str(err.value) == ("`systemctl enable --now autoresearch@lab.service` failed: "
                              "Failed to enable unit: Unit file is masked.")


def test_print_only_needs_no_systemd(workspace, executable, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = service.install(workspace, user=False, gpu=None, print_only=True,
                          executable=executable, systemctl="no-such-systemctl")
    assert res.path is None and res.text.startswith("# autoresearch daemon")


def test_clear_errors_without_systemd(workspace, executable, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"^systemctl not found: .* use --print to see the unit$"):
        service.install(workspace, user=False, executable=executable, directory=tmp_path)


def test_clear_error_when_pid1_is_not_systemd(workspace, executable, tmp_path, fake_systemctl):
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd")
    pid1 = Path("/proc/1/comm").read_text().strip()
    with pytest.raises(UserError) as err:
        service.install(workspace, user=False, executable=executable, directory=tmp_path / "u")
    assert str(err.value) == (f"systemd is not running on this machine (PID 1 is {pid1}); "
                              "use --print to see the unit")
    assert fake_systemctl() == []
    assert not (tmp_path / "u").exists()


def test_find_executable_is_absolute():
    argv = service.find_executable()
    assert Path(argv[0]).is_absolute() and Path(argv[0]).exists()


# -- the dashboard's own unit ----------------------------------------------------------------


def test_dashboard_unit_installs_beside_the_daemon_with_a_token_beyond_loopback(
        workspace, executable, tmp_path, fake_systemctl, capsys):
    import hashlib

    units, tokens = tmp_path / "etc-units", tmp_path / "etc-tokens"
    service.install(workspace, user=False, executable=executable, directory=units, check_pid1=False)
    res = service.install(workspace, user=False, executable=executable, directory=units, check_pid1=False,
                          dashboard="0.0.0.0:8765", token_dir=tokens)
    assert res.unit == "autoresearch-dashboard@lab.service"
    assert sorted(p.name for p in units.iterdir()) == ["autoresearch-dashboard@lab.service", "autoresearch@lab.service"]
    token_file = next(tokens.iterdir())
    assert res.token and token_file.read_text().strip() == hashlib.sha256(res.token.encode()).hexdigest()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert f"ExecStart={executable} dashboard ${{AUTORESEARCH_WORKSPACE}} --listen 0.0.0.0:8765 " \
           f"--token-file {token_file}" in res.text
    assert "ReadWritePaths" not in res.text and f'BindReadOnlyPaths="{workspace}"' in res.text  # reads only
    assert re.search(r"^RestartPreventExitStatus=2 3 4 5$", res.text, re.M)
    # Installed again: the token stays (it was shown once), the unit is rewritten.
    again = service.install(workspace, user=False, executable=executable, directory=units, check_pid1=False,
                            dashboard="0.0.0.0:8765", token_dir=tokens)
    assert again.token is None and token_file.read_text().strip() == hashlib.sha256(res.token.encode()).hexdigest()
    # Loopback: no token at all.
    loop = service.install(workspace, user=True, executable=executable, directory=units, check_pid1=False,
                           dashboard="127.0.0.1:9000")
    assert loop.token is None and "--token-file" not in loop.text and "--listen 127.0.0.1:9000" in loop.text
    assert service.uninstall(workspace, user=False, directory=units, check_pid1=False,
                             dashboard=True) == "autoresearch-dashboard@lab.service"
    assert [p.name for p in units.iterdir()] == ["autoresearch@lab.service"]  # the daemon's unit stays
    with pytest.raises(UserError, match="the dashboard uses no GPU"):
        service.render_unit(workspace, user=False, gpu=0, executable=executable, dashboard="127.0.0.1:8765")
    if ANALYZE:
        (tmp_path / res.unit).write_text(res.text)
        with capsys.disabled():
            print(f"\nsystemd-analyze security exposure of the dashboard unit: "
                  f"{exposure(tmp_path / res.unit, False, tmp_path)}")


def test_dashboard_unit_from_the_cli(workspace):
    from daemon_fixtures import cli

    out = cli("service", "install", str(workspace), "--dashboard", "--print")
    assert out.returncode == 0, out.stderr
    assert " dashboard ${AUTORESEARCH_WORKSPACE} --listen 127.0.0.1:8765\n" in out.stdout
    out = cli("service", "install", str(workspace), "--listen", "0.0.0.0:1", "--print")
    assert out.returncode == 2 and "add --dashboard" in out.stderr
