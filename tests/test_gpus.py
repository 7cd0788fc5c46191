"""gpus.py against a fake `nvidia-smi` on PATH (a real executable printing CSV): the GPUs a
daemon sees, CUDA_VISIBLE_DEVICES as CUDA reads it, mixed models refused, what a run records."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoresearch import gpus
from autoresearch.config import SlotsConfig
from autoresearch.gpus import Gpu

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
UUIDS = ["GPU-5a1f0c3e-0000-1111-2222-333344445555", "GPU-5b2e7d10-6666-7777-8888-999900001111",
         "GPU-c0ffee00-aaaa-bbbb-cccc-ddddeeeeffff"]
THREE_H100 = "".join(f"{i}, {H100}, {u}\n" for i, u in enumerate(UUIDS))
MIXED = f"0, {H100}, {UUIDS[0]}\n1, {H100}, {UUIDS[1]}\n2, {A100}, {UUIDS[2]}\n"


@pytest.fixture
def smi(tmp_path, monkeypatch):
    """Install a fake nvidia-smi printing ``csv`` (exit ``code``) first on PATH; it refuses other queries."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(csv: str, code: int = 0) -> Path:
        (bin_dir / "gpus.csv").write_text(csv)
        script = bin_dir / "nvidia-smi"
        script.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            [ "$*" = "--query-gpu=index,name,uuid --format=csv,noheader" ] || {{ echo "bad query: $*" >&2; exit 2; }}
            cat "{bin_dir / 'gpus.csv'}"
            exit {code}
            """))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return script

    return install


def test_visible_lists_what_nvidia_smi_prints(smi):
    smi(THREE_H100)
    assert gpus.visible() == [Gpu(0, H100, UUIDS[0]), Gpu(1, H100, UUIDS[1]), Gpu(2, H100, UUIDS[2])]


def test_no_nvidia_smi_or_a_failing_one_is_no_gpu(smi, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi anywhere
    assert gpus.visible() == []
    monkeypatch.undo()
    smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", code=9)
    assert gpus.visible() == []
    smi("No devices were found\n")
    assert gpus.visible() == []


@pytest.mark.parametrize("chosen,expected", [
    ("2,0", [2, 0]),  # CUDA's order is the variable's order
    (f"{UUIDS[1]}", [1]),
    ("GPU-c0ff", [2]),  # a unique UUID prefix, as CUDA takes it
    ("GPU-5", []),  # two UUIDs start so: names none, and the list ends there
    ("1,7,0", [1]),  # the list ends at the first entry that names no GPU
    ("0,0", [0]),
    ("", []),
    ("-1", []),
])
def test_cuda_visible_devices_narrows_the_list(smi, monkeypatch, chosen, expected):
    smi(THREE_H100)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", chosen)
    assert [g.index for g in gpus.visible()] == expected


def test_a_daemon_process_sees_its_own_environment(smi, monkeypatch):
    """From outside: a separate interpreter with CUDA_VISIBLE_DEVICES set, as systemd would start it."""
    smi(MIXED)
    code = "from autoresearch import gpus; print([(g.index, g.name) for g in gpus.visible()])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "2"})
    assert out.stdout.strip() == repr([(2, A100)]), out.stderr


def test_mixed_models_are_refused_unless_allowed(smi):
    smi(MIXED)
    seen = gpus.visible()
    why = gpus.check_models(seen, SlotsConfig(count="auto"))
    assert why.startswith(f"the slots would run on 2 GPU models ({H100}, {A100})")
    assert "not comparable under a time budget" in why and "\n" not in why
    assert gpus.check_models(seen, SlotsConfig(count="auto", allow_mixed_gpus=True)) == ""
    assert gpus.check_models(seen, SlotsConfig(count=2, gpus=("0", "1"))) == ""  # both H100
    assert gpus.check_models(seen, SlotsConfig(count=2, gpus=("1", UUIDS[2]))) != ""  # H100 + A100
    assert gpus.check_models(seen, SlotsConfig(count=2)) == ""  # the first two, both H100
    assert gpus.check_models(seen, SlotsConfig(count=3)) != ""
    assert gpus.check_models(seen, SlotsConfig()) == ""  # one slot: every run sees the same cards


def test_mixed_models_outside_cuda_visible_devices_do_not_count(smi, monkeypatch):
    smi(MIXED)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpus.check_models(gpus.visible(), SlotsConfig(count="auto")) == ""


def test_a_listed_gpu_that_is_not_visible_is_refused(smi, monkeypatch):
    smi(THREE_H100)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    why = gpus.check_models(gpus.visible(), SlotsConfig(count=2, gpus=("1", "2")))
    assert why == f"slots.gpus: '2' is not a visible GPU (visible: 0 ({H100}), 1 ({H100}))"
    assert gpus.check_models([], SlotsConfig(count=2, gpus=("1", "2"))) == ""  # nothing to check against


def test_slot_gpus(smi):
    smi(THREE_H100)
    seen = gpus.visible()
    assert gpus.slot_gpus(seen, SlotsConfig()) == [None]  # one slot: as visible
    assert gpus.slot_gpus(seen, SlotsConfig(count="auto")) == ["0", "1", "2"]
    assert gpus.slot_gpus(seen, SlotsConfig(count=4)) == ["0", "1", "2", "0"]
    assert gpus.slot_gpus(seen, SlotsConfig(count=2, gpus=("2", UUIDS[0], "1"))) == ["2", UUIDS[0]]
    assert gpus.slot_gpus([], SlotsConfig(count="auto")) == [None]
    assert gpus.slot_gpus([], SlotsConfig(count=2)) == [None, None]


def test_device_of(smi):
    smi(THREE_H100)
    gpu = gpus.find(gpus.visible(), UUIDS[1])
    assert gpus.device_of(gpu) == {"kind": "cuda", "index": 1, "name": H100, "uuid": UUIDS[1]}
    assert gpus.device_of(None) == {"kind": "cpu"}
