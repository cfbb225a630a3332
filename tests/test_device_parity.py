"""CPU-vs-CUDA parity (bench/speed/device_parity.py): the CUDA check runs where a GPU is, the rest anywhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "speed"))

import device_parity

from nufilt_core.checkpoint import Checkpoint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path: Path, capsys):
    assert device_parity.parity("vit-tiny", ["cpu", "cuda"], tmp_path, seed=0)
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "MISS" not in out


def test_same_device_twice_is_bitwise_equal(tmp_path: Path, capsys):
    # the harness on a machine without a GPU: same device, so every tensor must be identical
    assert device_parity.parity("vit-tiny", ["cpu", "cpu"], tmp_path, seed=0)
    assert "weights max 0.00e+00" in capsys.readouterr().out
    work = tmp_path / "vit-tiny-s0" / "parity"
    a, b = Checkpoint.open(work / "m2-0-cpu"), Checkpoint.open(work / "m2-1-cpu")
    q = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a.read(q), b.read(q))
    base = Checkpoint.open(tmp_path / "vit-tiny-s0" / "base")
    assert not torch.equal(a.read(q), base.read(q))  # step 2 did change the filtered matrix


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer when CUDA is missing")
def test_missing_cuda_is_reported_before_any_work(tmp_path: Path, capsys):
    assert device_parity.main(["--devices", "cpu,cuda", "--root", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing generated, nothing merged
