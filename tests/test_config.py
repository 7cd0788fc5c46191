"""autoresearch.toml: defaults, round trip, and one clear line for every mistake."""

import subprocess
import sys

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
    ('[executor]\nkind = "slurm"', "executor.kind must be 'local' or 'ray'"),
    ('[ray]\naddress = ""', "ray.address must not be empty"),
    ("[ray]\nnum_gpus = -1", "ray.num_gpus must not be negative"),
    ('[ray]\nhead = "x"', "unknown key ray.head"),
])
def test_bad_config_is_one_clear_line(text, message):
    with pytest.raises(ConfigError) as info:
        c.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        c.load(tmp_path)


def _load(tmp_path, text):
    (tmp_path / c.CONFIG_NAME).write_text(text)
    return c.load(tmp_path)


def test_slots_defaults_and_values(tmp_path):
    cfg = c.Config()
    assert (cfg.slots.count, cfg.slots.gpus, cfg.slots.lookahead, cfg.slots.allow_mixed_gpus) == (1, (), 1, False)
    assert cfg.judge.merge is True
    cfg = _load(tmp_path, '[slots]\ncount = 2\ngpus = [0, "GPU-3f2a"]\nlookahead = 0\nallow_mixed_gpus = true\n'
                          '[judge]\nmerge = false\n')
    assert cfg.slots == c.SlotsConfig(count=2, gpus=("0", "GPU-3f2a"), lookahead=0, allow_mixed_gpus=True)
    assert cfg.judge.merge is False
    assert c.parse(c.render(cfg, c.COMMENTS)) == cfg  # init's writer keeps them


def test_init_renders_the_slots_table_with_comments():
    text = c.render(c.Config(), c.COMMENTS)
    table = text.split("[slots]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split(" = ")[0] for line in table] == ["count", "gpus", "lookahead", "allow_mixed_gpus"]
    assert all("  # " in line for line in table)
    assert "merge = true  # " in text.split("[judge]\n", 1)[1].split("\n\n", 1)[0]


def test_slot_count_resolves_auto(tmp_path):
    auto = _load(tmp_path, '[slots]\ncount = "auto"\n')
    assert c.slot_count(auto, []) == 1  # no GPU: one slot
    assert c.slot_count(auto, ["gpu0", "gpu1", "gpu2"]) == 3
    assert c.parse(c.render(auto, c.COMMENTS)).slots.count == "auto"
    listed = c.parse('[slots]\ncount = "auto"\ngpus = [2, 3]\n')
    assert c.slot_count(listed, ["gpu0", "gpu1", "gpu2", "gpu3"]) == 2  # the listed ones
    assert c.slot_count(c.parse("[slots]\ncount = 4\n"), ["gpu0"]) == 4


@pytest.mark.parametrize("text,message", [
    ("[slots]\ncount = 0", "slots.count must be at least 1 (or 'auto'), got 0"),
    ("[slots]\ncount = -2", "slots.count must not be negative"),
    ('[slots]\ncount = "many"', "slots.count must be an integer or 'auto', got 'many'"),
    ("[slots]\ncount = 1.5", "slots.count must be an integer"),
    ("[slots]\ncount = true", "slots.count must be an integer"),
    ("[slots]\nlookahead = -1", "slots.lookahead must not be negative"),
    ('[slots]\nlookahead = "auto"', "slots.lookahead must be an integer"),
    ("[slots]\ncount = 3\ngpus = [0, 1]", "slots.gpus lists 2 GPU(s) for slots.count = 3"),
    ('[slots]\ngpus = ["0,1"]', "slots.gpus entry '0,1' is not one GPU's index or UUID"),
    ('[slots]\ngpus = [""]', "is not one GPU's index or UUID"),
    ("[slots]\ngpus = [-1]", "slots.gpus must be a list of strings or non-negative integers"),
    ("[slots]\ngpus = 0", "slots.gpus must be a list of strings or non-negative integers"),
    ('[slots]\nallow_mixed_gpus = "yes"', "slots.allow_mixed_gpus must be true or false"),
    ("[slots]\nworkers = 2", "unknown key slots.workers"),
    ("[judge]\nmerge = 1", "judge.merge must be true or false"),
])
def test_bad_slots_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_bad_slots_in_one_line(tmp_path):
    (tmp_path / c.CONFIG_NAME).write_text('[slots]\ncount = "many"\n')
    out = subprocess.run([sys.executable, "-m", "autoresearch.cli", "run", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr == ("autoresearch: error: autoresearch.toml: slots.count must be an integer or 'auto', "
                          "got 'many'\n")
    assert not (tmp_path / ".autoresearch").exists()
