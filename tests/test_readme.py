"""README.md's code runs as written: its python blocks compile, and the framework-free quick start
(```python file=locmoe_core.py) runs under torchrun on 4 CPU ranks as 2 nodes x 2. The first lines give
exactly the two commands for a fresh machine."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```", re.S | re.M)


def test_first_lines_are_the_two_commands():
    head = README.split("```", 3)[1].strip().splitlines()
    assert head[0] == "bash"
    commands = [line.split("#")[0].strip() for line in head[1:]]
    assert commands == ["bash launch/setup_env.sh && .venv/bin/locmoe demo", ".venv/bin/python -m pytest -q tests"]


def test_python_blocks_compile():
    blocks = [(m["info"].strip(), m["code"]) for m in FENCE.finditer(README)]
    assert blocks
    for info, code in blocks:
        assert info in ("no-run", "") or info.startswith("file="), info
        compile(code, f"README.md:{info or 'python'}", "exec")


@pytest.mark.multiproc
def test_core_quick_start_runs_under_torchrun(tmp_path):
    code = next(m["code"] for m in FENCE.finditer(README) if m["info"].strip() == "file=locmoe_core.py")
    (tmp_path / "locmoe_core.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               LOCMOE_DEVICE="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           "locmoe_core.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    share = float(done.stdout.split()[0])
    assert 0.0 <= share <= 1.0
