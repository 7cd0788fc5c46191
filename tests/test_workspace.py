"""workspace.py against real git repositories (all under pytest's tmp_path)."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from autoresearch.errors import ConfigError, WorkspaceError
from autoresearch.workspace import (BEST_REF, STATUS_FLAGS, Changes, Violation, Workspace, blob_sha,
                                   parse_status)

TRAIN = "LR = 0.04\nDEPTH = 4\nprint('val_bpb: 1.0')\n"
FILES = {"train.py": TRAIN, "program.md": "Make it better.\n"}
CONFIG = '[run]\ncommand = "python train.py"\neditable = ["train.py"]\n'


@pytest.fixture(autouse=True)
def no_git_identity(tmp_path_factory, monkeypatch):
    """A machine with no git identity and no global config: commits must still work."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                "EMAIL", "GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.delenv(var, raising=False)


def git(root: Path, *args: str) -> str:
    """Plain git as the user would run it (with an identity of its own)."""
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "u",
                                          "GIT_AUTHOR_EMAIL": "u@x", "GIT_COMMITTER_NAME": "u",
                                          "GIT_COMMITTER_EMAIL": "u@x"}).stdout


@pytest.fixture
def ws(tmp_path) -> Workspace:
    Workspace.create(tmp_path / "lab", FILES, "t1", config_text=CONFIG).close()
    w = Workspace.open(tmp_path / "lab", ("train.py",))
    yield w
    w.close()


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x\n")


def _force_add_state_file(root: Path) -> None:
    _write(root / ".autoresearch" / "f")
    git(root, "add", "-f", ".autoresearch/f")


# ------------------------------------------------------------------ create / open
def test_create_lays_out_a_workspace(ws):
    root = ws.root
    assert ws.branch == "autoresearch/t1"
    assert git(root, "branch", "--list").split() == ["*", "autoresearch/t1"]  # no master/main
    assert (root / ".gitignore").read_text().splitlines() == [".autoresearch/"]
    assert (root / "autoresearch.toml").read_text() == CONFIG
    assert ws.best() == ws.head()
    assert git(root, "rev-parse", BEST_REF).strip() == ws.head()
    assert git(root, "log", "-1", "--format=%an <%ae>|%cn <%ce>").strip() == \
        "autoresearch <autoresearch@localhost>|autoresearch <autoresearch@localhost>"
    assert sorted(git(root, "ls-files").split()) == [".gitignore", "autoresearch.toml",
                                                      "program.md", "train.py"]
    assert ws.user_changes() == []
    (ws.state_dir / "events.sqlite").write_text("x")
    assert ws.user_changes() == []  # the state dir is ignored


def test_create_refuses_non_empty_dir_bad_tag_and_bad_editable(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(WorkspaceError, match="not empty"):
        Workspace.create(tmp_path / "full", FILES, "t")
    assert os.listdir(tmp_path / "full") == ["x"]
    with pytest.raises(WorkspaceError, match="invalid tag"):
        Workspace.create(tmp_path / "new", FILES, "bad tag/..")
    with pytest.raises(ConfigError, match="never editable"):
        Workspace.create(tmp_path / "new", FILES, "t", editable=("program.md",))
    assert not (tmp_path / "new").exists()  # nothing half-made
    (tmp_path / "empty").mkdir()
    Workspace.create(tmp_path / "empty", FILES, "t").close()  # an empty dir is fine


def test_open_errors_are_one_line(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    empty = tmp_path / "empty"
    git(tmp_path, "init", "-q", str(empty))
    bare = tmp_path / "bare.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    inner = empty / "sub"
    inner.mkdir(parents=True)
    # `init` refuses a used directory, so the advice for a plain one is git's own init.
    cases = [(plain, "is not a git repository; make it one: cd .*plain && git init && git add -A"),
             (inner, f"inside the git repository {empty}, not its top level"),
             (tmp_path / "missing", "no such directory"),
             (empty, "no commits"), (bare, "bare")]
    for root, msg in cases:
        with pytest.raises(WorkspaceError, match=msg) as info:
            Workspace.open(root, ("train.py",))
        assert "\n" not in str(info.value)


def test_open_refuses_detached_head_and_bad_editable(ws):
    root = ws.root
    for editable, msg in [(("program.md",), "never editable"),
                          (("autoresearch.toml",), "never editable"),
                          (("train.py", ".autoresearch/x"), "never editable"),
                          (("../etc/passwd",), "bad file path"), ((), "empty")]:
        with pytest.raises(ConfigError, match=msg):
            Workspace.open(root, editable)
    with pytest.raises(WorkspaceError, match="not committed"):
        Workspace.open(root, ("other.py",))
    git(root, "checkout", "-q", "--detach")
    with pytest.raises(WorkspaceError, match="detached"):
        Workspace.open(root, ("train.py",))


def test_open_existing_repo_excludes_state_dir_without_touching_tracked_files(tmp_path):
    root = tmp_path / "repo"
    git(tmp_path, "init", "-q", str(root))
    git(root, "symbolic-ref", "HEAD", "refs/heads/trunk")
    (root / "train.py").write_text(TRAIN)
    (root / ".gitignore").write_text("*.pyc\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "user commit")
    w = Workspace.open(root, ("train.py",))
    try:
        assert (root / ".gitignore").read_text() == "*.pyc\n"
        assert ".autoresearch/" in (root / ".git" / "info" / "exclude").read_text()
        (w.state_dir / "events.sqlite").write_text("x")
        assert w.user_changes() == []
        assert w.best() is None and w.branch == "trunk"
    finally:
        w.close()
    Workspace.open(root, ("train.py",)).close()  # opening again does not add the line twice
    assert (root / ".git" / "info" / "exclude").read_text().count(".autoresearch/") == 1


def test_open_refuses_tracked_state_dir(tmp_path):
    root = tmp_path / "repo"
    git(tmp_path, "init", "-q", str(root))
    (root / "train.py").write_text(TRAIN)
    _write(root / ".autoresearch" / "old.log")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "oops")
    with pytest.raises(WorkspaceError, match="tracked by git"):
        Workspace.open(root, ("train.py",))


# ------------------------------------------------------------------ user changes / scope
def test_user_changes_of_every_kind(ws):
    root = ws.root
    (root / "train.py").write_text("edited\n")
    (root / "notes.txt").write_text("untracked\n")
    (root / "program.md").unlink()
    (root / "autoresearch.toml").write_text(CONFIG + "\n# staged\n")
    git(root, "add", "autoresearch.toml")
    got = {line.split()[-1] for line in ws.user_changes()}
    assert got == {"train.py", "notes.txt", "program.md", "autoresearch.toml"}


@pytest.mark.parametrize("act,expected", [
    (lambda r: (r / "train.py").write_text("LR = 1\n"), []),
    (lambda r: (r / "program.md").write_text("do evil\n"), ["modified: program.md"]),
    (lambda r: (r / "autoresearch.toml").write_text("[run]\n"), ["modified: autoresearch.toml"]),
    (lambda r: (r / "new.py").write_text("x\n"), ["added: new.py"]),
    (lambda r: _write(r / "sub" / "deep.py"), ["added: sub/deep.py"]),
    (lambda r: (r / "train.py").unlink(), ["deleted editable file: train.py"]),
    (lambda r: (r / ".gitignore").unlink(), ["deleted: .gitignore"]),
    (_force_add_state_file, ["added (state directory): .autoresearch/f"]),
    (lambda r: git(r, "mv", "program.md", "prog2.md"), ["added: prog2.md", "deleted: program.md"]),
], ids=["editable", "program", "config", "new-file", "new-dir", "delete-editable",
        "delete-gitignore", "state-dir", "rename"])
def test_scope_violations(ws, act, expected):
    act(ws.root)
    ch = ws.changes(base=ws.best())
    assert isinstance(ch, Changes) and bool(ch)
    assert sorted(map(str, ws.scope_violations(ch))) == sorted(expected)
    # Rollback restores the workspace whatever the proposal did.
    ws.reset_hard(ws.best())
    assert ws.user_changes() == [] and ws.read_files() == {"train.py": TRAIN}
    assert not ws.changes()


def test_scope_violations_are_values(ws):
    (ws.root / "new.py").write_text("x\n")
    (ws.root / "train.py").unlink()
    found = ws.scope_violations(ws.changes(base=ws.best()))
    assert sorted(found) == [Violation("added", "new.py"), Violation("deleted editable file", "train.py")]
    assert all(v.path not in ("program.md", "autoresearch.toml") for v in found)
    # The recorded text of each kind, as it has always been written.
    assert [str(v) for v in sorted(found)] == ["added: new.py", "deleted editable file: train.py"]
    assert str(Violation("deleted", ".autoresearch/x/y")) == "deleted (state directory): .autoresearch/x/y"


def test_a_proposal_that_commits_by_itself_is_caught(ws):
    base = ws.head()
    (ws.root / "program.md").write_text("sneaky\n")
    git(ws.root, "commit", "-qam", "agent commit")
    assert not ws.changes()  # clean against the new HEAD...
    ch = ws.changes(base=base)  # ...but not against the commit the daemon expects
    assert ch.head_moved and "program.md" in ch.modified
    assert ws.scope_violations(ch) == [Violation("HEAD moved"), Violation("modified", "program.md")]
    assert str(ws.scope_violations(ch)[0]) == "HEAD moved: the proposal made its own commits"
    ws.reset_hard(base)
    assert ws.head() == base and not ws.changes(base=base)


# ------------------------------------------------------------------ files
def test_write_and_read_files(ws):
    os.chmod(ws.root / "train.py", 0o755)
    git(ws.root, "commit", "-qam", "exec bit")
    ws.write_files({"train.py": "LR = 0.1\r\nX = 'é'\n"})
    assert ws.read_files() == {"train.py": "LR = 0.1\r\nX = 'é'\n"}  # text kept exactly
    assert os.stat(ws.root / "train.py").st_mode & 0o777 == 0o755  # mode kept
    assert not list(ws.root.glob(".train.py.*"))  # no temp file left behind
    with pytest.raises(ValueError, match="not editable"):
        ws.write_files({"program.md": "x"})
    assert (ws.root / "program.md").read_text() == FILES["program.md"]


def test_file_hash_and_commit_matches(ws):
    assert ws.file_hash("train.py") == hashlib.sha256(TRAIN.encode()).hexdigest()
    assert blob_sha(TRAIN) == git(ws.root, "rev-parse", "HEAD:train.py").strip()
    base = ws.head()
    ws.write_files({"train.py": "LR = 0.2\n"})
    sha = ws.commit("exp 1")
    assert ws.commit_matches(sha, {"train.py": "LR = 0.2\n"}, parent=base)
    assert not ws.commit_matches(sha, {"train.py": "LR = 0.3\n"})
    assert not ws.commit_matches(sha, {"train.py": "LR = 0.2\n"}, parent=sha)
    assert not ws.commit_matches("0" * 40, {"train.py": "LR = 0.2\n"})
    assert ws.files_at(base) == {"train.py": TRAIN}
    # A merge's commit has the merged experiment's commit as its second parent: matched with it.
    merge = ws.commit_files({"train.py": "LR = 0.25\n"}, sha, "merge", parents=[base])
    assert ws.commit_matches(merge, {"train.py": "LR = 0.25\n"}, parent=sha, parents=[base])
    assert not ws.commit_matches(merge, {"train.py": "LR = 0.25\n"}, parent=sha)


# ------------------------------------------------------------------ commit / rollback / refs
def test_commit_takes_only_editable_files(ws):
    base = ws.head()
    ws.write_files({"train.py": "LR = 0.5\n"})
    (ws.root / "stray.txt").write_text("not mine")
    (ws.root / "program.md").write_text("human edit in progress\n")
    git(ws.root, "add", "program.md")  # even staged, it stays out of the daemon's commit
    sha = ws.commit("exp 1: LR 0.04 -> 0.5")
    assert sha == ws.head() != base
    assert git(ws.root, "rev-parse", f"{sha}^").strip() == base
    assert git(ws.root, "show", "--name-only", "--format=", sha).split() == ["train.py"]
    assert git(ws.root, "log", "-1", "--format=%s").strip() == "exp 1: LR 0.04 -> 0.5"
    assert ws.branch == "autoresearch/t1"


def test_reset_hard_removes_untracked_but_keeps_ignored(ws):
    (ws.state_dir / "events.sqlite").write_text("precious")
    (ws.root / ".gitignore").write_text(".autoresearch/\n*.cache\n")
    git(ws.root, "commit", "-qam", "ignore caches")
    base = ws.head()
    ws.set_best(base)
    (ws.root / "data.cache").write_text("ignored, kept")
    ws.write_files({"train.py": "LR = 9\n"})
    sha = ws.commit("exp")
    _write(ws.root / "junk" / "a.py")
    ws.reset_hard(ws.best())
    assert ws.head() == base and ws.read_files() == {"train.py": TRAIN}
    assert not (ws.root / "junk").exists()
    assert (ws.state_dir / "events.sqlite").read_text() == "precious"
    assert (ws.root / "data.cache").read_text() == "ignored, kept"
    assert git(ws.root, "cat-file", "-t", sha).strip() == "commit"  # still in the object store


def test_refs_numstat_and_diff(ws):
    base = ws.head()
    assert ws.exp_ref(1) is None and ws.all_exp_refs() == {}
    shas = {}
    for n in (1, 2, 10):
        ws.write_files({"train.py": TRAIN + f"EXTRA_{n} = {n}\n"})
        shas[n] = ws.commit(f"exp {n}")
        ws.set_exp_ref(n, shas[n])
        ws.reset_hard(base)
    assert ws.all_exp_refs() == shas and ws.exp_ref(10) == shas[10]
    assert git(ws.root, "rev-parse", "refs/autoresearch/exp/2").strip() == shas[2]
    ws.set_best(shas[2])
    assert ws.best() == shas[2]
    ws.write_files({"train.py": "LR = 0.04\n"})
    sha = ws.commit("shrink")
    assert ws.numstat(base, sha) == (0, 2)
    assert ws.numstat(base, shas[1]) == (1, 0)
    d = ws.diff(base, shas[1])
    assert "+EXTRA_1 = 1" in d and d.startswith("diff --git a/train.py b/train.py")
    git(ws.root, "pack-refs", "--all")  # packed refs are read too
    assert ws.all_exp_refs() == shas and ws.best() == shas[2]


def test_clear_stale_locks(ws):
    gitdir = ws.root / ".git"
    (gitdir / "index.lock").write_text("")
    (gitdir / "refs" / "heads" / "autoresearch" / "t1.lock").write_text("")
    ws.write_files({"train.py": "LR = 3\n"})
    with pytest.raises(WorkspaceError, match="index.lock") as info:
        ws.commit("blocked by a dead process's lock")
    assert "\n" not in str(info.value)
    assert len(ws.clear_stale_locks()) == 2
    sha = ws.commit("works now")
    assert ws.head() == sha and ws.clear_stale_locks() == []


def test_git_overhead_per_experiment(ws):
    """write + scope check + commit + ref + numstat + rollback: the daemon's git work."""
    best = ws.best()
    times = []
    for n in range(1, 16):
        t0 = time.perf_counter()
        ws.write_files({"train.py": TRAIN.replace("0.04", f"0.{n:02d}")})
        assert ws.scope_violations(ws.changes(base=best)) == []
        sha = ws.commit(f"exp {n}")
        ws.set_exp_ref(n, sha)
        ws.numstat(best, sha)
        ws.reset_hard(best)
        times.append(time.perf_counter() - t0)
    # Typically ~20 ms here; the bound leaves room for a loaded CI machine.
    assert statistics.median(times) < 0.15, times


def test_git_survives_a_ctrl_c_that_killed_gitpythons_helpers(ws):
    """A Ctrl-C on the terminal reaches every process of the daemon's group, GitPython's persistent
    `git cat-file` helpers included; the stop's anchor must still be written (it failed with
    'Broken pipe' before)."""
    import signal

    ws.anchor(1, "a" * 64, 0)  # starts the cat-file helpers (a ref write looks its object up)
    helpers = [h.proc for h in (ws.repo.git.cat_file_header, ws.repo.git.cat_file_all) if h is not None]
    assert helpers, "GitPython keeps no cat-file helper: the test no longer reproduces a Ctrl-C"
    for proc in helpers:
        proc.send_signal(signal.SIGINT)
        proc.wait(5)
    ws.anchor(2, "b" * 64, 0)
    assert [seq for seq, _, _ in ws.anchors()] == [2, 1]


def test_parse_status_reads_every_kind_of_entry(ws):
    # Real `git status` output (the one both the workspace and the command proposer read): a
    # staged rename and copy, names with spaces, an arrow and a newline, an untracked file.
    root = ws.root
    (root / "a b.py").write_text("x = 1\n" * 20)
    (root / "odd\nname -> x.py").write_text("y = 2\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "two more")
    git(root, "mv", "a b.py", "c d.py")
    (root / "odd\nname -> x.py").unlink()
    (root / "copy.py").write_text("x = 1\n" * 20)
    git(root, "add", "-N", "copy.py")
    (root / "train.py").write_text("changed\n")
    (root / "new file.txt").write_text("new\n")
    raw = git(root, "status", *STATUS_FLAGS)
    assert "R  c d.py\0a b.py\0" in raw  # a rename really is one entry with its source after it
    got = sorted(parse_status(raw))
    assert got == sorted([("D ", "a b.py"), ("A ", "c d.py"), (" D", "odd\nname -> x.py"),
                          (" A", "copy.py"), (" M", "train.py"), ("??", "new file.txt")])
    assert sorted(p for _, p in ws._status()) == sorted(p for _, p in got)
    assert parse_status("") == []
    assert parse_status("C  b.py\0a.py\0") == [("A ", "b.py")]  # a copy leaves its source alone


# ------------------------------------------------------------------ plumbing: commits without a checkout

def _snapshot(root: Path) -> dict:
    """Everything a commit must not touch: HEAD, the branch, the index, the worktree, the state dir."""
    return {"head": git(root, "rev-parse", "HEAD"), "symbolic": git(root, "symbolic-ref", "HEAD"),
            "branch": git(root, "rev-parse", git(root, "symbolic-ref", "HEAD").strip()),
            "index": (root / ".git" / "index").read_bytes(),
            "status": git(root, "status", "--porcelain", "--untracked-files=all", "--ignored"),
            "files": {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()},
            "state": sorted(str(p.relative_to(root)) for p in (root / ".autoresearch").rglob("*"))}


def test_commit_files_commits_without_touching_head_branch_index_or_worktree(tmp_path):
    files = {"train.py": TRAIN, "model.py": "W = 1\n", "program.md": "Make it better.\n"}
    Workspace.create(tmp_path / "lab", files, "t1", config_text=CONFIG, editable=("train.py", "model.py")).close()
    root = tmp_path / "lab"
    (root / "model.py").chmod(0o755)
    git(root, "commit", "-qam", "model.py is executable")
    # A clean filter and CRLF conversion in the repo's config: the commit must take the exact text anyway.
    marker = tmp_path / "filter-ran"
    git(root, "config", "filter.evil.clean", f"touch {marker}; cat")
    git(root, "config", "core.autocrlf", "true")
    (root / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    w = Workspace.open(root, ("train.py", "model.py"))
    try:
        (root / "train.py").write_text(TRAIN + "# the human's uncommitted edit\n")
        parent = w.head()
        before = _snapshot(root)
        marker.unlink(missing_ok=True)  # the plain `git status` of the snapshot runs the filter
        text = "LR = 0.1\r\nDEPTH = 4\nprint('é ✓')"  # CRLF, non-ASCII, no final newline
        sha = w.commit_files({"model.py": text}, parent, "exp 1: W is gone")
        assert not marker.exists()
        assert _snapshot(root) == before  # HEAD, branch, index, worktree, state dir: all as they were
        assert git(root, "rev-list", "--parents", "-n1", sha).split() == [sha, parent]
        assert git(root, "log", "-1", "--format=%B", sha).strip() == "exp 1: W is gone"
        assert subprocess.run(["git", "-C", str(root), "cat-file", "blob", f"{sha}:model.py"],
                              capture_output=True, check=True).stdout == text.encode()
        assert git(root, "diff", "--name-only", parent, sha).split() == ["model.py"]
        assert git(root, "ls-tree", sha, "model.py").split()[0] == "100755"  # its mode kept
        assert w.files_at(sha, ["train.py", "program.md"]) == w.files_at(parent, ["train.py", "program.md"])

        # A merge: more parents, in order; the tree is the first parent's with the files replaced.
        other = w.commit_files({"train.py": "LR = 0.2\n"}, parent, "exp 2")
        merge = w.commit_files({"train.py": "LR = 0.2\n"}, sha, "merge of 1 and 2", parents=[other])
        assert git(root, "rev-list", "--parents", "-n1", merge).split() == [merge, sha, other]
        assert w.files_at(merge) == {"train.py": "LR = 0.2\n", "model.py": text}
        assert _snapshot(root) == before

        with pytest.raises(ValueError, match="not editable: program.md"):
            w.commit_files({"program.md": "mine\n"}, parent, "no")
        with pytest.raises(WorkspaceError, match="not a commit"):
            w.commit_files({"train.py": "x\n"}, "f" * 40, "no")
        assert _snapshot(root) == before  # no temporary index left behind either
    finally:
        w.close()


def test_commit_files_is_fast_enough_for_the_loop(ws):
    parent = ws.head()
    times = []
    for i in range(10):
        t = time.perf_counter()
        ws.commit_files({"train.py": f"LR = {i}\n"}, parent, f"exp {i}")
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.25, times  # 2-core CI under load; about 25 ms when quiet


BASE = "".join(f"LINE_{i} = {i}\n" for i in range(12))


def _edit(text: str, **lines) -> str:
    return "".join(f"LINE_{i} = {lines.get(f'L{i}', i)}\n" for i in range(12))


@pytest.fixture
def three(tmp_path):
    """A workspace whose train.py is BASE; returns (ws, base commit)."""
    Workspace.create(tmp_path / "lab", {"train.py": BASE, "program.md": "p\n"}, "t1", config_text=CONFIG).close()
    w = Workspace.open(tmp_path / "lab", ("train.py",))
    yield w, w.head()
    w.close()


def test_merge_files_combines_edits_to_different_lines(three):
    w, base = three
    ours = w.commit_files({"train.py": _edit(BASE, L1="'a'")}, base, "ours")
    theirs = w.commit_files({"train.py": _edit(BASE, L10="'b'")}, base, "theirs")
    before = _snapshot(w.root)
    assert w.merge_files(base, ours, theirs, ["train.py"]) == {"train.py": _edit(BASE, L1="'a'", L10="'b'")}
    assert w.merge_files(base, ours, base, ["train.py"]) == {"train.py": _edit(BASE, L1="'a'")}
    assert w.merge_files(base, base, theirs, ["train.py"]) == {"train.py": _edit(BASE, L10="'b'")}
    assert _snapshot(w.root) == before  # reads objects only; no scratch file left


def test_merge_files_combines_edits_to_neighbouring_lines(three):
    """Two tuned constants on adjacent lines: one hunk to git merge-file (a conflict), but each
    line changed on one side only, so the line-by-line merge composes them."""
    w, base = three
    ours = w.commit_files({"train.py": _edit(BASE, L4="'a'")}, base, "ours")
    theirs = w.commit_files({"train.py": _edit(BASE, L5="'b'")}, base, "theirs")
    assert w.merge_files(base, ours, theirs, ["train.py"]) == {"train.py": _edit(BASE, L4="'a'", L5="'b'")}
    longer = w.commit_files({"train.py": _edit(BASE, L5="'b'") + "EXTRA = 1\n"}, base, "adds a line too")
    assert w.merge_files(base, ours, longer, ["train.py"]) is None  # not line for line: a real conflict


def test_merge_files_conflict_is_none(three):
    w, base = three
    ours = w.commit_files({"train.py": _edit(BASE, L5="'a'")}, base, "ours")
    theirs = w.commit_files({"train.py": _edit(BASE, L5="'b'")}, base, "theirs")
    assert w.merge_files(base, ours, theirs, ["train.py"]) is None
    same = w.commit_files({"train.py": _edit(BASE, L5="'a'")}, base, "the same edit again")
    assert w.merge_files(base, ours, same, ["train.py"]) == {"train.py": _edit(BASE, L5="'a'")}


def test_move_branch_moves_the_ref_only(three):
    w, base = three
    sha = w.commit_files({"train.py": _edit(BASE, L0="'x'")}, base, "exp 1")
    index = (w.root / ".git" / "index").read_bytes()
    w.move_branch(sha)
    assert git(w.root, "rev-parse", "HEAD").strip() == sha  # HEAD follows its branch
    assert git(w.root, "symbolic-ref", "HEAD").strip() == "refs/heads/autoresearch/t1"
    assert (w.root / "train.py").read_text() == BASE and (w.root / ".git" / "index").read_bytes() == index
    assert "autoresearch: best is" in git(w.root, "reflog", "-1", "autoresearch/t1")
    w.reset_hard(sha)  # the human's worktree is reset separately
    assert (w.root / "train.py").read_text() == _edit(BASE, L0="'x'")
    with pytest.raises(WorkspaceError, match="not a commit"):
        w.move_branch("0" * 40)


def test_merge_files_of_an_unknown_commit_is_one_line(three):
    w, base = three
    with pytest.raises(WorkspaceError, match="not a commit"):
        w.merge_files(base, "e" * 40, base, ["train.py"])


def test_a_killed_commit_files_leaves_nothing_that_blocks_and_boot_clears_it(ws):
    """A kill -9 inside commit_files leaves its temporary index (and git's lock on it) in the
    state dir: the next commit does not trip on it, and the boot's clear_stale_locks removes it."""
    left = ws.state_dir / "index-killed"
    left.mkdir()
    (left / "index").write_bytes(b"DIRC partial")
    (left / "index.lock").write_bytes(b"")
    sha = ws.commit_files({"train.py": "LR = 9\n"}, ws.head(), "after the kill")
    assert ws.files_at(sha) == {"train.py": "LR = 9\n"}
    assert ws.clear_stale_locks() == [str(left)]
    assert not left.exists() and [p.name for p in ws.state_dir.iterdir() if p.name.startswith("index-")] == []
