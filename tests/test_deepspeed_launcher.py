"""The DeepSpeed example trains under the ``deepspeed`` launcher on CPU (4 ranks = 2 nodes x 2):
loss falls, and save_checkpoint / load_checkpoint restore model and optimizer exactly (ZeRO 1 and 2)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, 2])
def test_example_under_deepspeed_launcher(tmp_path, stage):
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}
    cmd = [launcher, "--num_gpus", "4", "launch/deepspeed/train_gpt_moe.py", "--ep-size", "4", "--gpus-per-node", "2",
           "--steps", "12", "--zero-stage", str(stage), "--save-dir", str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("SUMMARY ")][-1]
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["world"] == 4
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    assert summary["checkpoint_params_equal"] and summary["checkpoint_optimizer_equal"]
