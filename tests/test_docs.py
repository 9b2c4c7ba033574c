"""The docs pages whose code this file runs produce what they promise, and the generated configuration
page matches the code. The fence convention, and the running of every other block, are
tests/doc_blocks.py's and tests/test_doc_blocks.py's.
"""

import pathlib

import pytest

from .doc_blocks import blocks, run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: pages whose python blocks run here, with checks on their output (tests/test_doc_blocks.py skips them)
PAGES = ("docs/testing.md", "docs/megatron.md")


def _run_page(page, tmp_path, timeout=600):
    return run_python(blocks(page), str(tmp_path), timeout=timeout)


@pytest.mark.multiproc
def test_testing_page_runs_as_a_users_test_suite(tmp_path):
    pytest.importorskip("megatron.core")
    out = _run_page("docs/testing.md", tmp_path)
    assert "3 passed" in out


@pytest.mark.multiproc
def test_megatron_page_trains_and_reads_the_metrics(tmp_path):
    pytest.importorskip("megatron.core")
    out = _run_page("docs/megatron.md", tmp_path)
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
