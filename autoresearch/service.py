"""`autoresearch service install|uninstall|status`: the daemon as a systemd service.

One instance per workspace: ``autoresearch@NAME.service`` where NAME is the
workspace's directory name (so ``journalctl -u autoresearch@lab`` reads
naturally). ``install`` renders the packaged template
(``systemd_units/autoresearch@.service``, user variant in ``systemd_units/user/``)
into a self-contained instance unit file: absolute executable, workspace, the
workspace owner as ``User=``, the GPU, and the paths that must stay visible
under ``ProtectHome=``/``PrivateTmp=``. A file named for the instance takes
precedence over any template of the same name, so the unit needs no drop-ins.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import SystemRefusedError, UserError

TEMPLATE = "autoresearch@.service"
DASHBOARD_TEMPLATE = "autoresearch-dashboard@.service"  # `service install --dashboard`: a unit of its own
SYSTEM_TOKEN_DIR = Path("/etc/autoresearch/dashboard")  # a system dashboard's token hash (user units: ~/.local/state)
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CREDENTIAL = Path("/etc/autoresearch/anthropic_api_key")
# Roots hidden by ProtectHome=; what lives under them must be bound back in...
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
# ...and the roots that PrivateTmp= replaces.
HIDDEN_ROOTS = HOME_ROOTS + (Path("/tmp"), Path("/var/tmp"))
_SAFE_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
_BAD_PATH_CHARS = set('"\'\\$') | {chr(c) for c in range(32)} | {"\x7f"}


def template_text(user: bool, dashboard: bool = False) -> str:
    """The packaged template (the same text as systemd/ in the source tree)."""
    base = resources.files("autoresearch") / "systemd_units"
    name = DASHBOARD_TEMPLATE if dashboard else TEMPLATE
    return ((base / "user" / name) if user else (base / name)).read_text(encoding="utf-8")


def escape_instance(name: str) -> str:
    """systemd-escape for one path component: [A-Za-z0-9:_.] kept, the rest as \\xNN."""
    if not name:
        raise UserError("the service instance name is empty")
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE_NAME and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unit_name(workspace: Path, name: str | None = None, dashboard: bool = False) -> str:
    prefix = "autoresearch-dashboard" if dashboard else "autoresearch"
    return f"{prefix}@{escape_instance(name or Path(workspace).resolve().name)}.service"


def unit_dir(user: bool) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def find_executable() -> list[str]:
    """The command that starts this installation of autoresearch, as absolute argv."""
    # The console script beside the running interpreter is this very installation;
    # one found on PATH may be another.
    beside = Path(sys.executable).parent / "autoresearch"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("autoresearch")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "autoresearch"]


def _unit_path(path: Path, what: str) -> str:
    """A path as it may appear in a unit file (specifiers escaped), or a clear error."""
    text = str(path)
    bad = sorted(set(text) & _BAD_PATH_CHARS)
    if bad:
        raise UserError(f"{what} {text!r} contains {''.join(bad)!r}, which a unit file "
                        "cannot carry safely; move it to a plain path")
    return text.replace("%", "%%")


def _quoted(text: str) -> str:
    return f'"{text}"'


def _unit_arg(arg: str) -> str:
    text = _unit_path(Path(arg), "executable path")
    return _quoted(text) if " " in text else text


def _owner(workspace: Path) -> str:
    uid = workspace.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _check_workspace(workspace: Path) -> Path:
    ws = Path(workspace).expanduser().resolve()
    if not ws.is_dir():
        raise UserError(f"workspace {ws} does not exist")
    if not (ws / "autoresearch.toml").is_file():
        raise UserError(f"{ws} is not an autoresearch workspace (no autoresearch.toml); "
                        f"create one with `autoresearch init {ws}`")
    return ws


def _replace_line(lines: list[str], old: str, new: list[str]) -> None:
    hits = [i for i, line in enumerate(lines) if line == old]
    if len(hits) != 1:  # the packaged template and this renderer drifted apart
        raise RuntimeError(f"unit template: expected one line {old!r}, found {len(hits)}")
    lines[hits[0]:hits[0] + 1] = new


def render_unit(
    workspace: Path,
    *,
    user: bool,
    gpu: int | None,
    executable: Path | list[str] | None = None,
    name: str | None = None,
    dashboard: str | None = None,
    token_file: Path | None = None,
) -> tuple[str, str]:
    """Render the instance unit for ``workspace``: returns (unit name, unit file text).

    ``executable``: the autoresearch command (a path, or an argv prefix such as
    ``[python, "-m", "autoresearch"]``); default ``find_executable()``.
    ``dashboard``: render the dashboard's unit instead, listening there (HOST:PORT),
    with ``token_file`` holding its token's hash when it listens beyond loopback.
    """
    ws = _check_workspace(workspace)
    if dashboard is not None and gpu is not None:
        raise UserError("--gpu is for the daemon's unit; the dashboard uses no GPU")
    if gpu is not None and (not isinstance(gpu, int) or gpu < 0):
        raise UserError(f"--gpu must be a GPU index (0, 1, ...), not {gpu!r}")
    if executable is None:
        argv = find_executable()
    elif isinstance(executable, list):
        argv = executable
    else:
        argv = [str(Path(executable).absolute())]
    if not Path(argv[0]).is_absolute():
        raise UserError(f"the executable must be an absolute path, not {argv[0]!r}")

    ws_text = _unit_path(ws, "workspace path")
    exec_line = " ".join(_unit_arg(a) for a in argv)
    lines = template_text(user, dashboard is not None).splitlines()
    default_ws = "%h/autoresearch/%i" if user else "/var/lib/autoresearch/%i"
    if dashboard is not None:
        from .dashboard.server import parse_listen

        host, port = parse_listen(dashboard)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        extra = f" --token-file {_unit_arg(str(token_file))}" if token_file else ""
        _replace_line(lines, "ExecStart=/usr/local/bin/autoresearch dashboard ${AUTORESEARCH_WORKSPACE} "
                      "--listen 127.0.0.1:8765",
                      [f"ExecStart={exec_line} dashboard ${{AUTORESEARCH_WORKSPACE}} --listen {listen}{extra}"])
    else:
        _replace_line(lines, "ExecStart=/usr/local/bin/autoresearch run ${AUTORESEARCH_WORKSPACE}",
                      [f"ExecStart={exec_line} run ${{AUTORESEARCH_WORKSPACE}}"])
    _replace_line(lines, f"Environment=AUTORESEARCH_WORKSPACE={default_ws}",
                  [f'Environment="AUTORESEARCH_WORKSPACE={ws_text}"'])
    _replace_line(lines, f"WorkingDirectory={default_ws}", [f"WorkingDirectory={ws_text}"])
    if gpu is not None:
        _replace_line(lines, "#Environment=CUDA_VISIBLE_DEVICES=0",
                      [f"Environment=CUDA_VISIBLE_DEVICES={gpu}"])
    if not user:
        _replace_line(lines, "User=autoresearch", [f"User={_owner(ws)}"])
        protect = _protect_home(ws, argv)
        if dashboard is None:
            _replace_line(lines, f"ReadWritePaths={default_ws}",
                          [f"ReadWritePaths={_quoted(ws_text)}"])
        else:  # the dashboard only reads the workspace
            protect = [("BindReadOnlyPaths=" + p[len("BindPaths="):]) if p.startswith("BindPaths=") else p
                       for p in protect]
        _replace_line(lines, "ProtectHome=yes", protect)
    return unit_name(ws, name, dashboard is not None), "\n".join(lines) + "\n"


def _minimal(paths: set[Path]) -> list[Path]:
    """Sorted paths, without those inside another one of them."""
    return [p for p in sorted(paths) if not any(q != p and q in p.parents for q in paths)]


# Run by the interpreter the unit will run, the way the unit runs it (no PYTHONPATH, a plain
# environment, the workspace as working directory): where autoresearch and its imports live.
_PROBE = """import json, os, sys
import autoresearch
print(json.dumps({"package": os.path.dirname(os.path.abspath(autoresearch.__file__)),
                  "path": sys.path[1:], "prefixes": [sys.prefix, sys.base_prefix],
                  "executable": os.path.realpath(sys.executable)}))"""


def _interpreter(argv: list[str]) -> str:
    """The Python that ``argv`` starts: itself for ``python -m``, else a script's shebang."""
    if len(argv) > 1 and argv[1] == "-m":
        return argv[0]
    try:
        with open(argv[0], "rb") as fh:
            first = fh.readline(512)
    except OSError:
        first = b""
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    if words and "python" in Path(words[0]).name:
        return words[0]
    return sys.executable  # a wrapper script: assume this very installation


def _installation(ws: Path, argv: list[str]) -> set[Path]:
    """Every folder the unit's Python reads code from: the package (an editable install's
    source tree too), the venv, the base installation, its import path."""
    python = _interpreter(argv)
    try:
        home = pwd.getpwuid(ws.stat().st_uid).pw_dir
    except KeyError:
        home = "/"
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home}
    try:
        proc = subprocess.run([python, "-c", _PROBE], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=120)
    except OSError as exc:
        raise UserError(f"cannot run {python}, the Python of the service: {exc.strerror}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        why = (" (PYTHONPATH is set here; the service does not get it)"
               if os.environ.get("PYTHONPATH") else "")
        raise UserError(f"the service's Python {python} cannot import autoresearch on its own: "
                        f"{last}{why}; install the package into that Python (pip install -e .)")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    paths = [found["package"], *found["path"], *found["prefixes"],
             os.path.dirname(found["executable"]), os.path.dirname(argv[0])]
    out: set[Path] = set()
    for text in paths:
        if not text or not os.path.exists(text):
            continue
        # As the unit names it and where it really is: either may be the one under /tmp or /home.
        out |= {Path(os.path.abspath(text)), Path(text).resolve()}
    return out


def _protect_home(ws: Path, argv: list[str]) -> list[str]:
    """ProtectHome= and the bind mounts that bring back what the unit needs.

    ProtectHome= hides /home, /root and /run/user; PrivateTmp= gives the service
    its own /tmp and /var/tmp. The workspace, and the Python installation (a venv,
    pyenv, `pip --user`, an editable install's source tree: all often live in a
    home or under /tmp), are bound back in if they live there.
    """
    install = {p for p in _installation(ws, argv)
               if _under(p, HIDDEN_ROOTS) and not (p == ws or ws in p.parents)}
    binds = ([f"BindPaths={_quoted(_unit_path(ws, 'workspace path'))}"]
             if _under(ws, HIDDEN_ROOTS) else [])
    binds += [f"BindReadOnlyPaths={_quoted(_unit_path(p, 'installation path'))}"
              for p in _minimal(install)]
    in_home = _under(ws, HOME_ROOTS) or any(_under(p, HOME_ROOTS) for p in install)
    # tmpfs: the home directories become an empty read-only tmpfs in which only the
    # bound paths appear (more private than ProtectHome=read-only).
    return [f"ProtectHome={'tmpfs' if in_home else 'yes'}", *binds]


# -- talking to systemd -------------------------------------------------------------------


def _require_systemd(systemctl: str, check_pid1: bool) -> str:
    exe = shutil.which(systemctl)
    if exe is None:
        raise SystemRefusedError(f"{systemctl} not found: systemd is not available on this machine; "
                                 "use --print to see the unit")
    if check_pid1 and not Path("/run/systemd/system").is_dir():
        try:
            pid1 = Path("/proc/1/comm").read_text().strip()
        except OSError:
            pid1 = "unknown"
        raise SystemRefusedError(f"systemd is not running on this machine (PID 1 is {pid1}); "
                                 "use --print to see the unit")
    return exe


def _systemctl(exe: str, user: bool, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [exe, *(["--user"] if user else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SystemRefusedError(f"`{' '.join(['systemctl', *argv[1:]])}` failed: "
                                 f"{detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except PermissionError as exc:
        tmp.unlink(missing_ok=True)
        raise SystemRefusedError(f"cannot write {path}: permission denied "
                                 "(run with sudo, or install a user service with --user)") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _installed_workspace(path: Path) -> str | None:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith('Environment="AUTORESEARCH_WORKSPACE='):
                return line.split("=", 2)[2].rstrip('"').replace("%%", "%")
    except OSError:
        return None
    return None


@dataclass
class Installed:
    unit: str
    path: Path | None            # None with print_only
    text: str
    hints: list[str] = field(default_factory=list)
    token: str | None = None     # a dashboard's new access token: shown once


def install(
    workspace: Path,
    *,
    user: bool,
    gpu: int | None = None,
    print_only: bool = False,
    systemctl: str = "systemctl",
    executable: Path | list[str] | None = None,
    name: str | None = None,
    directory: Path | None = None,
    check_pid1: bool = True,
    dashboard: str | None = None,
    token_dir: Path | None = None,
) -> Installed:
    """Render the unit; unless ``print_only``, write it, daemon-reload and enable --now.

    ``dashboard`` (HOST:PORT): the dashboard's unit instead of the daemon's. Beyond loopback it
    needs a token: one is made here (unless the token file exists) and returned, to be shown once.
    """
    token_file = None
    if dashboard is not None:
        token_file = _dashboard_token_file(workspace, user, name, dashboard, token_dir)
    unit, text = render_unit(workspace, user=user, gpu=gpu, executable=executable, name=name,
                             dashboard=dashboard, token_file=token_file)
    if print_only:
        return Installed(unit, None, text)
    exe = _require_systemd(systemctl, check_pid1)
    token = None
    if token_file is not None and not token_file.exists():
        from .dashboard import auth

        token = auth.create(token_file)
        if os.geteuid() == 0:  # the service runs as the workspace's owner: let it read the hash
            ws_stat = Path(workspace).expanduser().resolve().stat()
            os.chown(token_file, ws_stat.st_uid, ws_stat.st_gid)
    path = (directory or unit_dir(user)) / unit
    ws = str(Path(workspace).expanduser().resolve())
    other = _installed_workspace(path)
    if other is not None and other != ws:
        raise UserError(f"{unit} already runs the workspace {other}; "
                        "pick another instance name with --name")
    _write_atomic(path, text)
    _systemctl(exe, user, "daemon-reload")
    _systemctl(exe, user, "enable", "--now", unit)
    return Installed(unit, path, text, [] if dashboard is not None else _hints(user), token)


def _dashboard_token_file(workspace: Path, user: bool, name: str | None, listen: str,
                          token_dir: Path | None) -> Path | None:
    """Where a dashboard unit's token hash lives, or None on loopback (no token needed)."""
    from .dashboard import auth
    from .dashboard.server import parse_listen

    if auth.is_loopback(parse_listen(listen)[0]):
        return None
    ws = Path(workspace).expanduser().resolve()
    if user and token_dir is None:
        return auth.default_token_file(ws)  # what `autoresearch dashboard` uses by hand, too
    return (token_dir or SYSTEM_TOKEN_DIR) / auth.default_token_file(ws).name  # named by a hash: a plain path


def _hints(user: bool) -> list[str]:
    if user:
        me = pwd.getpwuid(os.getuid()).pw_name
        if not Path("/var/lib/systemd/linger", me).exists():
            return [f"to keep it running after you log out and start it at boot: "
                    f"loginctl enable-linger {me}"]
        return []
    if not SYSTEM_CREDENTIAL.exists():
        return [f"no API key at {SYSTEM_CREDENTIAL} (fine for the offline proposer); "
                "see docs/SERVICE.md to add one"]
    return []


def _installed_unit(workspace: Path, user: bool, name: str | None,
                    directory: Path | None, dashboard: bool = False) -> tuple[str, Path]:
    """The workspace's unit name and file; a UserError if it is not installed."""
    unit = unit_name(Path(workspace).expanduser(), name, dashboard)
    path = (directory or unit_dir(user)) / unit
    if not path.exists():
        raise UserError(f"{unit} is not installed (no {path}); "
                        f"install it with `autoresearch service install{' --user' if user else ''}`")
    return unit, path


def uninstall(
    workspace: Path,
    *,
    user: bool,
    systemctl: str = "systemctl",
    name: str | None = None,
    directory: Path | None = None,
    check_pid1: bool = True,
    dashboard: bool = False,
) -> str:
    """disable --now, remove the unit file, daemon-reload. Returns the unit name."""
    unit, path = _installed_unit(workspace, user, name, directory, dashboard)
    exe = _require_systemd(systemctl, check_pid1)
    # Not checked: a unit that failed or was never started still has to go.
    _systemctl(exe, user, "disable", "--now", unit, check=False)
    try:
        path.unlink()
    except PermissionError as exc:
        raise SystemRefusedError(f"cannot remove {path}: permission denied (run with sudo)") from exc
    _systemctl(exe, user, "daemon-reload")
    _systemctl(exe, user, "reset-failed", unit, check=False)
    return unit


def status(
    workspace: Path,
    *,
    user: bool,
    systemctl: str = "systemctl",
    name: str | None = None,
    directory: Path | None = None,
    check_pid1: bool = True,
    dashboard: bool = False,
) -> str:
    """`systemctl status` of the workspace's unit (inactive and failed units included)."""
    unit, _path = _installed_unit(workspace, user, name, directory, dashboard)
    exe = _require_systemd(systemctl, check_pid1)
    # Exit 3 means "not running": still a status worth showing.
    proc = _systemctl(exe, user, "status", "--no-pager", "--full", unit, check=False)
    if proc.returncode not in (0, 3) and not proc.stdout.strip():
        detail = proc.stderr.strip().splitlines()
        raise SystemRefusedError(f"systemctl status {unit}: {detail[-1] if detail else proc.returncode}")
    return proc.stdout
