"""autoresearch.toml: defaults, round trip, and one clear line for every mistake."""

import pytest

from autoresearch import config as c
from autoresearch.errors import ConfigError


def test_render_round_trips_and_defaults():
    cfg = c.Config()
    assert c.parse(c.render(cfg, c.COMMENTS)) == cfg
    assert cfg.run.hard_deadline == 2 * 60 + 120
    assert c.parse('[run]\ncommand = "python x.py"\n').run.argv == ["python", "x.py"]


@pytest.mark.parametrize("text,message", [
    ("[run]\ncommand = 1", "run.command must be a string"),
    ("[foo]\nx = 1", "unknown table [foo]"),
    ("[run]\nbogus = 1", "unknown key run.bogus"),
    ('[run]\neditable = ["program.md"]', "can never be editable"),
    ('[run]\neditable = [".autoresearch/x"]', "can never be editable"),
    ('[run]\neditable = ["../x.py"]', "must be relative and normal"),
    ("[run\n", "not valid TOML"),
    ('[run]\nmetric_regex = "("', "not a valid regex"),
    ('[run]\nmetric_regex = "val_bpb"', "needs one capture group"),
    ('[run]\ndirection = "down"', "direction must be"),
    ("[run]\nbudget_seconds = -1", "must not be negative"),
    ("run = 3", "[run] must be a table"),
    ('[proposer]\nkind = "gpt"', "proposer.kind must be"),
    ('[proposer]\nkind = "command"', "needs command.argv"),
    ('[sandbox]\nmode = "docker"', "sandbox.mode must be"),
    ("[judge]\nsimplicity = 1", "must be true or false"),
])
def test_bad_config_is_one_clear_line(text, message):
    with pytest.raises(ConfigError) as info:
        c.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        c.load(tmp_path)
