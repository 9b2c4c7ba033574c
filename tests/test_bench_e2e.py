"""The end-to-end benchmark (benchmarks/bench_e2e.py) at toy size on CPU: 4 gloo ranks as 2 emulated nodes
x 2 through launch/emulate_nodes.sh --link fast, a few steps per system; its JSON, resume and report."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--num-layers", "2", "--hidden-size", "64", "--num-heads", "4", "--num-experts", "8", "--topk", "2",
       "--ffn-hidden-size", "64", "--seq-len", "32", "--micro-batch", "2", "--dtype", "fp32", "--steps", "5",
       "--measure", "2", "--eval-batches", "1", "--bandwidth-mib", "0.125"]


def _run(out, systems, link="fast"):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    cmd = ["bash", "launch/emulate_nodes.sh", "--nodes", "2", "--nproc-per-node", "4", "--link", link, "--",
           "benchmarks/bench_e2e.py", "--out", str(out), "--systems", systems,
           "--corpus", os.path.join(ROOT, "README.md"), *TOY]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check(r, system):
    assert r["system"] == system and r["layout"] == "2x2_fast" and r["link"] == "fast"
    assert r["bandwidth"]["env"]["NCCL_NSOCKS_PERTHREAD"] == "8"
    assert r["bandwidth"]["inter_node_gbps"] > 0 and r["bandwidth"]["intra_node_gbps"] > 0
    t = r["tokens_per_s"]
    assert 0 < t["min"] <= t["median"] <= t["max"] and len(r["step_ms"]) == 2
    assert r["tokens_per_step"] == 4 * 2 * 32 and r["trained_tokens"] == 5 * 256
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(256) + 0.5
    assert 0 <= r["cross_node_share"] <= 1 and r["inter_node_bytes_per_step"] > 0
    b = r["breakdown_ms"]
    phases = sum(b["forward"][p] + b["backward"][p] for p in ("attention", "router", "dispatch", "experts", "combine"))
    assert 0 < phases <= b["total"] and b["optimizer"] > 0
    assert b["forward"]["attention"] > 0 and b["forward"]["experts"] > 0 and b["backward"]["experts"] > 0
    assert 0 < b["inter_node_wait_share"] < 1


@pytest.mark.multiproc
def test_bench_e2e_megatron_systems_resume_and_report(tmp_path):
    systems = ["mcore_alltoall", "mcore_grouplimited", "locmoe_topk", "locmoe", "locmoe_plus"]
    out = _run(tmp_path, ",".join(systems))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {s: json.loads((tmp_path / f"e2e_2x2_fast_{s}.json").read_text()) for s in systems}
    for s, r in results.items():
        _check(r, s)
    # Megatron's alltoall sends every remote (token, expert) pair in the dispatch and the combine, forward and
    # backward: the bytes counted at the collective match the routing the monitor saw (fp32, hidden 64)
    base = results["mcore_alltoall"]
    pairs = 4 * 2 * 32 * 2 * 2  # ranks x micro-batch x seq x top-2 x layers
    assert base["inter_node_bytes_per_step"] == pytest.approx(base["cross_node_share"] * pairs * 64 * 4 * 4, rel=0.05)
    # resumable: present results are skipped before any process group (rank 0 of the same layout, alone)
    env = {**os.environ, "PYTHONPATH": ROOT, "RANK": "0", "WORLD_SIZE": "4", "LOCMOE_GPUS_PER_NODE": "2",
           "LOCMOE_LINK": "fast"}
    again = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems",
                            "mcore_alltoall,locmoe", *TOY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 2, again.stdout + again.stderr
    rep = subprocess.run([sys.executable, "benchmarks/e2e_report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    for s in systems:
        assert f"2x2_fast   {s} " in rep.stdout
    assert "link 2x2_fast: all-to-all inter-node" in rep.stdout
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiproc
def test_bench_e2e_deepspeed(tmp_path):
    out = _run(tmp_path, "deepspeed_moe")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check(json.loads((tmp_path / "e2e_2x2_fast_deepspeed_moe.json").read_text()), "deepspeed_moe")


def test_bench_e2e_rejects_mixed_launch_and_bad_measure():
    for extra in (["--systems", "mcore_alltoall,deepspeed_moe"], ["--steps", "4", "--measure", "4"],
                  ["--systems", "megatron"]):
        r = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", "/nonexistent", *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 2 and "error:" in r.stderr
