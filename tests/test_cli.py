"""The ``locmoe`` console script as a user runs it."""

import json
import os
import subprocess
import sys
import time

import pytest


def _run(*args, timeout=120):
    env = {**os.environ, "LOCMOE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "locmoe_plugin.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    for sub in ("capacity", "check-comm", "demo"):
        assert sub in out.stdout


@pytest.mark.multiproc
def test_check_comm_passes_on_cpu_in_under_a_minute(tmp_path):
    t0 = time.time()
    out = _run("check-comm", "--nproc", "4", "--gpus-per-node", "2", "--json", str(tmp_path / "r.json"))
    elapsed = time.time() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("->  OK")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["max_abs_diff"] == {"output": 0.0, "grad_input": 0.0, "grad_weights": 0.0}
    assert report["max_abs_diff_overlap"] == {"output": 0.0, "grad_input": 0.0, "grad_weights": 0.0}
    assert report["inter_node_bytes"]["overlap"] == report["inter_node_bytes"]["hierarchical"]
    assert report["inter_node_bytes"]["hierarchical"] < report["inter_node_bytes"]["flat"]
    assert elapsed < 60, f"check-comm took {elapsed:.1f} s"


@pytest.mark.multiproc
def test_check_comm_checks_a_dispatch_format_against_native_rows_of_the_decoded_tokens(tmp_path):
    out = _run("check-comm", "--nproc", "4", "--gpus-per-node", "2", "--dispatch-format", "int8", "--tokens", "64",
               "--iters", "1", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("hierarchical == flat == overlap == native_decoded, bit for bit  ->  OK")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dispatch_format"] == "int8" and report["systems"] == ["hierarchical", "flat", "overlap",
                                                                                  "native_decoded"]
    zeros = {"output": 0.0, "grad_input": 0.0, "grad_weights": 0.0}
    assert report["max_abs_diff"] == zeros and report["max_abs_diff_native_decoded"] == zeros
    assert report["max_abs_diff_overlap"] == zeros
    assert report["inter_node_bytes"]["overlap"] == report["inter_node_bytes"]["hierarchical"]
    # the codec's rows are one byte per feature plus scales: fewer bytes than the native rows
    assert 0 < report["inter_node_bytes"]["hierarchical"] < report["inter_node_bytes"]["native_decoded"]


def test_check_comm_rejects_bad_layout_before_spawning():
    out = _run("check-comm", "--nproc", "4", "--gpus-per-node", "3")
    assert out.returncode == 2
    assert "--gpus-per-node 3 does not divide the 4 ranks (--nproc)" in out.stderr
