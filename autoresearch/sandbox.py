"""The sandbox plan of one run: which containment it gets, and the bubblewrap argv that applies it.

``sandbox.mode``:
  * ``"auto"``   -- bubblewrap where it works here, else the fallback (a private network
    namespace and rlimits, see runner.py), recorded as such with the reason;
  * ``"strict"`` -- bubblewrap or no run at all (the daemon refuses to start);
  * ``"off"``    -- none (the environment is still scrubbed).

Under bubblewrap a run gets new user, PID, mount, IPC, UTS and network namespaces
(loopback only), all capabilities dropped, no_new_privs, its own session, and
``--die-with-parent``: when the daemon dies, the namespace's init dies and the kernel
kills every process of the run, whatever it forked or setsid'ed. Its file system:

  * ``/`` read-only; ``/dev`` minimal plus the GPU nodes; a fresh ``/proc`` (only the run's
    own processes: not the daemon's environ); private ``/tmp``, ``/dev/shm``;
  * hidden (empty tmpfs): ``/home``, ``/root``, ``/run`` (systemd credentials, sockets),
    ``/var/tmp``, the credential stores under ``/etc``, the whole workspace (the human's
    files, ``.git``, ``.autoresearch/``) and ``$HOME`` (empty and writable);
  * read-only again inside the hidden trees: the Python installation, the autoresearch
    package, the import path, the data cache and ``sandbox.read_only`` paths;
  * concealed (empty, read-only) inside what is visible: ``Layout.conceal`` (the training
    run's view of the validation split and the downloaded corpora);
  * writable: only the run's own checkout (its ``.git`` link hidden) and the temp dirs; the
    evaluation step gets the checkout read-only (``Layout.writable`` False).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("auto", "strict", "off")

# Hidden whole (when they exist). /run holds $CREDENTIALS_DIRECTORY and the daemon-side sockets.
HIDDEN_DIRS = ("/home", "/root", "/run", "/var/tmp", "/etc/autoresearch", "/etc/credstore",
               "/etc/credstore.encrypted", "/etc/ssh", "/etc/ssl/private", "/var/lib/systemd")
HIDDEN_FILES = ("/etc/shadow", "/etc/gshadow")
GPU_NODES = ("/dev/nvidia*", "/dev/dri", "/dev/kfd")


@dataclass(frozen=True)
class Layout:
    """What the run may see, in host paths."""

    checkout: Path  # the run's own checkout: writable, its cwd
    hide: tuple[Path, ...] = ()  # the workspace and its git dir: not visible at all
    read_only: tuple[Path, ...] = ()  # data cache, extra paths: visible, read-only
    home: str = "/tmp/home"  # $HOME inside: an empty tmpfs
    conceal: tuple[Path, ...] = ()  # directories inside the visible ones shown empty (the validation split)
    writable: bool = True  # False: the checkout is read-only too (the evaluation step)


@dataclass(frozen=True)
class Plan:
    kind: str  # "bwrap" | "fallback" | "off"
    why: str = ""  # why not bwrap
    prefix: list[str] = field(default_factory=list)  # argv before the command (bwrap plan only)


_probe_lock = threading.Lock()
_probe: tuple[str | None, str] | None = None


def bwrap_usable() -> tuple[str | None, str]:
    """(path of bwrap, "") where it can create its namespaces here, else (None, why). Probed once."""
    global _probe
    with _probe_lock:
        if _probe is None:
            _probe = _probe_bwrap()
        return _probe


def _probe_bwrap() -> tuple[str | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"bubblewrap needs Linux (this is {sys.platform})"
    path = shutil.which("bwrap")
    if not path:
        return None, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    argv = [path, *_NAMESPACES, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "true"]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"bwrap cannot start: {exc}"
    if out.returncode != 0:
        detail = out.stderr.decode("utf-8", "replace").strip().splitlines()
        return None, f"bwrap cannot create its namespaces here: {detail[-1] if detail else out.returncode}"
    return path, ""


_NAMESPACES = ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
               "--cap-drop", "ALL")


_STRENGTH = {"strict": 2, "auto": 1, "off": 0}


def weakening(old, new) -> list[str]:
    """How config ``new`` contains runs less than ``old`` (two [sandbox] tables): "key: old -> new"."""
    def limit(value: int) -> float:  # 0 means the largest (90 % of RAM, unlimited)
        return value or float("inf")

    out = []
    if _STRENGTH.get(new.mode, 0) < _STRENGTH.get(old.mode, 0):
        out.append(f"sandbox.mode: {old.mode} -> {new.mode}")
    for key in ("memory_mb", "max_processes", "max_file_mb"):
        if limit(getattr(new, key)) > limit(getattr(old, key)):
            out.append(f"sandbox.{key}: {getattr(old, key)} -> {getattr(new, key)}")
    added = sorted(set(new.read_only) - set(old.read_only))
    if added:
        out.append(f"sandbox.read_only: + {', '.join(added)}")
    return out


def expected(mode: str) -> tuple[str, str]:
    """(kind, why not bwrap) a run gets in ``mode`` here: "bwrap" | "fallback" | "off"."""
    if mode == "off":
        return "off", "sandbox.mode = off"
    path, why = bwrap_usable()
    return ("bwrap", "") if path else ("fallback", why)


def plan(mode: str, layout: Layout | None) -> Plan:
    """The containment this run gets. ``layout`` None: the caller has no checkout to offer (bwrap off)."""
    if mode == "off":
        return Plan("off", "sandbox.mode = off")
    path, why = bwrap_usable()
    if path is None or layout is None:
        return Plan("fallback", why or "no run checkout")
    return Plan("bwrap", "", bwrap_argv(path, layout))


def _python_paths() -> list[Path]:
    """The interpreter, its installation and everything on the import path (read-only inside)."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
             Path(os.path.realpath(sys.executable)).parent,
             Path(__file__).resolve().parent.parent}  # the autoresearch package's parent dir
    for entry in sys.path + os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isabs(entry):
            paths.add(Path(entry))
    return [p for p in paths if os.path.exists(p)]


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def bwrap_argv(bwrap: str, layout: Layout) -> list[str]:
    """The bubblewrap argv prefix. Mount order matters: hide (tmpfs) first, then re-expose
    read-only, then the writable checkout, then hide its .git link."""
    checkout = layout.checkout.resolve()
    secret = [p.resolve() for p in layout.hide if os.path.exists(p)]
    home = Path(layout.home)
    if str(home) in ("/", "") or not home.is_absolute() or any(_inside(checkout, p) for p in (home,)):
        home = Path("/tmp/home")
    # $HOME gets its own writable tmpfs below: not also a read-only hidden one.
    hidden = [p for p in [Path(p) for p in HIDDEN_DIRS if os.path.isdir(p)] + secret if p != home]
    argv = [bwrap, *_NAMESPACES, "--ro-bind", "/", "/", "--dev", "/dev", "--tmpfs", "/dev/shm"]
    for pattern in GPU_NODES:
        for node in sorted(glob.glob(pattern)):
            argv += ["--dev-bind-try", node, node]
    argv += ["--proc", "/proc", "--tmpfs", "/tmp"]
    for path in hidden:
        argv += ["--tmpfs", str(path)]
    for path in HIDDEN_FILES:
        if os.path.isfile(path):
            argv += ["--ro-bind", "/dev/null", path]
    argv += ["--tmpfs", str(home)]
    # Re-expose read-only what a run needs from inside the hidden trees (and the private /tmp),
    # but nothing of the workspace's hidden part (.git, .autoresearch/, the human's files).
    masked = hidden + [Path("/tmp"), home]
    for path in sorted({Path(os.path.realpath(p)) for p in (*_python_paths(), *layout.read_only)}):
        if not os.path.exists(path) or any(_inside(s, path) or _inside(path, s) for s in secret):
            continue
        if any(_inside(path, m) for m in masked):
            argv += ["--ro-bind", str(path), str(path)]
    for path in sorted({Path(os.path.realpath(p)) for p in layout.conceal if os.path.isdir(p)}):
        argv += ["--tmpfs", str(path), "--remount-ro", str(path)]
    argv += ["--bind" if layout.writable else "--ro-bind", str(checkout), str(checkout)]
    if os.path.lexists(checkout / ".git"):
        argv += ["--ro-bind", "/dev/null", str(checkout / ".git")]
    for path in hidden:  # empty and read-only (after the mounts made inside them above)
        if path != home:  # $HOME=/root (root's daemon): the run's writable home is that tmpfs
            argv += ["--remount-ro", str(path)]
    argv += ["--chdir", str(checkout), "--setenv", "HOME", str(home)]
    # Compile caches in the run's own $HOME: nothing a run writes reaches a later run (a
    # poisoned kernel cache could skew its metric), at the price of compiling afresh each run.
    for name, sub in (("XDG_CACHE_HOME", ".cache"), ("TRITON_CACHE_DIR", ".cache/triton"),
                      ("TORCHINDUCTOR_CACHE_DIR", ".cache/inductor"), ("MPLCONFIGDIR", ".config/matplotlib")):
        argv += ["--setenv", name, str(home / sub)]
    return argv + ["--"]
