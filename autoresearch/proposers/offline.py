"""The embedded default proposer: a seeded hyperparameter search, no network, no key.

It edits the editable files' top-level UPPERCASE numeric constants
(``MATRIX_LR = 0.04``, ``DEPTH = 8``, ``TOTAL_BATCH_SIZE = 2**19``): each
proposal is a local step from the current best files that changes one
constant (sometimes two). Values come from optuna's TPE sampler, fed with every
recorded experiment (constants parsed from its files, its metric), so the
search learns which ranges pay off; the study is rebuilt from the history on
every call (the event log is the memory, not this object). Only the literal's
characters change: comments and formatting stay as they were.

Search space, relative to the current best value v:
  * floats: log-uniform in [v/4, 4v], steps under 10 % are not proposed; names
    that look like fractions (RATIO, FRAC, BETA, MOMENTUM, DROPOUT) stay below 1;
  * powers of two >= 16 (widths, batch sizes) and ``2**k``: powers of two, k-2..k+2;
  * other ints >= 8: log-scale in [v/2, 2v], keeping v's power-of-two factor (up to 64);
  * small ints: v-2..v+2 (at least 1);
  * booleans, zero, negatives, strings and names with SEED are never touched.
A configuration already in the history, or in flight (running or queued:
``ctx.in_flight``), is never proposed; the ones in flight are also given to TPE
as running trials (``constant_liar``), so that it samples away from them.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from .base import NoEdit, Proposal, ProposalContext

_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_FRACTION = re.compile(r"RATIO|FRAC|BETA|MOMENTUM|DROPOUT")
_SKIP = re.compile(r"SEED")
MAX_DRAWS = 40  # per proposal, before giving up with NoEdit
DRAWS_PER_CHOICE = 8  # then change other constants
PAIR_PROBABILITY = 0.25  # how often two constants change at once
MIN_FLOAT_STEP = math.log(1.1)  # a float step under 10 % is lost in seed noise


@dataclass(frozen=True)
class Constant:
    path: str
    name: str
    value: int | float
    kind: str  # "float" | "int" | "pow2"
    lineno: int  # 1-based
    col: int  # UTF-8 byte offsets within the line (as ast reports them)
    end_col: int
    source: str  # the literal as written
    binop: bool = False  # written as 2**k


def find_constants(text: str, path: str = "") -> list[Constant]:
    """Top-level ``NAME = <number>`` assignments that the search may change."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    seen: dict[str, int] = {}
    found: list[Constant] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            target = value = None
        if not isinstance(target, ast.Name):
            # Any other binding of a name (a = b = 1, X += 1, for/if/with/def bodies, ...)
            # makes that name unsafe to tune: the literal may not be what runs.
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    seen[n.id] = seen.get(n.id, 0) + 2
            continue
        seen[target.id] = seen.get(target.id, 0) + 1
        c = _constant(text, path, target.id, value)
        if c is not None:
            found.append(c)
    # A name bound twice: changing one of its literals may change nothing.
    return [c for c in found if seen[c.name] == 1]


def _constant(text: str, path: str, name: str, value: ast.expr) -> Constant | None:
    if not _UPPER.match(name) or _SKIP.search(name) or value.end_lineno != value.lineno:
        return None
    binop = False
    if isinstance(value, ast.Constant):
        v = value.value
    elif (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Pow)
          and isinstance(value.left, ast.Constant) and value.left.value == 2
          and type(value.left.value) is int
          and isinstance(value.right, ast.Constant) and type(value.right.value) is int
          and 0 < value.right.value < 63):
        v, binop = 2 ** value.right.value, True
    else:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
        return None  # bool is not int here; zero and negatives have no log scale
    if type(v) is float:
        kind = "float"
    elif binop or (v >= 16 and v & (v - 1) == 0):
        kind = "pow2"
    else:
        kind = "int"
    line = text.splitlines(keepends=True)[value.lineno - 1].encode("utf-8")
    source = line[value.col_offset:value.end_col_offset].decode("utf-8")
    return Constant(path, name, v, kind, value.lineno, value.col_offset, value.end_col_offset,
                    source, binop)


def rewrite(text: str, edits: Mapping[Constant, str]) -> str:
    """Replace each constant's literal by the new source text; nothing else changes."""
    lines = text.splitlines(keepends=True)
    for c in sorted(edits, key=lambda c: (c.lineno, c.col), reverse=True):
        raw = lines[c.lineno - 1].encode("utf-8")
        lines[c.lineno - 1] = (raw[:c.col] + edits[c].encode("utf-8") + raw[c.end_col:]).decode("utf-8")
    return "".join(lines)


# ---------------------------------------------------------------------- search space
@dataclass
class Space:
    """One constant's search space: the optuna distribution, the mapping between
    values and optuna params, and (for integers) the finite set of other values."""

    dist: object
    to_param: Callable[[float], float | int | None]
    from_param: Callable[[float | int], float | int]
    options: tuple | None  # other values an int may take; None for floats

    def random_value(self, c: Constant, rng: random.Random) -> float | int:
        if self.options is not None:
            return rng.choice(self.options)
        lo, hi = math.log(self.dist.low / c.value), math.log(self.dist.high / c.value)
        sides = [s for s in ((MIN_FLOAT_STEP, hi), (lo, -MIN_FLOAT_STEP)) if s[0] < s[1]]
        a, b = rng.choice(sides)
        return float(f"{c.value * math.exp(rng.uniform(a, b)):.3g}")

    def useful(self, c: Constant, value: float | int) -> bool:
        if value == c.value:
            return False
        return self.options is not None or abs(math.log(value / c.value)) >= MIN_FLOAT_STEP * 0.99


def _space(c: Constant) -> Space:
    from optuna.distributions import FloatDistribution, IntDistribution

    v = c.value
    if c.kind == "float":
        high = 4 * v
        if _FRACTION.search(c.name) and v < 1:
            high = min(high, 1 - (1 - v) / 4)
        return Space(FloatDistribution(v / 4, high, log=True), float,
                     lambda p: float(f"{p:.3g}"), None)
    if c.kind == "pow2":
        k = v.bit_length() - 1

        def to_param(x):
            x = int(x)
            return x.bit_length() - 1 if x > 0 and x & (x - 1) == 0 else None

        dist = IntDistribution(max(1, k - 2), k + 2)
        options = tuple(2**e for e in range(dist.low, dist.high + 1) if e != k)
        return Space(dist, to_param, lambda p: 2 ** int(p), options)
    if v >= 8:
        step = min(v & -v, 64)  # v's power-of-two factor: 768 -> multiples of 64

        def from_param(p):
            return max(step, round(int(p) / step) * step)

        dist = IntDistribution(max(1, v // 2), 2 * v, log=True)
        values = range(dist.low, dist.high + 1, max(1, (dist.high - dist.low) // 2000))
        options = tuple(sorted({from_param(x) for x in values} - {v}))
        return Space(dist, int, from_param, options)
    dist = IntDistribution(max(1, v - 2), v + 2)
    return Space(dist, int, int, tuple(x for x in range(dist.low, dist.high + 1) if x != v))


def _literal(c: Constant, value: int | float) -> str:
    if c.kind == "pow2" and c.binop:
        return f"2**{int(value).bit_length() - 1}"
    return repr(value) if c.kind == "float" else str(int(value))


class _Base:
    """Fast reading of a history file that differs from the current one only in literals.

    Almost every recorded file is the current best file with a few literals changed;
    comparing lines is ~100x cheaper than ast.parse. Anything else returns None
    and gets a full parse, so the result is always the one a full parse gives.
    """

    _POW = re.compile(r"^2\*\*(\d+)$")

    def __init__(self, path: str, text: str, consts: list[Constant], skeleton: str):
        self.path, self.skeleton = path, skeleton
        self.lines = text.splitlines(keepends=True)
        self.on_line: dict[int, list[Constant]] = {}
        for c in consts:
            self.on_line.setdefault(c.lineno - 1, []).append(c)

    def values_of(self, text: str):
        lines = text.splitlines(keepends=True)
        if len(lines) != len(self.lines):
            return None
        values = {}
        for i, (new, old) in enumerate(zip(lines, self.lines)):
            if new == old:
                for c in self.on_line.get(i, ()):
                    values[(self.path, c.name)] = c.value
                continue
            consts = self.on_line.get(i)
            if not consts or len(consts) > 1:
                return None
            c = consts[0]
            raw, base = new.encode("utf-8"), old.encode("utf-8")
            prefix, suffix = base[:c.col], base[c.end_col:]
            if (len(raw) <= len(prefix) + len(suffix) or not raw.startswith(prefix)
                    or not raw.endswith(suffix)):
                return None
            value = self._number(raw[len(prefix):len(raw) - len(suffix)].decode("utf-8"), c)
            if value is None:
                return None
            values[(self.path, c.name)] = value
        return values, self.skeleton

    def _number(self, literal: str, c: Constant):
        m = self._POW.match(literal)
        if m and c.binop:
            return 2 ** int(m.group(1)) if 0 < int(m.group(1)) < 63 else None
        try:
            v = ast.literal_eval(literal)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        if type(v) is not type(c.value) or c.binop or not math.isfinite(v) or v <= 0:
            return None
        return v


# ---------------------------------------------------------------------- proposer
class OfflineProposer:
    """Seeded TPE search over the editable files' UPPERCASE numeric constants."""

    name = "offline"

    def __init__(self, seed: int = 0):
        self.seed = seed
        # Parsed history files by content hash: a pure cache, results never depend on it.
        self._parsed: dict[str, tuple[dict[tuple[str, str], float], str]] = {}

    def _parse(self, path: str, text: str, base: _Base | None = None):
        """({(path, NAME): value}, hash of the code around the literals); cached by content."""
        key = hashlib.sha1(f"{path}\0{text}".encode()).hexdigest()
        hit = self._parsed.get(key)
        if hit is None:
            hit = base.values_of(text) if base is not None else None
            if hit is None:
                consts = find_constants(text, path)
                skeleton = rewrite(text, {c: "" for c in consts})
                hit = ({(path, c.name): c.value for c in consts},
                       hashlib.sha1(skeleton.encode()).hexdigest())
            if len(self._parsed) > 10_000:
                self._parsed.clear()
            self._parsed[key] = hit
        return hit

    def _config(self, files: Mapping[str, str], bases: Mapping[str, _Base] | None = None):
        """(values, key): key identifies the configuration (code around the literals + values)."""
        values: dict[tuple[str, str], float] = {}
        skeletons = []
        for path in sorted(files):
            vals, skel = self._parse(path, files[path], (bases or {}).get(path))
            values.update(vals)
            skeletons.append((path, skel))
        return values, (tuple(skeletons), tuple(sorted(values.items())))

    def propose(self, ctx: ProposalContext) -> Proposal:
        import optuna  # lazily: ~0.3 s to import, and only this proposer needs it

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        consts = [c for path in ctx.editable if path in ctx.files
                  for c in find_constants(ctx.files[path], path)]
        if not consts:
            raise NoEdit("offline proposer: the editable files have no top-level UPPERCASE "
                         "numeric constants to tune")
        multi = len(ctx.editable) > 1
        label = (lambda c: f"{c.path}:{c.name}") if multi else (lambda c: c.name)
        pname = (lambda key: f"{key[0]}/{key[1]}") if multi else (lambda key: key[1])
        spaces = {(c.path, c.name): _space(c) for c in consts}
        base_values, base_key = self._config(ctx.files)
        skeletons = base_key[0]
        bases = {path: _Base(path, ctx.files[path], [c for c in consts if c.path == path],
                             dict(skeletons)[path])
                 for path in ctx.files if path in ctx.editable}
        tried = {base_key}

        # Rebuild the study from the recorded history.
        rows = []
        for row in ctx.history:
            if not row.files:
                continue
            values, key = self._config({**ctx.files, **row.files}, bases)
            tried.add(key)
            rows.append((row, values))
        # The experiments running or queued: never proposed again, and told to optuna as
        # running trials (constant liar: TPE steers away from them as if they had failed).
        pending = []
        for f in sorted(ctx.in_flight, key=lambda f: f.n):
            if f.files and f.n != ctx.n:
                values, key = self._config({**ctx.files, **f.files}, bases)
                tried.add(key)
                pending.append(values)
        finite = [r.metric for r, _ in rows if r.metric is not None and math.isfinite(r.metric)]
        worst = (max(finite) if ctx.direction == "minimize" else min(finite)) if finite else None
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{ctx.n}".encode()).digest()[:4], "big")
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        study = optuna.create_study(direction=ctx.direction, sampler=sampler)

        def params_of(values) -> tuple[dict, dict]:
            params, dists = {}, {}
            for key, sp in spaces.items():
                p = sp.to_param(values[key]) if key in values else None
                if p is not None and sp.dist.low <= p <= sp.dist.high:
                    params[pname(key)] = p
                    dists[pname(key)] = sp.dist
            return params, dists

        trials, running = [], []
        for row, values in rows:
            metric = row.metric
            if metric is None or not math.isfinite(metric):
                if row.status != "crashed" or worst is None:
                    continue
                metric = worst  # a crash (say, out of memory) is as bad as the worst result
            params, dists = params_of(values)
            if params:
                trials.append(optuna.trial.create_trial(params=params, distributions=dists,
                                                        value=metric))
        for values in pending:
            params, dists = params_of(values)
            if params:
                running.append(optuna.trial.create_trial(params=params, distributions=dists,
                                                         state=optuna.trial.TrialState.RUNNING))
        study.add_trials(trials + running)

        def key_with(changes: dict) -> tuple:
            return (skeletons, tuple(sorted({**base_values, **changes}.items())))

        # Integers have few values: drop the ones already tried as a single change, and
        # never pick a constant alone whose every single change was tried.
        for k, sp in spaces.items():
            if sp.options is not None:
                sp.options = tuple(o for o in sp.options if key_with({k: o}) not in tried)
        singles = [c for c in consts if spaces[(c.path, c.name)].options != ()]
        if not singles and len(consts) < 2:
            raise NoEdit("offline proposer: every value of the only tunable constant was tried "
                         "or in flight")

        rng = random.Random(seed)
        failed: set[tuple] = set()
        for draw in range(MAX_DRAWS):
            if draw % DRAWS_PER_CHOICE == 0:  # (re)choose which constants to change
                pair = len(consts) > 1 and (rng.random() < PAIR_PROBABILITY or not singles)
                for _ in range(20):
                    chosen = rng.sample(consts, 2) if pair else [rng.choice(singles)]
                    if tuple(chosen) not in failed:
                        break
                failed.add(tuple(chosen))
            trial = study.ask()
            changes: dict[tuple[str, str], float | int] = {}
            for c in chosen:
                key = (c.path, c.name)
                sp = spaces[key]
                if sp.options is not None:
                    p = trial.suggest_int(pname(key), sp.dist.low, sp.dist.high, log=sp.dist.log)
                else:
                    p = trial.suggest_float(pname(key), sp.dist.low, sp.dist.high, log=True)
                value = sp.from_param(p)
                # TPE sits on the best value it has seen (often the current one): then
                # step elsewhere at random, so every draw is a real change.
                if not sp.useful(c, value) or (len(chosen) == 1 and key_with({key: value}) in tried):
                    if sp.options == ():
                        continue
                    value = sp.random_value(c, rng)
                if sp.useful(c, value):
                    changes[key] = value
            if not changes or key_with(changes) in tried:
                continue
            edits = {c: changes[(c.path, c.name)] for c in chosen if (c.path, c.name) in changes}
            literals = {c: _literal(c, v) for c, v in edits.items()}
            files = {}
            for path in {c.path for c in edits}:
                files[path] = rewrite(ctx.files[path], {c: s for c, s in literals.items()
                                                        if c.path == path})
            ordered = sorted(edits, key=lambda c: (c.path, c.lineno))
            description = ", ".join(f"{label(c)} {c.source} -> {literals[c]}" for c in ordered)
            return Proposal(
                description=description, files=files, proposer=self.name,
                meta={"changes": [{"path": c.path, "name": c.name, "old": c.source,
                                   "new": literals[c]} for c in ordered],
                      "history_trials": len(trials), "in_flight_trials": len(running),
                      "draws": draw + 1},
            )
        raise NoEdit(f"offline proposer: {MAX_DRAWS} draws found only configurations tried "
                     "or in flight")
