"""The GPUs this daemon may give its slots, as nvidia-smi lists them.

The daemon never imports torch (seconds of start-up, and it would hold a CUDA context):
``nvidia-smi`` answers which GPUs exist. GPUs are named as nvidia-smi names them: its index
(PCI bus order) or the card's UUID. A run pinned to one gets ``CUDA_VISIBLE_DEVICES`` set to it
and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (executor.RunSpec), so that CUDA counts the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import SlotsConfig

QUERY = ["--query-gpu=index,name,uuid", "--format=csv,noheader"]
TIMEOUT_S = 20.0  # a wedged driver can hang nvidia-smi: no answer is no GPU


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index (PCI bus order)
    name: str  # the model, e.g. "NVIDIA H100 80GB HBM3"
    uuid: str  # "GPU-..."


def _query(env: Mapping[str, str]) -> list[Gpu]:
    """Every GPU nvidia-smi lists; [] without nvidia-smi or when it fails."""
    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *QUERY], capture_output=True, text=True, timeout=TIMEOUT_S,
                             stdin=subprocess.DEVNULL, env=dict(env))
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue  # "No devices were found", or a line we do not understand
        gpus.append(Gpu(int(parts[0]), ", ".join(parts[1:-1]), parts[-1]))
    return gpus


def find(gpus: Sequence[Gpu], ident: str) -> Gpu | None:
    """The GPU that ``ident`` (an index, a UUID or a unique UUID prefix, as CUDA takes them) names."""
    ident = ident.strip()
    if ident.isdigit():
        return next((g for g in gpus if g.index == int(ident)), None)
    if ident.startswith("GPU-"):
        matches = [g for g in gpus if g.uuid.startswith(ident)]
        return matches[0] if len(matches) == 1 else None
    return None


def visible(env: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs a process with ``env`` (default: ours) may use: nvidia-smi's list, narrowed and
    ordered by CUDA_VISIBLE_DEVICES when set. As CUDA does, the list ends at the first entry
    that names no GPU (or one already listed): "" or "-1" hide them all."""
    env = os.environ if env is None else env
    gpus = _query(env)
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return gpus
    out: list[Gpu] = []
    for ident in chosen.split(","):
        gpu = find(gpus, ident)
        if gpu is None or gpu in out:
            break
        out.append(gpu)
    return out


def _used(gpus: Sequence[Gpu], slots: SlotsConfig) -> tuple[list[str | None], str]:
    """(per slot, what CUDA_VISIBLE_DEVICES it gets (None: as the daemon's), why that is refused or '')."""
    listed = list(slots.gpus)
    count = slots.count if slots.count != "auto" else (len(listed) or max(1, len(gpus)))
    if listed:
        if gpus:  # without nvidia-smi there is nothing to check the names against
            missing = [g for g in listed[:count] if find(gpus, g) is None]
            if missing:
                names = ", ".join(f"{g.index} ({g.name})" for g in gpus)
                return [], f"slots.gpus: {missing[0]!r} is not a visible GPU (visible: {names})"
        return listed[:count], ""
    if not gpus or count == 1:  # one slot sees every visible GPU, as a run always did
        return [None] * count, ""
    # One visible GPU per slot, round the list again when there are more slots than GPUs.
    return [str(gpus[k % len(gpus)].index) for k in range(count)], ""


def slot_gpus(gpus: Sequence[Gpu], slots: SlotsConfig) -> list[str | None]:
    """Slot k's GPU (RunSpec.gpu): ``slots.gpus[k]``; with none listed and several slots, the
    visible GPUs in turn; else None (the run sees what the daemon sees: one slot, or no GPU)."""
    return _used(gpus, slots)[0]


def check_models(gpus: Sequence[Gpu], slots: SlotsConfig) -> str:
    """'' when the slots' GPUs may be used together, else why not (one line).

    Refused: a slot names a GPU that is not visible; slots on more than one GPU model (a fixed
    time budget buys different amounts of training on each) unless ``allow_mixed_gpus``. A lone
    slot that sees every GPU is not mixed: each of its runs sees the same cards."""
    per_slot, why = _used(gpus, slots)
    if why:
        return why
    models: list[str] = []
    for ident in per_slot:
        for gpu in ([find(gpus, ident)] if ident is not None else []):
            if gpu is not None and gpu.name not in models:
                models.append(gpu.name)
    if len(models) > 1 and not slots.allow_mixed_gpus:
        return (f"the slots would run on {len(models)} GPU models ({', '.join(models)}): runs on different "
                "GPU models are not comparable under a time budget; list one model's GPUs in [slots] gpus, "
                "or set [slots] allow_mixed_gpus = true")
    return ""


def device_of(gpu: Gpu | None) -> dict:
    """What a run's events record about where it ran."""
    if gpu is None:
        return {"kind": "cpu"}
    return {"kind": "cuda", "index": gpu.index, "name": gpu.name, "uuid": gpu.uuid}
