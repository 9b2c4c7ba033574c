"""benchmarks/host_time.py at toy size on 2 gloo ranks: the layers (with --allgather: four) timed in interleaved rounds, a
per-part CPU breakdown and a cProfile summary come back, and the table prints (about 15 s on 2 cores)."""

import os
import sys

import pytest

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.multiproc

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def test_host_time_runs_at_toy_size(tmp_path, capsys):
    sys.path.insert(0, BENCHMARKS)  # the spawned ranks import host_time / op_count by name
    try:
        import host_time

        out = host_time.main(["--nproc", "2", "--tokens", "16", "--hidden", "16", "--ffn", "16", "--experts", "8",
                              "--topk", "2", "--rounds", "2", "--iters", "1", "--warmup", "1",
                              "--profile-steps", "1", "--profile-top", "3", "--allgather", "--out", str(tmp_path)])
    finally:
        sys.path.remove(BENCHMARKS)
    (s,) = out["summary"]
    assert s["rounds"] == 2 and s["topk"] == 2
    for what in ("ms", "cpu_ms"):
        assert all(v > 0 for v in s[what].values()) and s[what + "_ratio"] > 0
    (r,) = out["results"]
    assert set(s["cpu_ms_ratios"]) == {f"{a} / {b}" for a, b in host_time.RATIOS}
    for name in host_time.NAMES + host_time.ALLGATHER_NAMES:
        for key in ("phase_cpu_ms", "phase_wall_ms"):
            assert {"router", "token_dispatch", "experts", "forward", "backward"} <= set(r[key][name])
        assert r["phase_wall_ms"][name]["forward"] >= r["phase_cpu_ms"][name]["forward"] - 0.01  # a thread runs within its wall time
        assert r["profile_groups"][name]
    assert any("router.py" in name for name, _, _ in r["profile_locmoe_plugin"])
    assert (tmp_path / "host_time.json").exists()
    assert "ratio" in capsys.readouterr().out
