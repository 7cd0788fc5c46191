"""The README's first lines are what a new user copies: they must do what they say."""

import re
import shlex
from pathlib import Path

from daemon_fixtures import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```sh\n(.*?)^```", README, re.M | re.S)


def test_the_readme_starts_with_the_main_job_and_the_tests():
    main_job, tests = (block.strip() for block in BLOCKS[:2])
    assert README.index("```sh") < README.index("\n## ")  # before any section
    assert "pip install" in main_job and "pip install" in tests and "pytest" in tests
    assert tests.endswith(".venv/bin/python -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci  # CI runs the README's test command


def test_the_main_job_puts_its_workspace_outside_the_checkout():
    main_job = BLOCKS[0].strip()
    run = shlex.split(main_job.split("&&")[-1])
    assert run[:2] == [".venv/bin/autoresearch", "run"] and "--init" in run
    workspace = next(arg for arg in run[2:] if not arg.startswith("-"))
    # Run from the checkout: a relative workspace would land inside it (`git status`: ?? lab/).
    assert workspace.startswith(("~/", "/")), workspace
    resolved = Path(workspace).expanduser()
    assert REPO not in resolved.parents
    # Resuming is the bare command (no pip again), named as such.
    assert f"`.venv/bin/autoresearch run {workspace}` resumes" in README
