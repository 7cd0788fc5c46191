"""Claude through the official `anthropic` SDK: one fresh tool-use conversation per experiment.

The model edits through Anthropic's client-side text-editor tool
(``text_editor_20250728``, named ``str_replace_based_edit_tool``: view,
str_replace, create, insert). The daemon executes every call itself, on an
IN-MEMORY copy of the editable files: nothing touches the disk here, so the
daemon can record the proposal in its event log before writing it (replay).
``view`` may read the rest of the workspace (not .git/ or .autoresearch/)
and the harness source; writes anywhere but the editable files are refused
with a tool error.

Thinking blocks in a reply (current models think by default) are sent back
unchanged within the conversation, as the API requires with tool use.

``lookup_model`` asks the Models API about the configured model (lifecycle:
active, deprecated, retired); the daemon calls it at start. Cost comes from
the model's price (config.AnthropicConfig.price); an unknown price makes the
cost ``None`` (unknown), never 0.

The model ends a proposal by calling a small custom tool, ``finish``, with a
one-line description. A tool (rather than "the final text is the
description") gives a structured, unambiguous end signal and keeps chatty
final prose out of the results table.

Failure policy (the daemon builds on it):
  * no edit -> a short nudge, up to ``max_nudges``, then ``NoEdit`` (fallback);
  * 429/5xx/529/timeouts/dropped connections -> retried here with backoff and
    jitter, honouring ``retry-after``; after ``block_after_failures``
    consecutive failures -> ``ProposerUnavailable`` (daemon goes `blocked`);
  * 401/403 (and a missing key, unknown model, billing) -> ``ProposerAuthError``
    at once, no retries.
The SDK's own retries are off (``max_retries=0``) so that this policy, the
proposal deadline and ``ctx.cancel`` are the only ones in charge. ``cancel``
is honoured between API calls and during backoff waits; a call in flight is
bounded by ``timeout_seconds``. Nothing here needs cleaning up, so a daemon
that is stopping may also simply abandon the worker thread.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import anthropic

from .. import secrets
from .base import NoEdit, Proposal, ProposalContext, ProposerAuthError, ProposerUnavailable
from .prompt import experiment_prompt, one_line, system_prompt

EDITOR_NAME = "str_replace_based_edit_tool"
EDITOR_TOOL = {"type": "text_editor_20250728", "name": EDITOR_NAME}
FINISH_TOOL = {
    "name": "finish",
    "description": "End the proposal once your edit is made: give a one-line description of the idea.",
    "input_schema": {
        "type": "object",
        "properties": {"description": {"type": "string", "description": "One line, e.g. 'double the warmup'."}},
        "required": ["description"],
    },
}

NUDGE_NO_EDIT = ("You have not changed any editable file yet. Make your edit now with the "
                 f"{EDITOR_NAME} tool (str_replace, insert or create), then call finish.")
NUDGE_FINISH = "Your edit is recorded. Call the finish tool now with a one-line description of the idea."

VIEW_MAX_CHARS = 100_000  # a view result larger than this is cut (the file can be viewed by range)
DIR_MAX_ENTRIES = 300
RETRYABLE_STATUS = {408, 409, 429}  # plus every status >= 500 (529 = overloaded)
AUTH_STATUS = {401, 402, 403, 404}  # key, billing, permission, unknown model: a human must act
LOOKUP_TIMEOUT_S = 15.0  # the Models API lookup at start (the main loop waits for it)
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


class ToolError(Exception):
    """A tool call the model got wrong: returned to it as an is_error tool_result."""


class EditSession:
    """Executes text-editor commands against an in-memory copy of the editable files."""

    def __init__(self, workspace: Path, editable, files, harness_dir: Path | None):
        self.root = Path(workspace).resolve()
        self.harness = Path(harness_dir).resolve() if harness_dir else None
        self.editable = {str((self.root / e).resolve()): e for e in editable}
        self.original = dict(files)
        self.files = dict(files)

    # -- paths -------------------------------------------------------------
    def _resolve(self, raw) -> tuple[Path, str | None]:
        """(resolved path, editable name or None); ToolError if outside what may be read."""
        if not isinstance(raw, str) or not raw.strip():
            raise ToolError("`path` is required")
        path = Path(raw.strip())
        if not path.is_absolute():
            path = self.root / path
        resolved = path.resolve()  # symlinks and .. resolved before any containment check
        editable = self.editable.get(str(resolved))
        if editable is not None:
            return resolved, editable
        if resolved == self.root or self.root in resolved.parents:
            rel = resolved.relative_to(self.root).parts
            if rel and rel[0] in (".git", ".autoresearch"):
                raise ToolError(f"{raw}: the daemon's internals are not readable")
            return resolved, None
        if self.harness and (resolved == self.harness or self.harness in resolved.parents):
            return resolved, None
        raise ToolError(f"{raw}: outside the workspace ({self.root}) and the harness")

    def _writable(self, raw) -> str:
        _, editable = self._resolve(raw)
        if editable is None:
            names = ", ".join(sorted(self.editable.values()))
            raise ToolError(f"{raw} is read-only: only the editable files may change ({names}). Edit not applied.")
        return editable

    def _content(self, name: str, raw: str) -> str:
        if self.files.get(name) is None:
            raise ToolError(f"{raw} does not exist; use create")
        return self.files[name]

    # -- commands ----------------------------------------------------------
    def run(self, args: dict) -> str:
        if not isinstance(args, dict):
            raise ToolError("tool input must be an object")
        command = args.get("command")
        handler = {"view": self.view, "str_replace": self.str_replace,
                   "create": self.create, "insert": self.insert}.get(command)
        if handler is None:
            raise ToolError(f"unknown command {command!r}: use view, str_replace, create or insert")
        return handler(args)

    def view(self, args: dict) -> str:
        raw = args.get("path")
        resolved, editable = self._resolve(raw)
        if editable is not None:
            text = self._content(editable, raw)
        elif resolved.is_dir():
            return self._listing(resolved)
        else:
            try:
                data = resolved.read_bytes()[: VIEW_MAX_CHARS * 4]
            except FileNotFoundError:
                raise ToolError(f"{raw} does not exist") from None
            except OSError as exc:
                raise ToolError(f"{raw}: {exc.strerror}") from None
            if b"\0" in data[:8192]:
                raise ToolError(f"{raw} is a binary file")
            text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        start, end = 1, len(lines)
        view_range = args.get("view_range")
        if view_range is not None:
            try:
                start, end = int(view_range[0]), int(view_range[1])
            except (TypeError, ValueError, IndexError):
                raise ToolError("view_range must be [start_line, end_line]") from None
            end = len(lines) if end == -1 else end
            if not (1 <= start <= max(end, 1)) or end > len(lines):
                raise ToolError(f"view_range {view_range} is outside the file's {len(lines)} lines")
        out = "\n".join(f"{i:6}\t{lines[i - 1]}" for i in range(start, end + 1))
        if len(out) > VIEW_MAX_CHARS:
            out = out[:VIEW_MAX_CHARS] + "\n[… cut: view a smaller view_range …]"
        return out or "(empty file)"

    def _listing(self, directory: Path) -> str:
        entries = []
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if len(rel.parts) > 2 or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            entries.append(f"{rel}/" if path.is_dir() else str(rel))
            if len(entries) >= DIR_MAX_ENTRIES:
                entries.append("[… more entries not shown …]")
                break
        return f"{directory}:\n" + "\n".join(entries)

    def str_replace(self, args: dict) -> str:
        raw = args.get("path")
        name = self._writable(raw)
        text = self._content(name, raw)
        old, new = args.get("old_str"), args.get("new_str", "")
        if not isinstance(old, str) or old == "":
            raise ToolError("old_str is required and must not be empty")
        if not isinstance(new, str):
            raise ToolError("new_str must be a string")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"No match found for old_str in {raw}; it must match exactly, whitespace included.")
        if count > 1:
            raise ToolError(f"old_str occurs {count} times in {raw}; include more context so it is unique.")
        self.files[name] = text.replace(old, new, 1)
        line = text[: text.index(old)].count("\n") + 1
        return f"Edited {name}: replaced the text at line {line}."

    def create(self, args: dict) -> str:
        raw = args.get("path")
        name = self._writable(raw)
        body = args.get("file_text")
        if not isinstance(body, str):
            raise ToolError("file_text is required")
        self.files[name] = body
        return f"Wrote {name} ({body.count(chr(10)) + 1} lines)."

    def insert(self, args: dict) -> str:
        raw = args.get("path")
        name = self._writable(raw)
        text = self._content(name, raw)
        # The model emits `insert_text` with text_editor_20250728; older docs say `new_str`.
        new = args.get("insert_text", args.get("new_str"))
        if not isinstance(new, str):
            raise ToolError("insert_text is required")
        lines = text.split("\n")
        try:
            at = int(args.get("insert_line"))
        except (TypeError, ValueError):
            raise ToolError("insert_line must be an integer") from None
        count = len(lines) - 1 if text.endswith("\n") else len(lines)
        if not 0 <= at <= count:
            raise ToolError(f"insert_line {at} is outside 0..{count}")
        new_lines = new[:-1].split("\n") if new.endswith("\n") else new.split("\n")
        self.files[name] = "\n".join(lines[:at] + new_lines + lines[at:])
        return f"Inserted {len(new_lines)} line(s) into {name} after line {at}."

    def changed(self) -> dict[str, str]:
        return {k: v for k, v in self.files.items() if v is not None and v != self.original.get(k)}


class AnthropicProposer:
    """Proposer(cfg): cfg has model, max_tokens, timeout_seconds, max_turns,
    deadline_seconds, max_nudges, block_after_failures and price() (input, output,
    cache_read, cache_write: USD per million tokens; None when unknown)."""

    name = "anthropic"

    def __init__(self, cfg, *, api_key: str | None = None, backoff_base: float = 1.0,
                 backoff_max: float = 60.0):
        self.cfg = cfg
        self._api_key = api_key  # tests; normally read per proposal (credentials can rotate)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        secrets.install_log_guard()

    # -- bookkeeping -------------------------------------------------------
    def _cost(self, usage: dict) -> float | None:
        """USD for `usage`; None when the model has no known price (recorded as unknown, not $0)."""
        p = self.cfg.price()
        if p is None:
            return None
        return (usage["input_tokens"] * p.input + usage["output_tokens"] * p.output
                + usage["cache_read_input_tokens"] * p.cache_read
                + usage["cache_creation_input_tokens"] * p.cache_write) / 1e6

    def _spent(self, usage: dict) -> dict:
        return {"usage": dict(usage), "cost_usd": self._cost(usage)}

    # -- the conversation --------------------------------------------------
    def propose(self, ctx: ProposalContext) -> Proposal:
        key = self._api_key or secrets.load_api_key()
        if not key:
            raise ProposerAuthError(
                f"no Anthropic API key: set {secrets.ENV_NAME} or the systemd credential "
                f"{secrets.CREDENTIAL_NAME}", retry_after=300.0)
        secrets.remember(key)
        started = time.monotonic()
        deadline = min(ctx.deadline, started + self.cfg.deadline_seconds)
        usage = {k: 0 for k in USAGE_KEYS}
        session = EditSession(ctx.workspace, ctx.editable, ctx.files, ctx.harness_dir)
        system = [{"type": "text", "text": system_prompt(ctx, "tools"),
                   "cache_control": {"type": "ephemeral"}}]
        messages: list[dict] = [{"role": "user", "content": experiment_prompt(ctx)}]
        nudges = tool_errors = turns = 0
        description = ""
        client = anthropic.Anthropic(api_key=key, timeout=self.cfg.timeout_seconds, max_retries=0)
        try:
            while turns < self.cfg.max_turns and time.monotonic() < deadline:
                turns += 1
                reply = self._call(client, ctx, deadline, usage, system=system,
                                   messages=_with_rolling_cache(messages))
                for k in USAGE_KEYS:
                    usage[k] += int(getattr(reply.usage, k, 0) or 0)
                content, results, texts, finished = self._execute(session, reply)
                tool_errors += sum(1 for r in results if r.get("is_error"))
                if not content:  # the API rejects an empty assistant turn
                    content.append({"type": "text", "text": "(no reply)"})
                messages.append({"role": "assistant", "content": content})
                edited = bool(session.changed())
                if finished is not None:
                    description = one_line(str(finished))
                    break
                if results:
                    if not edited and any(r.get("_finish_refused") for r in results):
                        nudges += 1
                        if nudges > self.cfg.max_nudges:
                            break
                    for r in results:
                        r.pop("_finish_refused", None)
                    messages.append({"role": "user", "content": results})
                    continue
                # No tool call at all: a nudge, or accept prose as the end when there is an edit.
                nudges += 1
                if nudges > self.cfg.max_nudges:
                    if edited:
                        description = one_line(texts[-1] if texts else "")
                    break
                messages.append({"role": "user", "content": NUDGE_FINISH if edited else NUDGE_NO_EDIT})
        finally:
            client.close()

        changed = session.changed()
        meta = {"turns": turns, "nudges": nudges, "tool_errors": tool_errors,
                "model": self.cfg.model, "seconds": round(time.monotonic() - started, 3)}
        if not changed:
            why = ("deadline passed" if time.monotonic() >= deadline else
                   f"{turns} turns used" if turns >= self.cfg.max_turns else f"{nudges - 1} nudges ignored")
            raise NoEdit(f"the model made no edit ({why})", **self._spent(usage))
        if not description:
            description = "edit " + ", ".join(sorted(changed))
        return Proposal(description=description, files=changed, proposer=self.name,
                        usage=usage, cost_usd=self._cost(usage), meta=meta)

    def _execute(self, session: EditSession, reply):
        """Run the reply's tool calls in order. Returns (assistant content to replay,
        tool results, texts, the finish description or None)."""
        content, results, texts, finished = [], [], [], None
        # A reply cut off at max_tokens may carry a tool call with truncated input (a
        # str_replace missing its new_str would delete code): run none of its calls.
        cut_off = reply.stop_reason == "max_tokens"
        for block in reply.content:
            if block.type in ("thinking", "redacted_thinking"):
                # Thinking (on by default on current models) must go back exactly as received,
                # signature included, or the next call with our tool results is refused.
                content.append(block.to_dict())
            elif block.type == "text":
                content.append({"type": "text", "text": block.text})
                texts.append(block.text)
            elif block.type == "tool_use":
                content.append({"type": "tool_use", "id": block.id, "name": block.name,
                                "input": block.input})
                result = self._tool(session, block) if not cut_off else {
                    "type": "tool_result", "tool_use_id": block.id, "is_error": True,
                    "content": "Your reply hit max_tokens, so this call may be incomplete; it was "
                               "not executed. Make smaller edits."}
                if block.name == "finish" and not result.get("is_error"):
                    finished = block.input.get("description", "") if isinstance(block.input, dict) else ""
                results.append(result)
        return content, results, texts, finished

    def _tool(self, session: EditSession, block) -> dict:
        result = {"type": "tool_result", "tool_use_id": block.id}
        try:
            if block.name == EDITOR_NAME:
                text = session.run(block.input)
            elif block.name == "finish":
                if not session.changed():
                    result["_finish_refused"] = True
                    raise ToolError("No edit has been made yet: " + NUDGE_NO_EDIT)
                text = "Proposal recorded."
            else:
                raise ToolError(f"unknown tool {block.name!r}")
        except ToolError as exc:
            result.update(content=str(exc), is_error=True)
            return result
        result["content"] = text
        return result

    # -- one API call with our retry policy --------------------------------
    def _call(self, client, ctx: ProposalContext, deadline: float, usage: dict, **body):
        failures = 0
        while True:
            if ctx.cancel.is_set():
                raise ProposerUnavailable("proposal cancelled", **self._spent(usage))
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                raise ProposerUnavailable("proposal deadline passed while waiting for the API",
                                          **self._spent(usage))
            retry_after = None
            try:
                reply = client.messages.create(
                    model=self.cfg.model, max_tokens=self.cfg.max_tokens,
                    tools=[EDITOR_TOOL, FINISH_TOOL],
                    timeout=min(float(self.cfg.timeout_seconds), remaining), **body)
                if isinstance(reply.content, list) and reply.usage is not None:
                    return reply
                # The SDK does not validate bodies strictly: a proxy's garbage is transient.
                reason = "Anthropic API returned a malformed reply"
            except anthropic.APIStatusError as exc:
                status = exc.status_code
                detail = secrets.redact(one_line(str(exc.api_message or exc.type or ""), 160))
                if status in AUTH_STATUS:
                    what = {401: "invalid API key", 402: "billing problem", 403: "permission denied",
                            404: f"model {self.cfg.model!r} not found"}[status]
                    raise ProposerAuthError(f"Anthropic API: {what} (HTTP {status}): {detail}",
                                            retry_after=600.0, **self._spent(usage)) from None
                if status not in RETRYABLE_STATUS and status < 500:
                    # A malformed request repeats forever: give up on this experiment only.
                    raise NoEdit(f"Anthropic API refused the request (HTTP {status}): {detail}",
                                 **self._spent(usage)) from None
                reason = f"Anthropic API HTTP {status}: {detail}"
                retry_after = _retry_after(exc.response.headers)
            except anthropic.APITimeoutError:
                reason = f"Anthropic API call timed out after {min(self.cfg.timeout_seconds, remaining):.1f}s"
            except anthropic.APIConnectionError as exc:
                reason = f"Anthropic API connection failed: {secrets.redact(one_line(str(exc.__cause__ or exc), 160))}"
            except anthropic.APIError as exc:  # e.g. an unparsable body from a proxy: transient
                reason = f"Anthropic API error: {secrets.redact(one_line(str(exc), 160))}"
            failures += 1
            backoff = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            delay = max(retry_after or 0.0, backoff) * random.uniform(1.0, 1.2)  # jitter: never earlier
            if failures >= self.cfg.block_after_failures:
                raise ProposerUnavailable(f"{reason} ({failures} failures in a row)", retry_after=delay,
                                          **self._spent(usage))
            if delay >= deadline - time.monotonic():
                raise ProposerUnavailable(f"{reason}; retry would pass the proposal deadline",
                                          retry_after=delay, **self._spent(usage))
            if ctx.cancel.wait(delay):
                raise ProposerUnavailable("proposal cancelled", **self._spent(usage))


def lookup_model(cfg, api_key: str | None = None) -> dict:
    """The configured model as the Models API describes it: id, display_name, lifecycle
    (active | deprecated | retired), deprecated_at, retires_at (ISO dates or None).

    Raises ProposerAuthError for a missing or rejected key, ProposerUnavailable when the API
    cannot say (outage, a gateway without /v1/models, a model it does not list): the caller
    decides what an unknown lifecycle means. One call, no retries, a short timeout: the daemon
    makes it from its main loop.
    """
    key = api_key or secrets.load_api_key()
    if not key:
        raise ProposerAuthError(f"no Anthropic API key: set {secrets.ENV_NAME} or the systemd credential "
                                f"{secrets.CREDENTIAL_NAME}", retry_after=300.0)
    secrets.remember(key)
    client = anthropic.Anthropic(api_key=key, timeout=min(float(cfg.timeout_seconds), LOOKUP_TIMEOUT_S),
                                 max_retries=0)
    try:
        info = client.models.retrieve(cfg.model)
    except anthropic.APIStatusError as exc:
        detail = secrets.redact(one_line(str(exc.api_message or exc.type or ""), 160))
        if exc.status_code in (401, 403):
            raise ProposerAuthError(f"Anthropic API: key rejected (HTTP {exc.status_code}): {detail}",
                                    retry_after=600.0) from None
        raise ProposerUnavailable(f"Models API HTTP {exc.status_code}: {detail}") from None
    except anthropic.APIError as exc:
        raise ProposerUnavailable(f"Models API: {secrets.redact(one_line(str(exc.__cause__ or exc), 160))}") from None
    finally:
        client.close()

    def day(value):
        return value.date().isoformat() if value is not None else None

    return {"id": info.id, "display_name": info.display_name, "lifecycle": info.lifecycle,
            "deprecated_at": day(info.deprecated_at), "retires_at": day(info.retires_at)}


def _with_rolling_cache(messages: list[dict]) -> list[dict]:
    """The conversation with a cache breakpoint on its last block.

    Each turn re-sends the whole conversation; marking its end lets the next
    turn read everything before it from the cache (2 breakpoints in all,
    with the system prompt's; the API allows 4). The stored history is not
    modified, so earlier breakpoints do not pile up.
    """
    last = messages[-1]
    content = last["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]
    blocks[-1]["cache_control"] = {"type": "ephemeral"}
    return messages[:-1] + [{"role": last["role"], "content": blocks}]


def _retry_after(headers) -> float | None:
    """Seconds from retry-after-ms or retry-after (seconds only; dates are rare here)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                seconds = float(value) / scale
            except ValueError:
                continue
            if 0 <= seconds <= 3600:
                return seconds
    return None
