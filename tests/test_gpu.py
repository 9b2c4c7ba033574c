"""GPU tests: skipped without CUDA; on the GPU machine they run the NCCL versions of the parity tests."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
def test_megatron_parity_under_nccl():
    n = min(torch.cuda.device_count(), 4)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
         "tests/gpu/megatron_parity.py", "--gpus-per-node", str(max(1, n // 2))],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
