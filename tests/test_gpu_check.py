"""``make gpu-check`` (``hrt-ray bench gpu``) without a GPU: a clear message and a non-zero exit,
before anything is measured or written; and the peak table it computes MFU against."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hrt_ray.bench.gpu import datasheet_peak

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU: the check would run")
def test_gpu_check_exits_non_zero_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "hrt_ray", "bench", "gpu", "--out-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written without a GPU"


def test_datasheet_peaks_match_the_specific_name_first() -> None:
    assert datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_peak("NVIDIA H200") == 989.0
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak("NVIDIA A10G") == 70.0
    assert datasheet_peak("NVIDIA L4") == 121.0
    assert datasheet_peak("NVIDIA L40S") == 362.0
    assert datasheet_peak("Some Future GPU") is None
