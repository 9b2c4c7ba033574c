"""The docs under docs/ that carry code run as written, and the generated configuration page matches the code.

Fence convention in docs/*.md: ```python blocks of one page run together, in order, as one script
(from a temporary directory, with this checkout importable); ```python file=NAME blocks are written to
NAME in that directory and, where one is a test_*.py, pytest runs there; ```python no-run blocks (they need
GPUs, a launcher or a user's own objects) are only compiled.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: pages whose code this test runs (the pages of other topics follow the same fence convention)
PAGES = ("testing.md", "megatron.md", "deepspeed.md", "ascend.md", "configuration.md", "dispatcher.md")
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```", re.S | re.M)


def blocks(page: str) -> list[tuple[str, str]]:
    """``(info, code)`` of every python block of a page (info: "", "no-run" or "file=NAME")."""
    return [(m["info"].strip(), m["code"]) for m in FENCE.finditer((DOCS / page).read_text())]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               LOCMOE_DEVICE="cpu")
    return env


@pytest.mark.parametrize("page", PAGES)
def test_fences_follow_the_convention_and_compile(page):
    for info, code in blocks(page):
        assert info == "" or info == "no-run" or re.fullmatch(r"file=[\w.]+\.py", info), (page, info)
        compile(code, f"{page}:{info or 'python'}", "exec")


def _run_page(page, tmp_path, timeout=600):
    runnable = [code for info, code in blocks(page) if info == ""]
    files = {info[5:]: code for info, code in blocks(page) if info.startswith("file=")}
    assert runnable or files, f"{page} has no block to run"
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    outputs = []
    if runnable:
        script = tmp_path / "page.py"
        script.write_text("\n\n".join(runnable))
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        outputs.append(done.stdout)
    if any(name.startswith("test_") for name in files):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    return "\n".join(outputs)


@pytest.mark.multiproc
def test_testing_page_runs_as_a_users_test_suite(tmp_path):
    pytest.importorskip("megatron.core")
    out = _run_page("testing.md", tmp_path)
    assert "3 passed" in out


@pytest.mark.multiproc
def test_megatron_page_trains_and_reads_the_metrics(tmp_path):
    pytest.importorskip("megatron.core")
    out = _run_page("megatron.md", tmp_path)
    lines = [line for line in out.splitlines() if "locmoe_cross_node_share" in line]
    assert len(lines) == 2 and "load_balancing_loss" in lines[0]


def test_configuration_page_is_generated_from_the_config():
    from locmoe_plugin.docs_gen import TARGET, main, render

    committed = (ROOT / TARGET).read_text()
    assert committed == render(), "docs/configuration.md is stale: run python -m locmoe_plugin.docs_gen"
    assert main(["--root", str(ROOT), "--check"]) == 0
    import dataclasses

    from locmoe_plugin import LocMoEConfig

    for f in dataclasses.fields(LocMoEConfig):
        assert f"| `{f.name}` |" in committed
