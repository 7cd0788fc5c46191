"""autoresearch.toml -> Config.

Every key has a default, so a minimal config is just `[run] command = ...`.
Unknown tables or keys are errors (a typo must not silently fall back to a
default). Errors are raised as ConfigError with one line naming the key.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

CONFIG_NAME = "autoresearch.toml"
DEFAULT_METRIC_REGEX = r"^val_bpb:\s*([-+]?(?:nan|inf)|[0-9.eE+-]+)"
DEFAULT_MEMORY_REGEX = r"^peak_vram_mb:\s*([0-9.]+)"
# The human's channel: program.md and autoresearch.toml; never the agent's, never reset.
# Defined here rather than in workspace.py (which re-exports it, and is where callers take it
# from) so that checking a config never imports git.
HUMAN_FILES = ("program.md", CONFIG_NAME)


def never_editable(path: str) -> bool:
    """Whatever the config says: the human's files, .gitignore (it decides what git sees), the
    state directory and git's own. ``path`` is relative and normalised."""
    return path in HUMAN_FILES or path == ".gitignore" or path.split("/")[0] in (".autoresearch", ".git")


@dataclass(frozen=True)
class RunConfig:
    command: str = "python train.py"
    prepare_command: str = ""
    metric_regex: str = DEFAULT_METRIC_REGEX
    memory_regex: str = DEFAULT_MEMORY_REGEX
    direction: str = "minimize"
    budget_seconds: float = 60.0
    deadline_seconds: float = 0.0  # 0 -> 2 * budget + 120
    log_max_bytes: int = 20_000_000
    editable: tuple[str, ...] = ("train.py",)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)

    @property
    def prepare_argv(self) -> list[str]:
        return shlex.split(self.prepare_command)

    @property
    def hard_deadline(self) -> float:
        return self.deadline_seconds or 2 * self.budget_seconds + 120


@dataclass(frozen=True)
class JudgeConfig:
    min_delta: float = 0.0
    simplicity: bool = False
    noise_runs: int = 0
    merge: bool = True  # an experiment that beat its parent but not a best that moved meanwhile: merge it



@dataclass(frozen=True)
class ProposerConfig:
    kind: str = "offline"
    seed: int = 0
    fallback: str = "offline"


@dataclass(frozen=True)
class Prices:
    """USD per million tokens (cache_write: the 5-minute cache, the one the proposer uses)."""

    input: float = 0.0
    output: float = 0.0
    cache_read: float = 0.0
    cache_write: float = 0.0


# Anthropic's list prices (USD per million tokens), as published at the end of November 2026.
# A model not listed here has no known price: its cost is recorded as unknown (never $0) unless
# [anthropic.prices] in autoresearch.toml gives one.
PRICES = {
    "claude-sonnet-5-5": Prices(input=2.0, output=10.0, cache_read=0.10, cache_write=2.50),
    "claude-sonnet-5": Prices(input=2.0, output=10.0, cache_read=0.20, cache_write=2.50),
    "claude-opus-5-5": Prices(input=4.0, output=20.0, cache_read=0.20, cache_write=5.00),
    "claude-opus-5": Prices(input=5.0, output=25.0, cache_read=0.50, cache_write=6.25),
    "claude-opus-4-8": Prices(input=5.0, output=25.0, cache_read=0.50, cache_write=6.25),
    "claude-opus-4-7": Prices(input=5.0, output=25.0, cache_read=0.50, cache_write=6.25),
    "claude-opus-4-6": Prices(input=5.0, output=25.0, cache_read=0.50, cache_write=6.25),
    "claude-opus-4-5": Prices(input=5.0, output=25.0, cache_read=0.50, cache_write=6.25),
    "claude-sonnet-4-6": Prices(input=3.0, output=15.0, cache_read=0.30, cache_write=3.75),
    "claude-sonnet-4-5": Prices(input=3.0, output=15.0, cache_read=0.30, cache_write=3.75),
    "claude-haiku-4-5": Prices(input=1.0, output=5.0, cache_read=0.10, cache_write=1.25),
    "claude-fable-5-1": Prices(input=10.0, output=50.0, cache_read=0.25, cache_write=12.50),
}
_SNAPSHOT = re.compile(r"-\d{8}$")  # claude-haiku-4-5-20251001 is priced as claude-haiku-4-5


@dataclass(frozen=True)
class AnthropicConfig:
    model: str = "claude-sonnet-5-5"
    max_tokens: int = 16384  # per reply, adaptive thinking included
    timeout_seconds: float = 120.0
    max_turns: int = 30
    deadline_seconds: float = 900.0
    max_nudges: int = 2
    block_after_failures: int = 3
    # None: the built-in price of `model` (PRICES). A table in the config replaces it.
    prices: Prices | None = field(default=None, metadata={"table": Prices})

    def price(self) -> Prices | None:
        """What this model's tokens cost: [anthropic.prices], else the built-in table, else None."""
        if self.prices is not None:
            return self.prices
        return PRICES.get(self.model) or PRICES.get(_SNAPSHOT.sub("", self.model))


@dataclass(frozen=True)
class CommandConfig:
    argv: tuple[str, ...] = ()
    deadline_seconds: float = 1800.0


@dataclass(frozen=True)
class LimitsConfig:
    max_experiments: int = 0
    max_hours: float = 0.0
    max_cost_usd: float = 0.0
    max_interrupts: int = 3


@dataclass(frozen=True)
class SandboxConfig:
    mode: str = "auto"
    memory_mb: int = 0
    max_processes: int = 4096
    max_file_mb: int = 4096
    read_only: tuple[str, ...] = ()  # more host paths a run may read (a dataset, say)


@dataclass(frozen=True)
class SlotsConfig:
    """How many experiments run at once, and on which GPUs."""

    # An integer >= 1, or "auto": one per visible GPU (1 without GPUs); see slot_count.
    count: int | str = field(default=1, metadata={"words": ("auto",)})
    # Slot k runs with CUDA_VISIBLE_DEVICES=gpus[k] (nvidia-smi's index or a UUID); empty: the
    # visible GPUs in turn, or with one slot every visible GPU (gpus.slot_gpus).
    gpus: tuple[str, ...] = field(default=(), metadata={"ints": True})
    lookahead: int = 1  # proposals prepared ahead, so that a freed slot launches at once
    allow_mixed_gpus: bool = False  # runs on different GPU models are not comparable under a time budget


@dataclass(frozen=True)
class ExecutorConfig:
    """Where runs execute."""

    kind: str = "local"  # local | ray (the `ray` extra: runs on a Ray cluster, see docs/CLUSTER.md)


@dataclass(frozen=True)
class RayConfig:
    """The Ray cluster runs go to, when [executor] kind = "ray"."""

    address: str = "auto"  # as for ray.init: "auto", "ray://head:10001", "host:port", or "local" (start one here)
    num_gpus: float = 1.0  # per run (a fraction shares a GPU)
    accelerator_type: str = ""  # e.g. "H100": every run on one GPU model, so that budgets compare


@dataclass(frozen=True)
class WorkloadConfig:
    """Read by the built-in trainer; the daemon only checks that the profile never changes."""

    profile: str = ""
    data: str = ""
    data_url: str = ""


@dataclass(frozen=True)
class EvalConfig:
    """The human's evaluation step, run after each training run in a sandbox of its own (the
    run's checkout read-only); the metric regex reads its output only. Empty command: the
    built-in workload's evaluator, else none (the metric comes from the run's own output)."""

    command: str = ""
    files: tuple[str, ...] = ()  # the evaluation's own files: the human's, never editable
    deadline_seconds: float = 0.0  # 0 -> run.deadline's rule (2 x budget + 120)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)


@dataclass(frozen=True)
class NotifyConfig:
    """The human's notification hook (alerts.py); empty command: none."""

    command: str = ""
    events: tuple[str, ...] = ("new_best", "blocked", "exhausted", "stopped", "restarted")
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    anthropic: AnthropicConfig = field(default_factory=AnthropicConfig)
    command: CommandConfig = field(default_factory=CommandConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)


def slot_count(cfg: Config, gpus: Sequence[object]) -> int:
    """Slots in use: ``count``, or for "auto" one per listed GPU (``slots.gpus``), else one per
    visible GPU (``gpus``, e.g. gpus.visible()), at least 1."""
    count = cfg.slots.count
    if count != "auto":
        return int(count)
    return len(cfg.slots.gpus) or max(1, len(gpus))


def _build(cls, table: Any, where: str):
    """Build dataclass `cls` from a TOML table, checking names and types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{CONFIG_NAME}: [{where}] must be a table, got {table!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        what = f"key {where}.{unknown[0]}" if where else f"table [{unknown[0]}]"
        raise ConfigError(f"{CONFIG_NAME}: unknown {what}")
    if cls is Prices and set(table) != set(known):
        # Half a price list would price some tokens at $0: all four or none.
        raise ConfigError(f"{CONFIG_NAME}: [{where}] needs input, output, cache_read and cache_write "
                          "(USD per million tokens)")
    values = {}
    for name, value in table.items():
        key = f"{where}.{name}" if where else name
        default = getattr(cls(), name)
        meta = known[name].metadata
        sub = meta.get("table")  # an optional table (None when absent)
        if is_dataclass(default) or sub is not None:
            values[name] = _build(sub or type(default), value, key)
            continue
        words = meta.get("words", ())  # strings an integer key also takes ("auto")
        if words and isinstance(value, str):
            if value not in words:
                raise ConfigError(f"{CONFIG_NAME}: {key} must be an integer or "
                                  f"{' or '.join(repr(w) for w in words)}, got {value!r}")
            values[name] = value
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be a string, got {value!r}")
        elif isinstance(default, tuple) and meta.get("ints"):  # GPU ids: 0 and "0" are the same
            if not isinstance(value, list) or not all(
                    isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                    for v in value):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be a list of strings or non-negative integers")
            value = tuple(str(v) for v in value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{CONFIG_NAME}: {key} must be a list of strings")
            value = tuple(value)
        else:  # pragma: no cover - a new field type without a rule
            raise AssertionError(f"no rule for {key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{CONFIG_NAME}: {key} must not be negative")
        values[name] = value
    return cls(**values)


def _validate(cfg: Config) -> None:
    run = cfg.run
    try:
        argv = run.argv
    except ValueError as exc:
        raise ConfigError(f"{CONFIG_NAME}: run.command cannot be parsed: {exc}") from None
    if not argv:
        raise ConfigError(f"{CONFIG_NAME}: run.command is empty")
    if run.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{CONFIG_NAME}: run.direction must be 'minimize' or 'maximize'")
    if not run.metric_regex:
        raise ConfigError(f"{CONFIG_NAME}: run.metric_regex is empty")
    for key in ("metric_regex", "memory_regex"):
        pattern = getattr(run, key)
        if not pattern:
            continue
        try:
            compiled = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ConfigError(f"{CONFIG_NAME}: run.{key} is not a valid regex: {exc}") from None
        if compiled.groups < 1:
            raise ConfigError(f"{CONFIG_NAME}: run.{key} needs one capture group for the number")
    if not run.editable:
        raise ConfigError(f"{CONFIG_NAME}: run.editable lists no file")
    for path in run.editable:
        norm = os.path.normpath(path)
        if os.path.isabs(path) or norm.startswith("..") or norm != path:
            raise ConfigError(f"{CONFIG_NAME}: run.editable path {path!r} must be relative and normal")
        if never_editable(norm):
            raise ConfigError(f"{CONFIG_NAME}: {path!r} can never be editable by the agent")
    if run.budget_seconds <= 0:
        raise ConfigError(f"{CONFIG_NAME}: run.budget_seconds must be positive")
    if cfg.proposer.kind not in ("offline", "anthropic", "command"):
        raise ConfigError(f"{CONFIG_NAME}: proposer.kind must be offline, anthropic or command")
    if cfg.proposer.fallback not in ("offline", "reject"):
        raise ConfigError(f"{CONFIG_NAME}: proposer.fallback must be 'offline' or 'reject'")
    if cfg.proposer.kind == "command" and not cfg.command.argv:
        raise ConfigError(f"{CONFIG_NAME}: proposer.kind = 'command' needs command.argv")
    if cfg.proposer.kind == "anthropic" and cfg.limits.max_cost_usd and cfg.anthropic.price() is None:
        raise ConfigError(f"{CONFIG_NAME}: limits.max_cost_usd needs a price for anthropic.model "
                          f"{cfg.anthropic.model!r}, which has no built-in one: add [anthropic.prices]")
    if cfg.sandbox.mode not in ("auto", "strict", "off"):
        raise ConfigError(f"{CONFIG_NAME}: sandbox.mode must be 'auto', 'strict' or 'off'")
    for path in cfg.sandbox.read_only:
        if not os.path.isabs(path):
            raise ConfigError(f"{CONFIG_NAME}: sandbox.read_only path {path!r} must be absolute")
    try:
        cfg.eval.argv
    except ValueError as exc:
        raise ConfigError(f"{CONFIG_NAME}: eval.command cannot be parsed: {exc}") from None
    for path in cfg.eval.files:
        norm = os.path.normpath(path)
        if os.path.isabs(path) or norm.startswith("..") or norm != path:
            raise ConfigError(f"{CONFIG_NAME}: eval.files path {path!r} must be relative and normal")
        if path in run.editable:
            raise ConfigError(f"{CONFIG_NAME}: {path!r} is an evaluation file: it cannot be editable by the agent")
    if cfg.eval.files and not cfg.eval.command:
        raise ConfigError(f"{CONFIG_NAME}: eval.files needs eval.command")
    if cfg.executor.kind not in ("local", "ray"):
        raise ConfigError(f"{CONFIG_NAME}: executor.kind must be 'local' or 'ray', got {cfg.executor.kind!r}")
    if not cfg.ray.address.strip():
        raise ConfigError(f"{CONFIG_NAME}: ray.address must not be empty ('auto', 'local', 'ray://head:10001')")
    slots = cfg.slots
    if slots.count != "auto" and slots.count < 1:
        raise ConfigError(f"{CONFIG_NAME}: slots.count must be at least 1 (or 'auto'), got {slots.count}")
    for gpu in slots.gpus:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_/-]*", gpu):
            raise ConfigError(f"{CONFIG_NAME}: slots.gpus entry {gpu!r} is not one GPU's index or UUID")
    if slots.gpus and slots.count != "auto" and len(slots.gpus) < slots.count:
        raise ConfigError(f"{CONFIG_NAME}: slots.gpus lists {len(slots.gpus)} GPU(s) for slots.count = "
                          f"{slots.count}: one per slot")
    if cfg.workload.profile not in ("", "cpu", "gpu"):
        raise ConfigError(f"{CONFIG_NAME}: workload.profile must be 'cpu' or 'gpu'")
    from .alerts import KINDS

    unknown = [k for k in cfg.notify.events if k not in KINDS]
    if unknown:
        raise ConfigError(f"{CONFIG_NAME}: notify.events: unknown event {unknown[0]!r} (known: {', '.join(KINDS)})")
    if cfg.notify.timeout_seconds <= 0:
        raise ConfigError(f"{CONFIG_NAME}: notify.timeout_seconds must be positive")


def differences(old: Config, new: Config) -> dict[str, list]:
    """{"table.key": [old, new]} for every setting that differs (what a reload changed)."""
    out: dict[str, list] = {}

    def walk(a, b, prefix: str) -> None:
        for f in fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if is_dataclass(x):
                walk(x, y, f"{prefix}{f.name}.")
            elif x != y:
                out[prefix + f.name] = [list(x) if isinstance(x, tuple) else x,
                                        list(y) if isinstance(y, tuple) else y]

    walk(old, new, "")
    return out


def parse(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_NAME}: not valid TOML: {exc}") from None
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def override(cfg: Config, values: dict[str, Any], source: str = "the command line") -> Config:
    """`cfg` with some keys replaced for one daemon invocation, e.g. {"proposer.kind": "anthropic"};
    the result is checked like a loaded config."""
    for key, value in values.items():
        table, name = key.split(".")
        cfg = replace(cfg, **{table: replace(getattr(cfg, table), **{name: value})})
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with {source})") from None
    return cfg


def load(workspace: Path) -> Config:
    path = Path(workspace) / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this an autoresearch workspace? try `autoresearch init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # TOML literal strings keep regex backslashes readable; fall back to basic strings.
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render(cfg: Config, comments: dict[str, str] | None = None) -> str:
    """A complete, commented autoresearch.toml for `cfg` (used by `init`)."""
    comments = comments or {}
    out: list[str] = []

    def table(name: str, obj) -> None:
        out.append(f"[{name}]")
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value) or value is None:
                continue
            key = f"{name}.{f.name}"
            line = f"{f.name} = {_toml_value(value)}"
            if key in comments:
                line += f"  # {comments[key]}"
            out.append(line)
        out.append("")
        for f in fields(obj):
            sub = getattr(obj, f.name)
            if is_dataclass(sub):
                table(f"{name}.{f.name}", sub)

    for f in fields(cfg):
        table(f.name, getattr(cfg, f.name))
    text = "\n".join(out)
    parse(text)  # what we write must load back
    return text


COMMENTS = {
    "run.command": "the training run, started in the workspace",
    "run.prepare_command": "run once per daemon start; failure -> blocked, not a crashed experiment",
    "run.metric_regex": "last match in the run's own log",
    "run.direction": "minimize | maximize",
    "run.budget_seconds": "the workload's own time budget",
    "run.deadline_seconds": "hard kill of the run's process group; 0 = 2 x budget + 120",
    "run.editable": "the only files the agent may change",
    "judge.min_delta": "an improvement must exceed this",
    "judge.simplicity": "equal within min_delta and fewer lines -> keep",
    "judge.noise_runs": "re-run the baseline k times; keep threshold = max(min_delta, 2 sigma)",
    "judge.merge": "a gain overtaken by a newer best is merged onto it when it applies cleanly",
    "proposer.kind": "offline | anthropic | command",
    "proposer.fallback": "when the agent gives no edit: offline | reject",
    "anthropic.model": "see docs/AGENTS.md; checked through the Models API at start",
    "limits.max_experiments": "0 = unlimited",
    "limits.max_hours": "0 = unlimited",
    "limits.max_cost_usd": "0 = unlimited",
    "limits.max_interrupts": "runs lost (the daemon died) more often than this -> crashed; stops never count",
    "sandbox.mode": "auto (bubblewrap, else namespace + limits fallback) | strict (bubblewrap or no run) | off",
    "sandbox.max_processes": "tasks in the run's PID namespace (bubblewrap)",
    "sandbox.read_only": "host paths a run may read besides its checkout, the Python install and the data cache",
    "sandbox.memory_mb": "0 = 90% of RAM",
    "slots.count": "experiments in flight at once; 'auto' = one per visible GPU (1 without GPUs)",
    "slots.gpus": "slot k runs with CUDA_VISIBLE_DEVICES=gpus[k] (nvidia-smi index or UUID); "
                  "[] = the visible ones in turn (1 slot: all of them)",
    "slots.lookahead": "proposals prepared ahead, so that a freed slot launches at once",
    "slots.allow_mixed_gpus": "false: refuse slots on different GPU models (budgets would not compare)",
    "executor.kind": "local (this machine) | ray (a Ray cluster: pip install 'autoresearch[ray]', docs/CLUSTER.md)",
    "ray.address": "auto | ray://head:10001 | host:port | local (start a Ray instance here)",
    "ray.num_gpus": "GPUs per run; 0 = one CPU run per node",
    "ray.accelerator_type": "e.g. H100: every run on that GPU model ('' = any)",
    "workload.profile": "cpu | gpu; fixed for the life of the workspace",
    "eval.command": "run after each run, checkout read-only; the metric comes from its output; '' = none "
                    "(built-in workload: its own evaluator)",
    "eval.files": "the evaluation's files: the human's (from the best commit), never editable",
    "eval.deadline_seconds": "0 = like run.deadline_seconds",
    "notify.command": "run with sh -c on the events below, the event as JSON on stdin; '' = none",
    "notify.events": "new_best | crashed | blocked | exhausted | stopped | restarted",
    "notify.timeout_seconds": "the command's process group is killed after this",
}
