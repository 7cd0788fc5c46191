"""`run`'s creation options on an existing workspace are never silently ignored: --proposer applies
to that invocation (recorded), --profile/--data/--tag that differ are refused with one line."""

import pytest

from anthropic_fake import FakeAnthropic, tweak_constant
from daemon_fixtures import cli, events, git, make_workspace, state


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path / "ws", workload={"profile": "cpu", "data": "stdlib"})


@pytest.mark.parametrize("option, says", [
    (["--profile", "gpu"], "has profile cpu, fixed for the life of a workspace"),
    (["--data", "climbmix"], "edit workload.data in"),
    (["--tag", "other"], "is on branch autoresearch/test"),
    (["--proposer", "command"], "needs command.argv (with --proposer command)"),
])
def test_a_creation_option_that_cannot_apply_is_refused(ws, option, says):
    config = (ws / "autoresearch.toml").read_text()
    out = cli("run", str(ws), *option, "--max-experiments", "1")
    assert out.returncode == 2 and out.stdout == ""
    line, = out.stderr.splitlines()
    assert line.startswith("autoresearch: error: ") and says in line, line
    assert not (ws / ".autoresearch" / "events.sqlite").exists()  # nothing ran
    assert (ws / "autoresearch.toml").read_text() == config


def test_options_that_match_the_workspace_are_accepted(ws):
    out = cli("run", str(ws), "--profile", "cpu", "--data", "stdlib", "--tag", "test", "--proposer", "offline",
              "--max-experiments", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    boot = next(e for e in events(ws) if e.trigger == "boot")
    assert "overrides" not in boot.payload


def test_proposer_applies_to_this_run_and_is_recorded(ws):
    config = (ws / "autoresearch.toml").read_text()
    assert "kind = 'offline'" in config
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        env = {"ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": api.url}
        out = cli("run", str(ws), "--proposer", "anthropic", "--max-experiments", "1", env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len([r for r in api.requests if r.path.endswith("/messages")]) == 1
        # The next plain run is back to the config's proposer.
        out = cli("run", str(ws), "--max-experiments", "1", env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len([r for r in api.requests if r.path.endswith("/messages")]) == 1
    st = state(ws)
    assert st.experiments[1].proposer == "anthropic" and st.experiments[2].proposer == "offline"
    boots = [e for e in events(ws) if e.trigger == "boot"]
    assert boots[0].payload["overrides"] == {"proposer.kind": "anthropic"}
    assert "overrides" not in boots[1].payload
    assert (ws / "autoresearch.toml").read_text() == config
    assert git(ws, "status", "--porcelain") == ""
