"""AnthropicProposer driven through the real `anthropic` SDK against a loopback fake API:
tool use, in-memory edits, scope refusal, nudges, usage and cost."""

from __future__ import annotations

import dataclasses

import pytest

from autoresearch.config import AnthropicConfig, Prices
from autoresearch.proposers.anthropic import AnthropicProposer
from autoresearch.proposers.base import NoEdit, ProposerAuthError
from tests.anthropic_fake import (fake_api_for_sdk, Reply, editor, error_reply, finish, message,
                                  text_reply, tool_reply, tweak_constant, usage)
from tests.proposer_fixtures import TRAIN_PY, make_ctx, make_workspace

KEY = "sk-ant-api03-test-key-0123456789"
CFG = AnthropicConfig(model="claude-test", max_tokens=1024, timeout_seconds=5, max_turns=8,
                      deadline_seconds=30, max_nudges=2, block_after_failures=3,
                      prices=Prices(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75))


@pytest.fixture
def api(monkeypatch):
    with fake_api_for_sdk(monkeypatch, KEY) as fake:
        yield fake


@pytest.fixture
def lab(tmp_path):
    return make_workspace(tmp_path)


def proposer(**overrides):
    return AnthropicProposer(dataclasses.replace(CFG, **overrides), backoff_base=0.01)


def good_edit():
    return tool_reply(editor("str_replace", path="train.py", old_str="LR = 0.01", new_str="LR = 0.02"))


def test_view_then_str_replace_then_finish(api, lab):
    ws, harness = lab
    api.push(tool_reply(editor("view", path=str(ws / "train.py")), text="Let me look.",
                        use=usage(1000, 50, cache_write=800)),
             tool_reply(editor("str_replace", path=str(ws / "train.py"), old_str="LR = 0.01",
                               new_str="LR = 0.02"), use=usage(1200, 60, cache_read=800)),
             tool_reply(finish("double the learning rate\nsecond line ignored"), use=usage(1300, 10, cache_read=800)))
    prop = proposer().propose(make_ctx(ws, harness))

    assert prop.proposer == "anthropic"
    assert prop.description == "double the learning rate"
    assert prop.files == {"train.py": TRAIN_PY.replace("LR = 0.01", "LR = 0.02")}
    assert (ws / "train.py").read_text() == TRAIN_PY, "edits stay in memory until the daemon applies them"
    assert prop.usage == {"input_tokens": 3500, "output_tokens": 120,
                          "cache_read_input_tokens": 1600, "cache_creation_input_tokens": 800}
    expected = (3500 * 3.0 + 120 * 15.0 + 1600 * 0.3 + 800 * 3.75) / 1e6
    assert prop.cost_usd == pytest.approx(expected)
    assert prop.meta["turns"] == 3 and prop.meta["tool_errors"] == 0

    assert len(api.requests) == 3
    first = api.requests[0]
    assert first.path == "/v1/messages"
    assert first.api_key == KEY
    assert first.body["model"] == "claude-test" and first.body["max_tokens"] == 1024
    tools = {t["name"]: t for t in first.body["tools"]}
    assert tools["str_replace_based_edit_tool"]["type"] == "text_editor_20250728"
    assert tools["finish"]["input_schema"]["required"] == ["description"]
    system = first.body["system"]
    assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert "Try learning-rate ideas first." in system[-1]["text"]  # program.md is in the cached prefix
    user = first.text(0)
    assert "LR = 0.01" in user and "LR 0.01 -> 0.02" in user  # current file + history table
    (view_result,) = api.requests[1].tool_results()
    assert not view_result.get("is_error")
    assert "     3\tLR = 0.01" in view_result["content"]
    # The conversation is replayed in full each turn (the API is stateless), with one rolling
    # cache breakpoint on its last block so the next turn reads the rest from the cache.
    messages = api.requests[2].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    marked = [m for m in messages if isinstance(m["content"], list)
              and any("cache_control" in b for b in m["content"])]
    assert marked == [messages[-1]] and messages[-1]["content"][-1]["type"] == "tool_result"


def test_view_reads_workspace_and_harness_but_not_internals(api, lab):
    ws, harness = lab
    api.push(tool_reply(editor("view", path="prepare.py"),
                        editor("view", path=str(harness / "harness.py")),
                        editor("view", path=".autoresearch/events.sqlite"),
                        editor("view", path=".git/config"),
                        editor("view", path="/etc/hostname"),
                        editor("view", path="../harness/../../../etc/passwd"),
                        editor("view", path=str(ws)),
                        editor("view", path="train.py", view_range=[3, 4])),
             good_edit(), tool_reply(finish("lr")))
    proposer().propose(make_ctx(ws, harness))
    results = api.requests[1].tool_results()
    ok = [not r.get("is_error") for r in results]
    assert ok == [True, True, False, False, False, False, True, True]
    assert "SEED = 42" in results[0]["content"]
    assert "evaluate_bpb" in results[1]["content"]
    assert "not readable" in results[2]["content"]
    assert "outside the workspace" in results[4]["content"]
    listing = results[6]["content"]
    assert "train.py" in listing and "prepare.py" in listing
    assert ".git" not in listing and ".autoresearch" not in listing
    assert results[7]["content"] == "     3\tLR = 0.01\n     4\tBATCH = 32"


def test_str_replace_not_unique_or_not_found_is_a_tool_error(api, lab):
    ws, harness = lab
    api.push(tool_reply(editor("str_replace", path="train.py", old_str="    # end\n", new_str="")),
             tool_reply(editor("str_replace", path="train.py", old_str="LR=0.01", new_str="LR=0.03")),
             good_edit(), tool_reply(finish("lr 0.02")))
    prop = proposer().propose(make_ctx(ws, harness))
    (dup,) = api.requests[1].tool_results()
    (missing,) = api.requests[2].tool_results()
    assert dup["is_error"] and "2 times" in dup["content"]
    assert missing["is_error"] and "No match" in missing["content"]
    assert prop.files["train.py"].count("LR = 0.02") == 1
    assert prop.meta["tool_errors"] == 2


def test_writes_outside_editable_files_are_refused_and_not_applied(api, lab):
    ws, harness = lab
    api.push(tool_reply(editor("str_replace", path="prepare.py", old_str="SEED = 42", new_str="SEED = 0"),
                        editor("create", path="evil.py", file_text="import os\n"),
                        editor("insert", path=str(harness / "harness.py"), insert_line=0, insert_text="x = 1\n"),
                        editor("create", path="/tmp/outside.py", file_text="x\n")),
             tool_reply(editor("insert", path="train.py", insert_line=1, insert_text="import random\n")),
             tool_reply(finish("import random")))
    prop = proposer().propose(make_ctx(ws, harness))
    results = api.requests[1].tool_results()
    assert all(r["is_error"] for r in results)
    assert "read-only" in results[0]["content"] and "Edit not applied" in results[0]["content"]
    assert set(prop.files) == {"train.py"}
    assert prop.files["train.py"].startswith("import math\nimport random\n\nLR = 0.01")
    assert (ws / "prepare.py").read_text() == "# read-only harness entry\nSEED = 42\n"
    assert not (ws / "evil.py").exists()
    assert (harness / "harness.py").read_text().startswith("def evaluate_bpb")


def test_tool_calls_cut_off_at_max_tokens_are_not_executed(api, lab):
    ws, harness = lab
    truncated = editor("str_replace", path="train.py", old_str="def schedule(step):")  # new_str lost
    api.push(Reply(body=message([truncated], stop_reason="max_tokens")), good_edit(),
             tool_reply(finish("lr")))
    prop = proposer().propose(make_ctx(ws, harness))
    (result,) = api.requests[1].tool_results()
    assert result["is_error"] and "max_tokens" in result["content"]
    assert "def schedule(step):" in prop.files["train.py"]


def test_create_replaces_the_editable_file(api, lab):
    ws, harness = lab
    api.push(tool_reply(editor("create", path="train.py", file_text="print('val_bpb: 0.5')\n"),
                        finish("rewrite")))
    prop = proposer().propose(make_ctx(ws, harness))
    assert prop.files == {"train.py": "print('val_bpb: 0.5')\n"}
    assert prop.description == "rewrite"


def test_no_edit_gets_nudges_then_no_edit(api, lab):
    ws, harness = lab
    api.push(text_reply("I think we should try a bigger model."),
             text_reply("Really, a bigger model."),
             text_reply("Still thinking."))
    with pytest.raises(NoEdit) as info:
        proposer(max_nudges=2).propose(make_ctx(ws, harness))
    assert len(api.requests) == 3
    nudges = [r.text(-1) for r in api.requests[1:]]
    assert all("not changed any editable file" in n for n in nudges)
    assert "2 nudges" in info.value.reason
    # The spend of a failed proposal is still reported, for the daemon's cost caps.
    assert info.value.usage["input_tokens"] == 300 and info.value.cost_usd > 0


def test_finish_without_edit_is_refused_then_nudged(api, lab):
    ws, harness = lab
    api.push(tool_reply(finish("nothing")), good_edit(), tool_reply(finish("lr up")))
    prop = proposer().propose(make_ctx(ws, harness))
    (refused,) = api.requests[1].tool_results()
    assert refused["is_error"] and "No edit" in refused["content"]
    assert prop.description == "lr up" and prop.meta["nudges"] == 1


def test_finish_refused_past_the_nudge_limit_is_no_edit(api, lab):
    ws, harness = lab
    api.push(tool_reply(finish("a")), tool_reply(finish("b")))
    with pytest.raises(NoEdit):
        proposer(max_nudges=1).propose(make_ctx(ws, harness))
    assert len(api.requests) == 2


def test_edit_then_prose_is_nudged_to_finish_then_accepted(api, lab):
    ws, harness = lab
    api.push(good_edit(), text_reply("Done: raised LR."), text_reply("Raised LR to 0.02."))
    prop = proposer(max_nudges=1).propose(make_ctx(ws, harness))
    assert "Call the finish tool" in api.requests[2].text(-1)
    assert prop.description == "Raised LR to 0.02."
    assert "LR = 0.02" in prop.files["train.py"]


def test_max_turns_without_edit_is_no_edit(api, lab):
    ws, harness = lab
    api.push(*[tool_reply(editor("view", path="train.py")) for _ in range(3)])
    with pytest.raises(NoEdit) as info:
        proposer(max_turns=3).propose(make_ctx(ws, harness))
    assert "3 turns" in info.value.reason and len(api.requests) == 3


def test_edit_reverted_to_original_counts_as_no_edit(api, lab):
    ws, harness = lab
    api.push(good_edit(),
             tool_reply(editor("str_replace", path="train.py", old_str="LR = 0.02", new_str="LR = 0.01"),
                        finish("no-op")),
             text_reply("ok"), text_reply("ok"))
    with pytest.raises(NoEdit):
        proposer(max_nudges=1).propose(make_ctx(ws, harness))


def test_bad_request_is_no_edit_without_retry(api, lab):
    ws, harness = lab
    api.push(error_reply(400, "invalid_request_error", "prompt is too long"))
    with pytest.raises(NoEdit) as info:
        proposer().propose(make_ctx(ws, harness))
    assert "HTTP 400" in info.value.reason and "prompt is too long" in info.value.reason
    assert len(api.requests) == 1


def test_missing_key_is_an_auth_error_without_any_request(api, lab, monkeypatch):
    ws, harness = lab
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ProposerAuthError) as info:
        proposer().propose(make_ctx(ws, harness))
    assert "ANTHROPIC_API_KEY" in info.value.reason and api.requests == []


def test_key_from_systemd_credential(api, lab, monkeypatch, tmp_path):
    ws, harness = lab
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "anthropic_api_key").write_text("sk-ant-api03-from-credential-file\n")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    api.push(good_edit(), tool_reply(finish("lr")))
    proposer().propose(make_ctx(ws, harness))
    assert api.requests[0].api_key == "sk-ant-api03-from-credential-file"


def test_tweak_constant_script_drives_several_proposals(api, lab):
    """The scripted model that end-to-end tests use: one reply per experiment."""
    ws, harness = lab
    api.default = tweak_constant()
    files = {"train.py": TRAIN_PY}
    descriptions = []
    for n in (1, 2, 3):
        prop = proposer().propose(make_ctx(ws, harness, n=n, files=files))
        descriptions.append(prop.description)
        files = prop.files
    assert descriptions == ["BATCH 32 -> 16", "WARMUP 100 -> 200", "LR 0.01 -> 0.005"]
    assert "LR = 0.005\nBATCH = 16\nWARMUP = 200\n" in files["train.py"]
    assert len(api.requests) == 3


# ---------------------------------------------------------------------- model, prices, thinking

def test_the_default_model_is_current_in_the_installed_sdk():
    import anthropic._data as sdk_data
    from typing import get_args

    from anthropic.types.model_param import ModelParam

    model = AnthropicConfig().model
    assert model not in sdk_data.DEPRECATED_MODELS  # the SDK warns about these (end of life)
    assert model in get_args(get_args(ModelParam)[0])
    assert AnthropicConfig().price() is not None  # and its cost is known


def test_an_unpriced_model_records_its_cost_as_unknown_not_zero(api, lab):
    ws, harness = lab
    api.push(good_edit(), tool_reply(finish("LR up"), use=usage(100, 10)))
    prop = proposer(model="claude-unlisted-9", prices=None).propose(make_ctx(ws, harness))
    assert prop.cost_usd is None and prop.usage["input_tokens"] == 200
    api.push(tool_reply(editor("view", path="train.py")))
    api.push(text_reply("no idea"), text_reply("still nothing"), text_reply("no"))
    with pytest.raises(NoEdit) as info:
        proposer(model="claude-unlisted-9", prices=None).propose(make_ctx(ws, harness))
    assert info.value.cost_usd is None and info.value.usage["input_tokens"] > 0


def test_prices_come_from_the_table_per_model_unless_configured(api, lab):
    ws, harness = lab
    use = usage(1_000_000, 100_000, cache_read=1_000_000, cache_write=1_000_000)
    api.push(tool_reply(editor("str_replace", path="train.py", old_str="LR = 0.01", new_str="LR = 0.02"),
                        finish("LR up"), use=use))
    prop = proposer(model="claude-haiku-4-5-20251001", prices=None).propose(make_ctx(ws, harness))
    assert prop.cost_usd == pytest.approx(1.0 + 0.5 + 0.10 + 1.25)  # the snapshot id: claude-haiku-4-5's price
    api.push(tool_reply(editor("str_replace", path="train.py", old_str="LR = 0.01", new_str="LR = 0.02"),
                        finish("LR up"), use=use))
    mine = Prices(input=1.0, output=1.0, cache_read=1.0, cache_write=1.0)
    prop = proposer(model="claude-haiku-4-5", prices=mine).propose(make_ctx(ws, harness))
    assert prop.cost_usd == pytest.approx(1.0 + 0.1 + 1.0 + 1.0)


def test_thinking_blocks_go_back_exactly_as_received(api, lab):
    ws, harness = lab
    thinking = {"type": "thinking", "thinking": "The LR looks low.", "signature": "sig-abc123"}
    edit = editor("str_replace", path="train.py", old_str="LR = 0.01", new_str="LR = 0.02")
    api.push(Reply(body=message([thinking, edit], "tool_use")), tool_reply(finish("LR up")))
    proposer().propose(make_ctx(ws, harness))
    replayed = api.requests[1].body["messages"][1]["content"]
    assert replayed[0] == thinking and replayed[1]["type"] == "tool_use"


def test_lookup_model_reads_the_models_api(api):
    from autoresearch.proposers.anthropic import lookup_model
    from autoresearch.proposers.base import ProposerUnavailable

    assert lookup_model(CFG.__class__(model="claude-sonnet-5-5"))["lifecycle"] == "active"
    old = lookup_model(CFG.__class__(model="claude-sonnet-4-5"))
    assert old["lifecycle"] == "deprecated" and old["retires_at"] == "2026-11-30"
    with pytest.raises(ProposerUnavailable) as info:
        lookup_model(CFG.__class__(model="claude-nonexistent"))
    assert "404" in info.value.reason
    assert api.model_requests[0].path == "/v1/models/claude-sonnet-5-5" and api.model_requests[0].api_key == KEY
