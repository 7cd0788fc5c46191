"""The workspace: a git repository the daemon owns (GitPython).

Rollback is structural: the best commit is ``refs/autoresearch/best`` and every
experiment's commit stays reachable as ``refs/autoresearch/exp/<N>``.
Refs are read and written through GitPython's pure-Python ref code (no
subprocess); worktree operations (commit/status/reset/clean/diff) use
``repo.git``, one git subprocess each, which keeps an experiment's git
overhead to a few tens of milliseconds. With several experiments in flight,
commits are made with git's plumbing in a temporary index (``commit_files``,
``merge_files``, ``move_branch``): no worktree is involved, so the human's
worktree stays at the best while runs happen in the slots' checkouts.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Sequence

import git
from git import Reference, Repo

from . import gitsafe
from .config import HUMAN_FILES, never_editable
from .errors import ConfigError, WorkspaceError

STATE_DIR = ".autoresearch"
BEST_REF = "refs/autoresearch/best"
EXP_PREFIX = "refs/autoresearch/exp"
REJECTED_PREFIX = "refs/autoresearch/rejected"  # commits an agent made itself (rejected, kept reachable)
# The event log's head (seq, hash) at every experiment's outcome, as a chain of commits
# outside SQLite: a log cut short or restored from an old copy cannot pass for whole.
ANCHOR_REF = "refs/autoresearch/log"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's well-known empty tree
BRANCH_PREFIX = "autoresearch/"

# Read once at import (os.umask can only be read by setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Scratch directories in the state dir (commit_files' temporary index, merge_files' files):
# removed after each use, and at boot when a kill left one (clear_stale_locks).
_SCRATCH = ("index-", "merge-")

_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _git_errors(fn):
    """A failed git command becomes a one-line WorkspaceError (disk full, a foreign lock, ...)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except BrokenPipeError:
                # GitPython's persistent `git cat-file` helpers share the daemon's process group, so
                # a Ctrl-C on the terminal kills them too: start fresh ones and try once more.
                if not (args and isinstance(args[0], Workspace)):
                    raise
                args[0].repo.git.clear_cache()
                return fn(*args, **kwargs)
        except git.GitCommandError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().replace("\n", " ")
            detail = detail.removeprefix("stderr: ").strip("'")
            cmd = " ".join(str(a) for a in exc.command[:2]) if isinstance(exc.command, list) else "git"
            raise WorkspaceError(f"{cmd} failed (exit {exc.status}): {detail}"[:500]) from None

    return wrapper


@dataclass(frozen=True)
class Changes:
    """Worktree vs HEAD (untracked, non-ignored files count as added)."""

    modified: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    head_moved: bool = False  # commits were made on top of the expected base

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted({*self.modified, *self.added, *self.deleted}))

    def __bool__(self) -> bool:
        return bool(self.modified or self.added or self.deleted or self.head_moved)


@dataclass(frozen=True, order=True)
class Violation:
    """One way a proposal left its scope. ``str()`` is the text recorded in a rejection's reason
    (unchanged since it was the only form: recorded reasons stay byte-identical)."""

    kind: str  # "modified", "added", "deleted", "deleted editable file" or "HEAD moved"
    path: str = ""  # "" for "HEAD moved"

    def __str__(self) -> str:
        if self.kind == "HEAD moved":
            return "HEAD moved: the proposal made its own commits"
        where = " (state directory)" if self.path.split("/")[0] == STATE_DIR else ""
        return f"{self.kind}{where}: {self.path}"


@dataclass
class Workspace:
    root: Path
    repo: Repo
    editable: tuple[str, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ open/create
    @classmethod
    @_git_errors
    def create(
        cls,
        root: Path | str,
        files: Mapping[str, str],
        tag: str,
        config_text: str | None = None,
        editable: tuple[str, ...] | None = None,
    ) -> "Workspace":
        """Create a new workspace at ``root`` (must not exist or be empty).

        Writes ``files`` (+ ``autoresearch.toml`` = ``config_text`` when given)
        and ``.gitignore``, commits them on branch ``autoresearch/<tag>`` and
        points ``refs/autoresearch/best`` at that commit. ``editable``
        defaults to every file except program.md / autoresearch.toml.
        On failure nothing is left behind.
        """
        root = Path(root)
        if not _TAG_RE.match(tag) or ".." in tag or tag.endswith(".lock"):
            raise WorkspaceError(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-'")
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"{root} is a file, not a directory; name a new or empty directory")
        if root.exists() and any(root.iterdir()):
            raise WorkspaceError(f"{root} already exists and is not empty")
        all_files = dict(files)
        if config_text is not None:
            all_files["autoresearch.toml"] = config_text
        for rel in all_files:
            _check_relpath(rel, WorkspaceError)
        if editable is None:
            editable = tuple(p for p in files if p not in HUMAN_FILES and p != ".gitignore")
        _check_editable(tuple(editable))
        gitignore = all_files.get(".gitignore", "")
        if STATE_DIR + "/" not in gitignore.splitlines():
            gitignore += ("\n" if gitignore and not gitignore.endswith("\n") else "") + STATE_DIR + "/\n"
        all_files[".gitignore"] = gitignore
        existed = root.exists()
        root.mkdir(parents=True, exist_ok=True)
        repo = None
        try:
            repo = Repo.init(root)
            repo.git.update_environment(**gitsafe.env(root))
            # Name the branch before the first commit so no master/main is left behind.
            repo.git.symbolic_ref("HEAD", f"refs/heads/{BRANCH_PREFIX}{tag}")
            for rel, text in all_files.items():
                _atomic_write(root / rel, text)
            repo.git.add("-A", "--", *all_files)
            repo.git.commit("-q", "--no-verify", "-m", f"autoresearch: initial workspace ({tag})")
            ws = cls(root=root.resolve(), repo=repo, editable=tuple(editable))
            ws.set_best(ws.head())
        except BaseException:
            # Leave nothing half-made: the directory was empty or absent before.
            if repo is not None:
                repo.close()
            if existed:
                for child in root.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            else:
                shutil.rmtree(root, ignore_errors=True)
            raise
        return ws

    @classmethod
    @_git_errors
    def open(cls, root: Path | str, editable: Iterable[str] = ()) -> "Workspace":
        """Open an existing workspace: the top level of a non-bare repo with commits, on a branch.

        Raises WorkspaceError (unusable repo) or ConfigError (bad editable list).
        Makes sure `.autoresearch/` is ignored, via .git/info/exclude when the
        repo's own ignore files do not say so (the user's tracked files are never changed).
        """
        root = Path(root)
        if not root.is_dir():
            raise WorkspaceError(f"{root}: no such directory")
        try:
            repo = Repo(root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise WorkspaceError(_not_a_repo(root)) from None
        try:
            if repo.bare:
                raise WorkspaceError(f"{root} is a bare git repository; a workspace needs a worktree")
            if not repo.head.is_valid():
                raise WorkspaceError(f"{root}: the repository has no commits yet; commit your files first")
            if repo.head.is_detached:
                raise WorkspaceError(f"{root}: HEAD is detached; check out a branch first")
            repo.git.update_environment(**gitsafe.env(root))
            ws = cls(root=Path(repo.working_tree_dir).resolve(), repo=repo, editable=tuple(editable))
            _check_editable(ws.editable)
            ws._ensure_state_dir_ignored()
            if ws._git.ls_files("--", STATE_DIR):
                raise WorkspaceError(
                    f"files under {STATE_DIR}/ are tracked by git; untrack them: "
                    f"git rm -r --cached {STATE_DIR}"
                )
            head_tree = repo.head.commit.tree
            for rel in ws.editable:
                try:
                    head_tree / rel
                except KeyError:
                    raise WorkspaceError(f"editable file {rel} is not committed in {root}") from None
        except BaseException:
            repo.close()
            raise
        return ws

    @property
    def _git(self):
        """GitPython's git command runner, its environment refreshed from the current config
        (which may have changed since the last call): it runs no configured program."""
        self.repo.git.update_environment(**gitsafe.env(self.root))
        return self.repo.git

    def close(self) -> None:
        """Stop GitPython's persistent cat-file helpers."""
        self.repo.close()

    def _ensure_state_dir_ignored(self) -> None:
        # Exit status 0 = ignored already (by .gitignore, info/exclude or a global excludesFile).
        status, _, _ = self._git.check_ignore("-q", STATE_DIR + "/", with_extended_output=True,
                                                   with_exceptions=False)
        if status == 0:
            return
        exclude = Path(self.repo.common_dir) / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        old = exclude.read_text() if exclude.exists() else ""
        sep = "" if not old or old.endswith("\n") else "\n"
        _atomic_write(exclude, f"{old}{sep}{STATE_DIR}/\n")

    # ------------------------------------------------------------------ refs
    @property
    def state_dir(self) -> Path:
        path = self.root / STATE_DIR
        path.mkdir(exist_ok=True)
        return path

    @property
    def branch(self) -> str | None:
        head = self.repo.head
        return None if head.is_detached else head.reference.name

    def head(self) -> str:
        return self.repo.head.commit.hexsha

    def _get_ref(self, path: str) -> str | None:
        ref = Reference(self.repo, path, check_path=False)
        try:
            return ref.commit.hexsha
        except ValueError:  # no such ref
            return None

    def _set_ref(self, path: str, sha: str) -> None:
        Reference.create(self.repo, path, sha, force=True)

    def best(self) -> str | None:
        return self._get_ref(BEST_REF)

    def set_best(self, sha: str) -> None:
        self._set_ref(BEST_REF, sha)

    def exp_ref(self, n: int) -> str | None:
        return self._get_ref(f"{EXP_PREFIX}/{int(n)}")

    def set_exp_ref(self, n: int, sha: str) -> None:
        """Point refs/autoresearch/exp/N at ``sha``; an existing ref is never moved."""
        old = self.exp_ref(n)
        if old is not None and old != sha:
            raise WorkspaceError(f"{EXP_PREFIX}/{int(n)} already points at {old[:12]} (not {sha[:12]}): "
                                 "experiment refs are never moved")
        if old is None:
            self._set_ref(f"{EXP_PREFIX}/{int(n)}", sha)

    @_git_errors
    def anchor(self, seq: int, digest: str, experiment: int | None) -> str:
        """Record the log's head in git: a commit (empty tree) on ANCHOR_REF, parent = the previous anchor.

        ``experiment``: the highest experiment number the log knows (numbers below it are taken).
        """
        parent = self._get_ref(ANCHOR_REF)
        message = (f"autoresearch log anchor: event {seq}\n\nseq: {seq}\nhash: {digest}\n"
                   f"experiment: {'' if experiment is None else experiment}\n")
        args = [EMPTY_TREE, "-m", message] + (["-p", parent] if parent else [])
        sha = self._git.commit_tree(*args)
        self._set_ref(ANCHOR_REF, sha)
        return sha

    @_git_errors
    def anchors(self) -> list[tuple[int, str, int | None]]:
        """(seq, hash, experiment) of every anchor, newest first; [] when none."""
        if self._get_ref(ANCHOR_REF) is None:
            return []
        out = []
        for body in self._git.log("--first-parent", "--format=%B%x00", ANCHOR_REF).split("\0"):
            fields = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
            if fields.get("seq", "").isdigit() and fields.get("hash"):
                exp = fields.get("experiment", "")
                out.append((int(fields["seq"]), fields["hash"].strip(), int(exp) if exp.isdigit() else None))
        return out

    def set_rejected_ref(self, n: int, sha: str) -> None:
        self._set_ref(f"{REJECTED_PREFIX}/{int(n)}", sha)

    def rejected_ref(self, n: int) -> str | None:
        return self._get_ref(f"{REJECTED_PREFIX}/{int(n)}")

    def all_exp_refs(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for ref in Reference.iter_items(self.repo, common_path=EXP_PREFIX):
            name = ref.path.rsplit("/", 1)[-1]
            if name.isdigit():
                out[int(name)] = ref.commit.hexsha
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ worktree state
    def _status(self) -> list[tuple[str, str]]:
        return parse_status(self._git.status(*STATUS_FLAGS, strip_newline_in_stdout=False))

    @_git_errors
    def user_changes(self) -> list[str]:
        """Uncommitted changes (tracked edits, staged, deletions, untracked files): "XY path"."""
        return [f"{xy.strip() or '?'} {path}" for xy, path in self._status()]

    @_git_errors
    def changes(self, base: str | None = None) -> Changes:
        """Worktree vs HEAD, untracked files included.

        With ``base``, commits made on top of ``base`` (e.g. by an agent that
        ran `git commit` itself) are included too and ``head_moved`` is set.
        """
        modified: set[str] = set()
        added: set[str] = set()
        deleted: set[str] = set()
        for xy, path in self._status():
            if xy == "??" or "A" in xy:
                added.add(path)
            elif "D" in xy:
                deleted.add(path)
            else:
                modified.add(path)
        head_moved = base is not None and base != self.head()
        if head_moved:
            raw = self._git.diff(*gitsafe.DIFF_FLAGS, "--name-status", "--no-renames", "-z", base, "HEAD")
            parts = raw.split("\0")
            for status, path in zip(parts[::2], parts[1::2]):
                {"A": added, "D": deleted}.get(status[:1], modified).add(path)
        return Changes(tuple(sorted(modified - added - deleted)), tuple(sorted(added - deleted)),
                       tuple(sorted(deleted - added)), head_moved)

    @_git_errors
    def changed_paths(self, a: str, b: str) -> list[str]:
        """Paths that differ between commits a and b (added, deleted or modified)."""
        raw = self.repo.git.diff("--name-only", "--no-renames", "-z", a, b)
        return [p for p in raw.split("\0") if p]

    def scope_violations(self, changes: Changes) -> list[Violation]:
        """Every way ``changes`` leave the scope; empty = within scope.

        Anything but an edit of an editable file is a violation: new files,
        deletions (of editable files too), program.md, the config, .gitignore,
        anything under .autoresearch/, commits made by the proposal itself.
        """
        editable = set(self.editable)
        out = [Violation("HEAD moved")] if changes.head_moved else []
        for kind, paths in (("modified", changes.modified), ("added", changes.added),
                            ("deleted", changes.deleted)):
            for path in paths:
                if path not in editable:  # the state directory is never editable
                    out.append(Violation(kind, path))
                elif kind == "deleted":
                    out.append(Violation("deleted editable file", path))
        return out

    # ------------------------------------------------------------------ files
    def read_files(self) -> dict[str, str]:
        """The editable files' worktree content (exact text: newlines are not translated)."""
        out = {}
        for rel in self.editable:
            try:
                with open(self.root / rel, encoding="utf-8", newline="") as f:
                    out[rel] = f.read()
            except FileNotFoundError:
                raise WorkspaceError(f"editable file {rel} is missing from the workspace") from None
        return out

    def write_files(self, files: Mapping[str, str]) -> None:
        """Write editable files, each atomically (temp file + rename); ValueError for others."""
        bad = [p for p in files if p not in self.editable]
        if bad:
            raise ValueError(f"not editable: {', '.join(sorted(bad))}")
        for rel, text in files.items():
            _atomic_write(self.root / rel, text, tmp_dir=self.state_dir)

    def file_hash(self, path: str) -> str:
        """SHA-256 of the worktree file (recorded at commit, checked before launch)."""
        h = hashlib.sha256()
        with open(self.root / path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def blob_at(self, sha: str, path: str) -> bytes | None:
        """The bytes of ``path`` in commit ``sha``; None when absent."""
        try:
            return (self.repo.commit(sha).tree / path).data_stream.read()
        except KeyError:
            return None

    def files_at(self, sha: str, paths: Iterable[str] | None = None) -> dict[str, str]:
        """Content of ``paths`` (default: the editable files) in commit ``sha``; absent ones omitted."""
        tree = self.repo.commit(sha).tree
        out = {}
        for rel in paths if paths is not None else self.editable:
            try:
                out[rel] = (tree / rel).data_stream.read().decode("utf-8")
            except KeyError:
                continue
        return out

    def blob_ids(self, sha: str, paths: Iterable[str]) -> tuple[str | None, ...]:
        """The git blob id of each path in commit ``sha`` (None when absent): identical ids,
        identical content (compare with blob_sha of a proposal's text)."""
        tree = self.repo.commit(sha).tree
        out = []
        for rel in paths:
            try:
                out.append((tree / rel).hexsha)
            except KeyError:
                out.append(None)
        return tuple(out)

    def commit_matches(self, sha: str, files: Mapping[str, str], parent: str | None = None,
                       parents: Sequence[str] = ()) -> bool:
        """True if commit ``sha`` holds exactly ``files`` (and has ``parent``, then ``parents``
        (a merge's, as for commit_files), if given).

        Compares git blob ids computed locally, so no content is read back.
        Used to reconcile a commit made just before the daemon died (its event
        never written): is HEAD / exp ref N already the recorded proposal?
        """
        try:
            commit = self.repo.commit(sha)
            if parent is not None and [p.hexsha for p in commit.parents] != [parent, *parents]:
                return False
            tree = commit.tree
        except (ValueError, git.BadName):  # no such commit
            return False
        for rel, text in files.items():
            try:
                blob = tree / rel
            except KeyError:
                return False
            if blob.hexsha != blob_sha(text):
                return False
        return True

    # ------------------------------------------------------------------ history-changing
    @_git_errors
    def commit(self, message: str) -> str:
        """Commit only the editable files' current content on top of HEAD; returns the sha."""
        # With a pathspec git commits exactly those paths' worktree content (--only, the
        # default), whatever else is staged; no separate `git add` needed (the editable
        # files are tracked: open() checks they are committed).
        self._git.commit("-q", "--no-verify", "--allow-empty", "-m", message, "--", *self.editable)
        return self.head()

    def commit_files(self, files: Mapping[str, str], parent: str, message: str,
                     parents: Sequence[str] = ()) -> str:
        """A commit whose tree is ``parent``'s with ``files`` (editable paths -> exact text)
        replaced, made with git's plumbing in a temporary index: HEAD, the branch, the index and
        every worktree stay as they are, so experiments are committed while others run and the
        human's worktree stays at the best. ``parents``: more parents after ``parent`` (a merge).
        Returns the new commit's sha; nothing points at it until the caller sets a ref.
        """
        bad = sorted(p for p in files if p not in self.editable)
        if bad:
            raise ValueError(f"not editable: {', '.join(bad)}")
        tree = self._commit(parent).tree
        index_dir = Path(tempfile.mkdtemp(dir=self.state_dir, prefix=_SCRATCH[0]))  # removed below
        plumb = {"GIT_INDEX_FILE": str(index_dir / "index")}
        try:
            self._plumbing(["read-tree", parent], plumb)
            entries = []
            for rel, text in sorted(files.items()):
                # --no-filters: the exact bytes (no CRLF conversion, no configured clean filter).
                blob = self._plumbing(["hash-object", "-w", "--no-filters", "--stdin"], plumb,
                                      text.encode("utf-8"))
                try:
                    mode = (tree / rel).mode
                except KeyError:
                    mode = 0
                mode = mode if mode in (0o100644, 0o100755) else 0o100644  # keep an executable bit
                entries.append(f"{mode:o} {blob}\t{rel}\n")
            if entries:
                self._plumbing(["update-index", "--index-info"], plumb, "".join(entries).encode("utf-8"))
            new_tree = self._plumbing(["write-tree"], plumb)
            args = ["commit-tree", new_tree, "-p", parent]
            for other in parents:
                args += ["-p", other]
            return self._plumbing(args + ["-m", message], plumb)
        finally:
            shutil.rmtree(index_dir, ignore_errors=True)

    def merge_files(self, base: str, ours: str, theirs: str, paths: Iterable[str]) -> dict[str, str] | None:
        """Three-way merge of ``paths``' text from commits ``base``, ``ours`` and ``theirs``:
        {path: merged text}, or None on any conflict (edits that overlap, a file deleted on
        one side and changed on the other). Reads git objects only; writes nothing."""
        paths = list(paths)
        b, o, t = (self.files_at(self._commit(sha).hexsha, paths) for sha in (base, ours, theirs))
        merged: dict[str, str] = {}
        scratch = None
        try:
            for rel in paths:
                mb, mo, mt = b.get(rel), o.get(rel), t.get(rel)
                if mo == mt or mt == mb:
                    result = mo  # both sides agree, or theirs did not change it
                elif mo == mb:
                    result = mt  # only theirs changed it
                elif None in (mb, mo, mt):
                    return None  # added on both sides differently, or deleted on one, changed on the other
                else:
                    if scratch is None:
                        scratch = Path(tempfile.mkdtemp(dir=self.state_dir, prefix=_SCRATCH[1]))
                    names = []
                    for label, text in (("ours", mo), ("base", mb), ("theirs", mt)):
                        (scratch / label).write_bytes(text.encode("utf-8"))
                        names.append(str(scratch / label))
                    out = gitsafe.run(["merge-file", "-p", "-q", *names], self.root, capture_output=True,
                                      timeout=120)
                    if out.returncode == 0:
                        result = out.stdout.decode("utf-8")
                    else:  # > 0: that many conflicts; < 0: git failed
                        result = _merge_lines(mb, mo, mt)
                        if result is None:
                            return None
                if result is not None:
                    merged[rel] = result
            return merged
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def move_branch(self, sha: str) -> None:
        """Point the workspace's branch at ``sha`` (a ref update, with a reflog entry; not a
        worktree operation: the human's worktree is reset to it separately)."""
        branch = self.branch
        if branch is None:
            raise WorkspaceError(f"{self.root}: HEAD is detached; no branch to move")
        self._plumbing(["update-ref", "-m", f"autoresearch: best is {sha[:12]}", f"refs/heads/{branch}",
                        self._commit(sha).hexsha], {})

    def _commit(self, sha: str):
        """The commit ``sha`` names, read (GitPython reads objects lazily: a missing one fails here)."""
        try:
            commit = self.repo.commit(sha)
            commit.tree
            return commit
        except (ValueError, git.ODBError):
            raise WorkspaceError(f"{sha!r} is not a commit of {self.root}") from None

    def _plumbing(self, args: list[str], extra_env: Mapping[str, str], stdin: bytes | None = None) -> str:
        """One git plumbing command in the workspace (safe environment): its stripped stdout."""
        out = gitsafe.run(args, self.root, extra_env=extra_env, input=stdin, capture_output=True, timeout=120)
        if out.returncode != 0:
            detail = out.stderr.decode("utf-8", "replace").strip().replace("\n", " ")
            raise WorkspaceError(f"git {args[0]} failed (exit {out.returncode}): {detail}"[:500])
        return out.stdout.decode("utf-8").strip()

    @_git_errors
    def checkout_branch(self, branch: str) -> None:
        """Put HEAD back on ``branch`` (e.g. after an agent switched branches or detached HEAD);
        the worktree is reset right after, so local changes are discarded here."""
        self.repo.git.checkout("-q", "-f", branch.removeprefix("refs/heads/"), "--")

    @_git_errors
    def reset_hard(self, sha: str) -> None:
        """Branch + index + worktree to ``sha``; remove untracked, non-ignored files.

        `git clean` without -x never touches ignored paths, so .autoresearch/ survives.
        """
        self._git.reset("-q", "--hard", sha)
        self._git.clean("-q", "-f", "-d")

    def run_checkout(self, slot: int, sha: str, extra: Mapping[str, bytes] = {}) -> Path:
        """The run's own checkout for ``slot``: ``.autoresearch/slots/<slot>``, a detached git
        worktree at ``sha`` with nothing else in it (a previous run's outputs, ignored files
        included, are gone), plus ``extra`` files (the human's current config) written in.

        A checkout that is not a worktree of this repository any more (a run replaced its
        ``.git`` link, made files undeletable, ...) is removed and made again.
        """
        path = self.state_dir / "slots" / str(int(slot))
        admin = Path(self.repo.common_dir).resolve() / "worktrees"
        link = path / ".git"
        try:
            ours = link.is_file() and not link.is_symlink() and \
                Path(link.read_text().removeprefix("gitdir:").strip()).resolve().parent == admin
        except OSError:
            ours = False
        if ours:
            ok = (self._git_in(path, "reset", "-q", "--hard", sha) and
                  self._git_in(path, "clean", "-q", "-f", "-f", "-d", "-x"))
        else:
            ok = False
        if not ok:
            _remove_tree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._git_or_raise(self.root, "worktree", "prune")
            self._git_or_raise(self.root, "worktree", "add", "--detach", "--force", "-q", str(path), sha)
        for rel, data in extra.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data)
        return path

    def _git_in(self, cwd: Path, *args: str) -> bool:
        return gitsafe.run(list(args), cwd, capture_output=True, timeout=120).returncode == 0

    def _git_or_raise(self, cwd: Path, *args: str) -> None:
        out = gitsafe.run(list(args), cwd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().replace("\n", " ")
            raise WorkspaceError(f"git {args[0]} failed (exit {out.returncode}): {detail}"[:500])

    @_git_errors
    def numstat(self, a: str, b: str) -> tuple[int, int]:
        """(lines added, lines removed) from commit a to commit b (binary files count 0)."""
        added = removed = 0
        for line in self._git.diff(*gitsafe.DIFF_FLAGS, "--numstat", a, b).splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
                added += int(parts[0])
                removed += int(parts[1])
        return added, removed

    @_git_errors
    def diff(self, a: str, b: str) -> str:
        """Unified diff from commit a to commit b."""
        return self._git.diff(*gitsafe.DIFF_FLAGS, a, b, strip_newline_in_stdout=False)

    def clear_stale_locks(self) -> list[str]:
        """Remove git lock files left by a killed process; returns the removed paths.

        Covers every lock git takes: ``index.lock``, ``next-index-*.lock`` (a pathspec
        commit's temporary index), ``HEAD.lock`` and friends, ref and reflog locks, and a
        linked worktree's; and the scratch directories (a temporary index, a merge's files)
        of a ``commit_files`` or ``merge_files`` that was killed. Only call while holding the
        workspace lock: then no live git process of ours can own them.
        """
        removed = []
        for prefix in _SCRATCH:
            for path in sorted(self.state_dir.glob(prefix + "*")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path))
        gitdir = Path(self.repo.git_dir)
        common = Path(self.repo.common_dir)
        candidates = set(gitdir.glob("*.lock")) | set(common.glob("*.lock"))
        for sub in ("refs", "logs", "worktrees"):
            if (common / sub).is_dir():
                candidates.update((common / sub).rglob("*.lock"))
        for path in sorted(candidates):
            try:
                path.unlink()
                removed.append(str(path))
            except (FileNotFoundError, IsADirectoryError):
                pass
        return removed


# ---------------------------------------------------------------------- helpers
def _not_a_repo(root: Path) -> str:
    """Why `root` cannot be opened as a repository, and what to do (`init` refuses a used directory)."""
    try:
        outer = Repo(root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return (f"{root} is not a git repository; make it one: cd {shlex.quote(str(root))} && git init && git add -A && "
                "git commit -m start (`autoresearch init` only creates new workspaces)")
    top = outer.working_tree_dir
    outer.close()
    return (f"{root} is inside the git repository {top}, not its top level; a workspace is the top "
            "level of a repository of its own")


def _merge_lines(base: str, ours: str, theirs: str) -> str | None:
    """Line by line, when no side added or removed lines: each line from the side that changed
    it. git merge-file calls edits of adjacent lines a conflict (one hunk); two tuned constants on
    neighbouring lines (what the offline search does) are not. None when a line differs on both."""
    b, o, t = (x.splitlines(keepends=True) for x in (base, ours, theirs))
    if not len(b) == len(o) == len(t):
        return None
    out = []
    for lb, lo, lt in zip(b, o, t):
        if lo == lt or lt == lb:
            out.append(lo)
        elif lo == lb:
            out.append(lt)
        else:
            return None
    return "".join(out)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 the log records of a file's content (program.md, the config, proposals' files)."""
    return hashlib.sha256(data).hexdigest()


def blob_sha(text: str) -> str:
    """The git blob id of ``text`` encoded as UTF-8 (what `git hash-object` prints)."""
    data = text.encode("utf-8")
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _remove_tree(path: Path) -> None:
    """rm -rf, also of what a run made unwritable (it owns the files, so it may chmod them back)."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    def fix(func, name, _exc):
        os.chmod(os.path.dirname(name), 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o700)
        func(name)

    for parent, dirs, _files in os.walk(path):
        for d in dirs:
            full = os.path.join(parent, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    os.chmod(path, 0o700)
    shutil.rmtree(path, onerror=fix)


# Every `git status` the project reads: machine-readable, NUL-separated (any byte in a name),
# each untracked file listed (not its directory), submodules' changes included.
STATUS_FLAGS = ("--porcelain=v1", "-z", "--untracked-files=all", "--ignore-submodules=none")


def parse_status(raw: str) -> list[tuple[str, str]]:
    """(XY, path) per entry of ``git status <STATUS_FLAGS>`` output; a rename becomes a deletion of its
    source ("D ") and an addition of its target ("A "), a copy the addition of its target."""
    items = raw.split("\0")
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        entry = items[i]
        i += 1
        if len(entry) < 4:
            continue
        xy, path = entry[:2], entry[3:]
        if "R" in xy or "C" in xy:  # the source path follows as its own field
            source = items[i] if i < len(items) else ""
            i += 1
            if "R" in xy and source:
                out.append(("D ", source))
            out.append(("A ", path))
        else:
            out.append((xy, path))
    return out


def _check_editable(editable: tuple[str, ...]) -> None:
    if not editable:
        raise ConfigError("run.editable is empty: name at least one editable file")
    for rel in editable:
        _check_relpath(rel, ConfigError)
        if never_editable(rel):
            raise ConfigError(f"run.editable lists {rel}, which is never editable")


def _check_relpath(rel: str, exc: type[Exception]) -> None:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or str(p) != rel:
        raise exc(f"bad file path {rel!r}: use a normalised path relative to the workspace")


def _atomic_write(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    """Write via a temp file + rename so a reader never sees a half-written file.

    ``tmp_dir`` (same file system) holds the temp file: the daemon passes its state directory,
    so a kill between write and rename leaves no stray file in the worktree.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, mode)  # keep e.g. the executable bit, so git sees no mode change
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
