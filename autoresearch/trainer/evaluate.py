"""The trusted evaluation: ``python -m autoresearch.trainer.evaluate MODEL.pt2``.

Run by the daemon after a training run, as a separate process in a sandbox of its
own (the validation split readable, the run's files not). No code the agent wrote
runs here: the model arrives as an exported graph (harness.submit), and

  1. the graph is refused when it calls an operator outside the allowlist (ATen and
     prims operators, minus those that touch files or print; no custom namespaces);
  2. a causality probe changes the tokens after a random position t in each row of one
     batch and requires the logits at positions <= t to stay the same (within the dtype's
     tolerance): one extra forward pass probes as many positions as the batch has rows;
  3. val_bpb is computed by the harness's own evaluate_bpb from the graph's logits.

Prints ``val_bpb: X`` (the metric regex reads it); on a refusal prints ``FAIL: reason``
and exits 2. Reads ./autoresearch.toml for the workload (the daemon provides a copy).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import zipfile
import time
from pathlib import Path

import numpy as np
import torch

from autoresearch.trainer import EXPORT_NAME, harness

ALLOWED_NAMESPACES = ("aten", "prims")
# ATen operators that reach outside the tensor world (files, the console, storage sharing).
FORBIDDEN_OPS = frozenset({"from_file", "_print", "save", "load", "_assert_async", "_share_memory_",
                           "_fused_sdp_choice", "set_"})
ALLOWED_PYTHON = {operator.getitem}
EXIT_REFUSED = 2


class Refused(Exception):
    """The export cannot be trusted; the message says why."""


def _allowed(namespace: str, name: str) -> bool:
    return namespace in ALLOWED_NAMESPACES and name not in FORBIDDEN_OPS


def _refuse(bad: set[str]) -> None:
    if bad:
        raise Refused(f"forbidden operator(s) in the exported graph: {', '.join(sorted(bad)[:10])}")


def check_archive(path: Path) -> None:
    """Refuse the archive before anything in it is deserialized: every node of every serialized
    graph (subgraphs included) must name an allowed operator."""
    try:
        with zipfile.ZipFile(path) as archive:
            graphs = [json.loads(archive.read(n)) for n in archive.namelist()
                      if "/models/" in n and n.endswith(".json")]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise Refused(f"not an exported model archive: {exc}") from None
    if not graphs:
        raise Refused("not an exported model archive: no serialized graph in it")
    bad = set()
    for target in _serialized_targets(graphs):
        if target in ("_operator.getitem",):
            continue
        parts = target.split(".")  # torch.ops.<namespace>.<name>.<overload>
        if not (len(parts) >= 4 and parts[:2] == ["torch", "ops"] and _allowed(parts[2], parts[3])):
            bad.add(target.removeprefix("torch.ops.").replace(".", "::", 1).rsplit(".", 1)[0] if
                    target.startswith("torch.ops.") else target)
    _refuse(bad)


def _serialized_targets(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str) and "inputs" in obj:
            yield obj["target"]
        for value in obj.values():
            yield from _serialized_targets(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _serialized_targets(value)


def check_graph(program: torch.export.ExportedProgram) -> None:
    """Refuse a loaded graph with an operator outside the allowlist (recursing into subgraphs)."""
    _refuse({name for name in _operators(program.graph_module) if name})


def _operators(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_module" or node.op == "call_method":
            yield f"{node.op} {node.target}"
        if node.op != "call_function":
            continue
        target = node.target
        if target in ALLOWED_PYTHON:
            continue
        if isinstance(target, torch._ops.HigherOrderOperator):
            yield f"higher-order {target.name()}"
            continue
        if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            yield f"python {getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"
            continue
        namespace, name = target.namespace, target.name().split("::", 1)[-1].split(".", 1)[0]
        if not _allowed(namespace, name):
            yield f"{namespace}::{name}"
    for _, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            yield from _operators(sub)


class Static(torch.nn.Module):
    """The exported graph behind evaluate_bpb's interface: pads a short last batch to the
    static batch size and drops the padding's logits."""

    def __init__(self, program: torch.export.ExportedProgram, batch: int):
        super().__init__()
        self.batch = batch
        self.__dict__["graph"] = program.module()  # not a submodule: train()/eval() stay here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        if n < self.batch:
            x = torch.cat([x, x.new_zeros(self.batch - n, x.size(1))])
        out = self.graph(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:n]


def tolerance(dtype: torch.dtype) -> float:
    """How far logits may move from float noise alone (relative to their scale)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 5e-2)


@torch.no_grad()
def causality_probe(model: Static, tokens: np.ndarray, seq_len: int, vocab: int, device, seed: int = 0) -> None:
    """Changing the tokens after position t must not change the logits at positions <= t."""
    rng = np.random.default_rng(seed)
    n = max(1, min(model.batch, (len(tokens) - 1) // seq_len))
    x = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len).to(device)
    if x.size(0) < model.batch:
        x = torch.cat([x, x[-1:].expand(model.batch - x.size(0), -1)])
    with harness._autocast(torch.device(device)):
        base = model(x)
    if base.dim() != 3 or base.shape[:2] != x.shape or base.size(-1) != vocab:
        raise Refused(f"the model returns shape {tuple(base.shape)}, expected (B, T, vocab) = "
                      f"({x.size(0)}, {seq_len}, {vocab})")
    tol = tolerance(base.dtype) * max(1.0, base.float().abs().max().item())
    # One more forward pass probes every row at its own cut t (random, distinct where the batch
    # allows): the tokens after t are replaced, the logits at <= t must not move.
    rows = x.size(0)
    cuts = rng.choice(seq_len - 1, size=rows, replace=rows > seq_len - 1)
    changed = x.clone()
    for i, t in enumerate(cuts):
        changed[i, t + 1:] = torch.from_numpy(rng.integers(0, vocab, size=seq_len - t - 1)).to(device)
    with harness._autocast(torch.device(device)):
        out = model(changed)
    for i, t in enumerate(cuts):
        moved = (out[i, : t + 1].float() - base[i, : t + 1].float()).abs().max().item()
        if not moved <= tol:
            raise Refused(f"causality probe: changing the tokens after position {t} changed the logits at "
                          f"positions <= {t} by {moved:.3g} (tolerance {tol:.3g}): the model sees the future")


def evaluate(path: Path, workload: harness.Workload) -> float:
    if not path.is_file():
        raise Refused(f"no exported model at {path.name}: train.py must hand its model over "
                      "(W.submit(model, device)) at its end")
    check_archive(path)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: refused with the reason
        raise Refused(f"cannot load the exported model: {type(exc).__name__}: {exc}") from None
    check_graph(program)
    params = [*program.state_dict.values(), *program.constants.values()]
    device = next((p.device for p in params if isinstance(p, torch.Tensor)), torch.device("cpu"))
    model = Static(program, workload.eval_batch_size)
    tokens = workload.val_tokens
    causality_probe(model, tokens, workload.seq_len, workload.vocab_size, device)
    bpb = workload.evaluate_bpb(model, device)
    if not np.isfinite(bpb):
        raise Refused(f"val_bpb is {bpb}")
    return bpb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoresearch.trainer.evaluate")
    parser.add_argument("model", type=Path, nargs="?", default=Path(EXPORT_NAME),
                        help=f"the exported program (default: ./{EXPORT_NAME})")
    args = parser.parse_args(argv)
    workload = harness.load()
    t0 = time.perf_counter()
    try:
        bpb = evaluate(args.model, workload)
    except Refused as exc:
        print(f"FAIL: {exc}", flush=True)
        return EXIT_REFUSED
    print(f"eval_seconds:     {time.perf_counter() - t0:.1f}")
    print(f"val_bpb:          {bpb:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
