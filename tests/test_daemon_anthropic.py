"""The daemon driving the real anthropic SDK against a Messages API server on loopback.

End to end: three experiments, usage and cost recorded, a canary key that must
leave no trace; an outage and a bad key make the daemon `blocked` without
burning experiments; a reply recorded before a crash is never requested again.
"""

import signal

from anthropic_fake import FakeAnthropic, error_reply, model_info, tweak_constant
from daemon_fixtures import cli, events, make_workspace, state

CANARY = "sk-ant-api03-CANARY-" + "c4n4ry" * 8


def _workspace(tmp_path, **anthropic):
    return make_workspace(tmp_path / "ws", proposer={"kind": "anthropic", "fallback": "reject"},
                          anthropic={"timeout_seconds": 2.0, "deadline_seconds": 30.0,
                                     "block_after_failures": 2, **anthropic})


def _env(api):
    return {"ANTHROPIC_API_KEY": CANARY, "ANTHROPIC_BASE_URL": api.url}


def _leaks(root, *texts):
    """Every place the key could have leaked to: state dir files (log, events, runs) and outputs."""
    found = [str(p) for p in (root / ".autoresearch").rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    found += [f"output {i}" for i, t in enumerate(texts) if CANARY in t]
    return found


def test_three_experiments_with_claude(tmp_path):
    root = _workspace(tmp_path)
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        out = cli("run", str(root), "--max-experiments", "3", env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
        assert not api.errors
        requests = list(api.requests)
    st = state(root)
    exps = [st.experiments[n] for n in (1, 2, 3)]
    assert all(e.terminal and e.proposer == "anthropic" for e in exps), [(e.state, e.reason) for e in exps]
    assert all(e.state in ("kept", "discarded") and "->" in e.description for e in exps)
    assert len(requests) == 3  # one reply per experiment, a fresh conversation each time
    for req in requests:
        assert req.api_key == CANARY
        assert len(req.body["messages"]) == 1  # nothing grows across experiments
    assert all(e.usage.get("input_tokens", 0) > 0 and e.cost_usd > 0 for e in exps)
    assert st.cost_usd > 0
    status = cli("status", str(root))
    results = cli("results", str(root))
    assert "$" in status.stdout and "cost $" in results.stderr
    show = cli("show", str(root), "1")
    cost = next(line for line in show.stdout.splitlines() if line.startswith("cost:"))
    u = exps[0].usage
    assert cost == (f"cost:        ${exps[0].cost_usd:.4f} (tokens in {u['input_tokens']}, out {u['output_tokens']}, "
                    f"cache read {u.get('cache_read_input_tokens', 0)}, "
                    f"cache write {u.get('cache_creation_input_tokens', 0)})"), cost  # no raw dict
    assert _leaks(root, out.stdout, out.stderr, status.stdout, results.stdout, results.stderr, show.stdout) == []


def test_an_outage_blocks_without_burning_experiments(tmp_path):
    root = _workspace(tmp_path)
    with FakeAnthropic() as api:
        api.default = lambda req: error_reply(529, "overloaded_error", "Overloaded")
        out = cli("run", str(root), "--for", "9s", env=_env(api), timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        calls = len(api.requests)
    st = state(root)
    blocks = [e for e in events(root) if e.trigger == "block"]
    assert blocks and "proposer unavailable" in blocks[0].payload["reason"]
    assert st.experiments[1].state == "interrupted"  # stopped while waiting: not crashed, not counted
    assert st.counts() == {"kept": 0, "discarded": 0, "crashed": 0, "rejected": 0}
    assert 2 <= calls <= 10  # retried with backoff, no storm
    assert _leaks(root, out.stdout, out.stderr) == []


def test_a_rejected_key_blocks_after_one_request(tmp_path):
    root = _workspace(tmp_path, timeout_seconds=20.0)  # no timeout-retry on a loaded machine
    with FakeAnthropic() as api:
        api.default = lambda req: error_reply(401, "authentication_error", f"invalid x-api-key {CANARY}")
        out = cli("run", str(root), "--for", "6s", env=_env(api), timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(api.requests) == 1
    st = state(root)
    block = next(e for e in events(root) if e.trigger == "block")
    assert block.payload["reason"].startswith("API key rejected")
    assert st.counts() == {"kept": 0, "discarded": 0, "crashed": 0, "rejected": 0}
    assert _leaks(root, out.stdout, out.stderr) == []


def test_a_recorded_reply_is_reapplied_not_requested_again(tmp_path):
    root = _workspace(tmp_path)
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        out = cli("run", str(root), "--max-experiments", "1",
                  env={**_env(api), "AUTORESEARCH_CRASH_AT": "post:proposed"})
        assert out.returncode == -signal.SIGKILL
        assert len(api.requests) == 1
        recorded = state(root).experiments[1].files
        out = cli("run", str(root), "--max-experiments", "1", env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
        # The restart re-applied the recorded edit for experiment 1; it may go on to ask for
        # experiment 2, but never again for experiment 1.
        assert sum("# Experiment 1\n" in r.text(0) for r in api.requests) == 1
    exp = state(root).experiments[1]
    assert exp.terminal and exp.files == recorded and exp.interrupts == 1


def test_the_cost_cap_exhausts_the_daemon(tmp_path):
    root = make_workspace(tmp_path / "ws", proposer={"kind": "anthropic", "fallback": "reject"},
                          anthropic={"timeout_seconds": 20.0, "deadline_seconds": 30.0},
                          limits={"max_cost_usd": 0.0001})
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        out = cli("run", str(root), env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(api.requests) == 1
    st = state(root)
    assert st.daemon == "exhausted" and "max_cost_usd" in st.reason and st.cost_usd >= 0.0001
    assert st.experiments[1].state in ("kept", "discarded")
    # The one started ahead was never asked for (no request): it waits, interrupted, for a new cap.
    assert all(e.state == "interrupted" and not e.files for n, e in st.experiments.items() if n > 1)


def test_a_deprecated_model_is_shown_in_status_and_the_log(tmp_path):
    root = _workspace(tmp_path, model="claude-sonnet-4-5")
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        out = cli("run", str(root), "--max-experiments", "1", env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
        assert [r.path for r in api.model_requests] == ["/v1/models/claude-sonnet-4-5"]
    note = next(e for e in events(root) if e.payload.get("kind") == "model")
    assert note.payload["lifecycle"] == "deprecated" and note.payload["retires_at"] == "2026-11-30"
    status = cli("status", str(root))
    assert "model:      claude-sonnet-4-5 (deprecated, retires 2026-11-30)" in status.stdout
    daemon_log = (root / ".autoresearch" / "daemon.log").read_text()
    assert "model claude-sonnet-4-5 is deprecated" in daemon_log
    assert state(root).experiments[1].state in ("kept", "discarded")  # deprecated still works


def test_a_retired_model_blocks_with_a_clear_reason(tmp_path):
    root = _workspace(tmp_path, model="claude-3-7-sonnet-20250219")
    with FakeAnthropic() as api:
        api.default = tweak_constant()
        out = cli("run", str(root), "--for", "4s", env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
        assert api.requests == []  # not one Messages API call
    block = next(e for e in events(root) if e.trigger == "block")
    assert block.payload["reason"].startswith("model claude-3-7-sonnet-20250219 is retired (Models API): "
                                              "set anthropic.model in autoresearch.toml")
    assert not any(e.trigger == "begin_baseline" for e in events(root))  # blocked before the baseline
    status = cli("status", str(root))
    assert "model:      claude-3-7-sonnet-20250219 (retired)" in status.stdout


def test_an_unpriced_model_records_cost_unknown_never_zero(tmp_path):
    root = _workspace(tmp_path, model="claude-unlisted-9")
    with FakeAnthropic() as api:
        api.models["claude-unlisted-9"] = model_info("claude-unlisted-9")
        api.default = tweak_constant()
        out = cli("run", str(root), "--max-experiments", "1", env=_env(api))
        assert out.returncode == 0, out.stderr[-2000:]
    st = state(root)
    assert st.cost_unknown and st.cost_usd == 0 and st.usage["input_tokens"] > 0
    status, results = cli("status", str(root)), cli("results", str(root))
    assert "cost unknown" in status.stdout and "cost unknown" in results.stderr
    assert "$0.00" not in status.stdout + results.stderr
    show = cli("show", str(root), "1")
    assert "cost:        unknown" in show.stdout


def test_a_cost_cap_needs_a_price(tmp_path):
    root = make_workspace(tmp_path / "ws", proposer={"kind": "anthropic"}, anthropic={"model": "claude-unlisted-9"})
    (root / "autoresearch.toml").write_text((root / "autoresearch.toml").read_text().replace(
        "max_cost_usd = 0.0", "max_cost_usd = 5.0"))
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 2 and not (root / ".autoresearch" / "events.sqlite").exists()
    assert "limits.max_cost_usd needs a price for anthropic.model 'claude-unlisted-9'" in out.stderr
