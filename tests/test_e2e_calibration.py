"""The projection calibration of the end-to-end benchmark's results
(locmoe_plugin.projection.e2e_calibration; ``benchmarks/e2e_report.py --calibration``)."""

import json
import os
import sys

import pytest

from locmoe_plugin.config import ConfigError
from locmoe_plugin.projection.calibration import load_calibration
from locmoe_plugin.projection.e2e_calibration import calibration_from_e2e_results
from locmoe_plugin.projection.workload import ModelSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "num_experts": 8, "topk": 2, "ffn_hidden_size": 128,
         "seq_len": 512, "micro_batch": 2, "dtype": "bf16", "attention": "sdpa"}


def _row(system, layout="1x4", experts_ms=8.0, moe_ms=40.0, variant=None, share=0.0, all_peers=None):
    """A result as bench_e2e.py writes it, with what the calibration reads: forward + backward phase ms of
    the profiling step summed over the 4 layers (router + dispatch + combine = ``moe_ms``)."""
    nodes = 1 if layout.startswith("1x") else 2
    fwd = {"attention": 5.0, "router": moe_ms / 4, "dispatch": moe_ms / 4, "experts": experts_ms / 2, "combine": 0.0}
    bwd = {"attention": 9.0, "router": 0.0, "dispatch": moe_ms / 4, "experts": experts_ms / 2, "combine": moe_ms / 4}
    bw = {"intra_node_gbps": 100.0, "inter_node_gbps": 2.0 if nodes > 1 else None}
    if all_peers:
        bw["inter_node_all_peers_gbps"] = all_peers
    return {"system": system, "variant": variant or system, "layout": layout, "nodes": nodes,
            "gpus_per_node": 4 // nodes, "world": 4, "model": MODEL, "tokens_per_step": 4 * 1024,
            "cross_node_share": share, "bandwidth": bw, "commit": "abc1234", "device": "GPU", "date": "2026-11-28",
            "breakdown_ms": {"forward": fwd, "backward": bwd}}


def test_gemm_rate_and_fixed_costs_from_the_profiling_step():
    rows = [_row("mcore_alltoall", moe_ms=60.0), _row("locmoe", experts_ms=4.0), _row("locmoe_topk", experts_ms=8.0),
            _row("locmoe", variant="locmoe+bf16grad", experts_ms=1.0, moe_ms=1.0)]  # a variant: not read
    cal = calibration_from_e2e_results(rows, two_stage_ms=1.5)
    spec = ModelSpec(hidden=256, ffn=128, experts=8, topk=2, tokens_per_rank=1024, swiglu=False)
    # the fastest LocMoE row: 4 ms of experts over 4 layers = 1 ms per layer for 1024 x 2 rows
    assert cal.expert_gemm_tflops == pytest.approx(spec.expert_flops_per_row * 1024 * 2 / 1e9)
    assert cal.intra_node == {"bandwidth_GBps": 100.0, "latency_us": 0.0} and cal.inter_node is None
    # per layer: 15 ms of router + dispatch + combine (Megatron), 10 ms (LocMoE), less a payload well under 1 ms
    assert 14.0 < cal.fixed_ms["megatron_alltoall"] < 15.0 and 9.0 < cal.fixed_ms["locmoe"] < 10.0
    assert cal.fixed_ms_multi_node == {"locmoe": pytest.approx(cal.fixed_ms["locmoe"] + 1.5)}
    assert cal.source["systems"] == ["locmoe", "locmoe_topk", "mcore_alltoall"] and cal.source["commit"] == "abc1234"
    # a system whose phases are shorter than its payload gets 0, not a negative cost
    assert calibration_from_e2e_results([_row("mcore_alltoall", moe_ms=0.0)]).fixed_ms == {"megatron_alltoall": 0.0}


def test_across_nodes_the_rail_and_all_peers_rates_and_multi_node_costs():
    cal = calibration_from_e2e_results([_row("mcore_alltoall", "2x2_fast", share=0.5, all_peers=3.0),
                                        _row("locmoe", "2x2_fast", share=0.2, all_peers=3.0)])
    assert cal.inter_node == {"bandwidth_GBps": 2.0, "flat_GBps": 3.0}
    assert cal.fixed_ms == {} and set(cal.fixed_ms_multi_node) == {"megatron_alltoall", "locmoe"}
    old = calibration_from_e2e_results([_row("locmoe", "2x2_slow", share=0.2)])  # before the all-peers figure
    assert old.inter_node == {"bandwidth_GBps": 2.0}


def test_one_layout_at_a_time():
    with pytest.raises(ConfigError, match="one layout"):
        calibration_from_e2e_results([_row("locmoe"), _row("locmoe", "2x2_fast")])
    with pytest.raises(ConfigError, match="one layout"):
        calibration_from_e2e_results([_row("locmoe", variant="locmoe+mb2")])


def test_report_writes_a_file_per_layout_that_project_reads(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import e2e_report

    rows = [_row("mcore_alltoall"), _row("locmoe"), _row("locmoe", "2x2_fast", share=0.2, all_peers=3.0),
            _row("deepspeed_moe", "2x2_fast", share=0.5)]
    paths = e2e_report.write_calibrations(rows, str(tmp_path / "cal"), two_stage_ms=1.0)
    assert [os.path.basename(p) for p in paths] == ["calibration_1x4.json", "calibration_2x2_fast.json"]
    one, two = (load_calibration(p) for p in paths)
    assert set(one.fixed_ms) == {"megatron_alltoall", "locmoe"} and two.inter_node["flat_GBps"] == 3.0
    assert json.loads((tmp_path / "cal" / "calibration_1x4.json").read_text())["source"]["two_stage_extra_ms"] == 1.0
