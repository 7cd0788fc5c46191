"""AnthropicProposer against a misbehaving API: rate limits, overload, 5xx, dropped
connections, slow replies, bad keys, cancellation, and a canary key that must never leak."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from autoresearch import secrets
from autoresearch.config import AnthropicConfig
from autoresearch.proposers.anthropic import AnthropicProposer
from autoresearch.proposers.base import NoEdit, ProposerAuthError, ProposerUnavailable
from tests.anthropic_fake import (fake_api_for_sdk, Reply, editor, error_reply, finish, text_reply,
                                  tool_reply)
from tests.proposer_fixtures import make_ctx, make_workspace

CANARY = "sk-ant-api03-CANARY-7f3e9a1b2c4d5e6f"
CFG = AnthropicConfig(model="claude-test", max_tokens=1024, timeout_seconds=2, max_turns=8,
                      deadline_seconds=30, max_nudges=2, block_after_failures=3)


@pytest.fixture
def api(monkeypatch):
    with fake_api_for_sdk(monkeypatch, CANARY) as fake:
        yield fake


@pytest.fixture
def lab(tmp_path):
    return make_workspace(tmp_path)


def proposer(**overrides):
    return AnthropicProposer(dataclasses.replace(CFG, **overrides), backoff_base=0.01)


def success():
    return [tool_reply(editor("str_replace", path="train.py", old_str="LR = 0.01", new_str="LR = 0.02")),
            tool_reply(finish("lr 0.02"))]


def test_429_retry_after_is_honoured(api, lab):
    ws, harness = lab
    api.push(error_reply(429, "rate_limit_error", "slow down", headers={"retry-after": "1"}), *success())
    prop = proposer().propose(make_ctx(ws, harness))
    waited = api.requests[1].at - api.requests[0].at
    assert 1.0 <= waited < 1.6  # at least retry-after, plus at most 20 % jitter (and some slack)
    assert prop.description == "lr 0.02"


def test_retry_after_ms_is_preferred(api, lab):
    ws, harness = lab
    api.push(error_reply(429, "rate_limit_error", headers={"retry-after-ms": "300", "retry-after": "30"}),
             *success())
    proposer().propose(make_ctx(ws, harness))
    assert 0.3 <= api.requests[1].at - api.requests[0].at < 1.0


@pytest.mark.parametrize("failure", [
    error_reply(529, "overloaded_error", "Overloaded"),
    error_reply(500, "api_error", "Internal server error"),
    error_reply(503, "api_error", "unavailable"),
    Reply(drop=True),
], ids=["529-overloaded", "500", "503", "dropped-connection"])
def test_transient_failures_are_retried(api, lab, failure):
    ws, harness = lab
    api.push(failure, failure, *success())
    prop = proposer().propose(make_ctx(ws, harness))
    assert len(api.requests) == 4
    assert "LR = 0.02" in prop.files["train.py"]


def test_reply_slower_than_timeout_is_abandoned_and_retried(api, lab):
    ws, harness = lab
    slow = tool_reply(finish("too late"))
    slow.delay = 5.0
    api.push(slow, *success())
    started = time.monotonic()
    prop = proposer(timeout_seconds=0.5).propose(make_ctx(ws, harness))
    elapsed = time.monotonic() - started
    assert prop.description == "lr 0.02"
    assert 0.5 <= api.requests[1].at - api.requests[0].at < 2.0
    assert elapsed < 4.0, "the proposer waited for the slow reply instead of timing out"


def test_garbled_success_body_is_retried(api, lab):
    ws, harness = lab
    api.push(Reply(status=200, body=None), *success())
    prop = proposer().propose(make_ctx(ws, harness))
    assert prop.description == "lr 0.02" and len(api.requests) == 3


def test_persistent_failure_becomes_unavailable_after_the_threshold(api, lab):
    ws, harness = lab
    api.push(*[error_reply(529, "overloaded_error", "Overloaded")] * 3)
    with pytest.raises(ProposerUnavailable) as info:
        proposer(block_after_failures=3).propose(make_ctx(ws, harness))
    assert not isinstance(info.value, ProposerAuthError)
    assert len(api.requests) == 3
    assert "529" in info.value.reason and "3 failures" in info.value.reason
    assert info.value.retry_after and info.value.retry_after > 0


def test_failure_counter_resets_after_a_success(api, lab):
    ws, harness = lab
    e = error_reply(500)
    view = tool_reply(editor("view", path="train.py"))
    api.push(e, e, view, e, e, *success())  # never 3 failures in a row
    prop = proposer(block_after_failures=3).propose(make_ctx(ws, harness))
    assert prop.description == "lr 0.02" and len(api.requests) == 7


def test_retry_after_beyond_the_deadline_blocks_at_once(api, lab):
    ws, harness = lab
    api.push(error_reply(429, "rate_limit_error", headers={"retry-after": "120"}))
    started = time.monotonic()
    with pytest.raises(ProposerUnavailable) as info:
        proposer().propose(make_ctx(ws, harness, deadline_s=5))
    assert time.monotonic() - started < 2
    assert info.value.retry_after >= 120
    assert len(api.requests) == 1


@pytest.mark.parametrize("status,kind", [(401, "authentication_error"), (403, "permission_error")])
def test_bad_key_is_auth_error_after_exactly_one_request(api, lab, status, kind):
    ws, harness = lab
    api.push(error_reply(status, kind, "invalid x-api-key"))
    with pytest.raises(ProposerAuthError) as info:
        proposer().propose(make_ctx(ws, harness))
    assert len(api.requests) == 1
    assert f"HTTP {status}" in info.value.reason
    assert info.value.retry_after >= 60  # long backoff: no retry storm from the daemon either


def test_cancel_interrupts_a_backoff_wait(api, lab):
    ws, harness = lab
    api.push(error_reply(429, "rate_limit_error", headers={"retry-after": "20"}))
    ctx = make_ctx(ws, harness, deadline_s=60)
    threading.Timer(0.3, ctx.cancel.set).start()
    started = time.monotonic()
    with pytest.raises(ProposerUnavailable) as info:
        proposer().propose(ctx)
    assert time.monotonic() - started < 2
    assert "cancelled" in info.value.reason


def test_canary_key_never_leaks(api, lab, caplog, capfd):
    """Errors whose bodies echo the key, connection failures and debug logging:
    the key must appear in no exception, log record or output."""
    ws, harness = lab
    caplog.set_level(logging.DEBUG)
    secrets.install_log_guard()
    raised = []
    api.push(error_reply(500, "api_error", f"backend saw key {CANARY}"), Reply(drop=True),
             *success())
    prop = proposer().propose(make_ctx(ws, harness))
    api.push(error_reply(401, "authentication_error", f"invalid x-api-key: {CANARY}"))
    with pytest.raises(ProposerAuthError) as auth:
        proposer().propose(make_ctx(ws, harness))
    raised.append(auth.value)
    api.push(*[error_reply(529, "overloaded_error", f"overloaded ({CANARY})")] * 3)
    with pytest.raises(ProposerUnavailable) as unavailable:
        proposer().propose(make_ctx(ws, harness))
    raised.append(unavailable.value)
    api.push(text_reply(f"my key is {CANARY}"), text_reply("no"), text_reply("no"))
    with pytest.raises(NoEdit) as noedit:
        proposer().propose(make_ctx(ws, harness))
    raised.append(noedit.value)
    logging.getLogger("autoresearch.test").warning("an error: %s", auth.value)

    assert all(r.api_key == CANARY for r in api.requests)  # the key was really in use
    out, err = capfd.readouterr()
    for text in [out, err, caplog.text, repr(prop), *[repr(e) + str(e) + repr(vars(e)) for e in raised]]:
        assert CANARY not in text
    assert "[REDACTED]" in raised[0].reason  # the echoed key was scrubbed, not just dropped
    # Prompts are not logged either: the SDK and HTTP loggers are pinned to WARNING.
    assert "Try learning-rate ideas first." not in caplog.text
    assert logging.getLogger("anthropic").level == logging.WARNING
    assert logging.getLogger("httpx2").level == logging.WARNING


def test_redact_and_log_filter():
    secrets.remember("my-very-secret-token")
    assert secrets.redact("a my-very-secret-token b") == "a [REDACTED] b"
    assert secrets.redact("key sk-ant-api03-abcdefghijkl here") == "key [REDACTED] here"
    assert secrets.redact_obj({"x": ["my-very-secret-token", 3]}) == {"x": ["[REDACTED]", 3]}
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "got %s", ("my-very-secret-token",), None)
    assert secrets.RedactingFilter().filter(record)
    assert record.getMessage() == "got [REDACTED]"
    assert secrets.structlog_redactor(None, "info", {"event": "k=my-very-secret-token"}) == {"event": "k=[REDACTED]"}


def test_load_api_key_sources(tmp_path):
    assert secrets.load_api_key({"ANTHROPIC_API_KEY": " sk-ant-env-key-123 \n"}) == "sk-ant-env-key-123"
    (tmp_path / "anthropic_api_key").write_text("sk-ant-cred-key-456\n")
    assert secrets.load_api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-ant-cred-key-456"
    assert secrets.load_api_key({"CREDENTIALS_DIRECTORY": str(tmp_path / "nope")}) is None
    assert secrets.load_api_key({}) is None
