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


def _row(system, layout="1x4", experts_ms=8.0, moe_ms=40.0, variant=None, share=0.0, all_peers=None, rail=2.0):
    """A result as bench_e2e.py writes it, with what the calibration reads: forward + backward phase ms of
    the profiling step summed over the 4 layers (router + dispatch + combine = ``moe_ms``)."""
    nodes = 1 if layout.startswith("1x") else 2
    fwd = {"attention": 5.0, "router": moe_ms / 4, "dispatch": moe_ms / 4, "experts": experts_ms / 2, "combine": 0.0}
    bwd = {"attention": 9.0, "router": 0.0, "dispatch": moe_ms / 4, "experts": experts_ms / 2, "combine": moe_ms / 4}
    bw = {"intra_node_gbps": 100.0, "inter_node_gbps": rail if nodes > 1 else None}
    if all_peers:
        bw["inter_node_all_peers_gbps"] = all_peers
    return {"system": system, "variant": variant or system, "layout": layout, "nodes": nodes,
            "gpus_per_node": 4 // nodes, "world": 4, "model": MODEL, "tokens_per_step": 4 * 1024,
            "cross_node_share": share, "bandwidth": bw, "commit": "abc1234", "device": "GPU", "date": "2026-11-28",
            "breakdown_ms": {"forward": fwd, "backward": bwd}}


def test_gemm_rate_and_fixed_costs_from_the_profiling_step():
    rows = [_row("mcore_alltoall", moe_ms=60.0), _row("locmoe", experts_ms=4.0), _row("locmoe_topk", experts_ms=8.0),
            _row("locmoe", variant="locmoe+bf16grad", experts_ms=1.0, moe_ms=1.0),  # a variant: not read
            _row("locmoe_plus", experts_ms=0.5, moe_ms=1.0),  # drops pairs: not read
            _row("deepspeed_moe", experts_ms=40.0, moe_ms=20.0)]  # its split puts all-to-all time in "experts"
    cal = calibration_from_e2e_results(rows, two_stage_ms=1.5)
    spec = ModelSpec(hidden=256, ffn=128, experts=8, topk=2, tokens_per_rank=1024, swiglu=False)
    # the fastest dropless LocMoE row: 4 ms of experts over 4 layers = 1 ms per layer for 1024 x 2 rows
    assert cal.expert_gemm_tflops == pytest.approx(spec.expert_flops_per_row * 1024 * 2 / 1e9)
    assert cal.intra_node == {"bandwidth_GBps": 100.0, "latency_us": 0.0} and cal.inter_node is None
    # per layer, the whole MoE time less 1 ms of GEMMs at that rate and a payload well under 1 ms:
    # Megatron (60 + 8) / 4 - 1, LocMoE (40 + 4) / 4 - 1, DeepSpeed (20 + 40) / 4 - its padded GEMMs
    assert 15.8 < cal.fixed_ms["megatron_alltoall"] < 16.0 and 9.8 < cal.fixed_ms["locmoe"] < 10.0
    assert 12.0 < cal.fixed_ms["deepspeed_moe"] < 14.0
    assert cal.fixed_ms_multi_node == {"locmoe": pytest.approx(cal.fixed_ms["locmoe"] + 1.5)}
    assert cal.source["systems"] == ["deepspeed_moe", "locmoe", "locmoe_topk", "mcore_alltoall"]
    assert cal.source["commit"] == "abc1234"
    # a system whose phases are shorter than its GEMMs and payload gets 0, not a negative cost
    zero = calibration_from_e2e_results([_row("locmoe", experts_ms=4.0),
                                         _row("mcore_alltoall", moe_ms=0.0, experts_ms=0.0)])
    assert zero.fixed_ms["megatron_alltoall"] == 0.0


def test_across_nodes_the_rail_and_all_peers_rates_and_multi_node_costs():
    rows = [_row("deepspeed_moe", "2x2_fast", share=0.5, all_peers=5.0, rail=4.0),  # its own launch and link
            _row("mcore_alltoall", "2x2_fast", share=0.5, all_peers=3.0),
            _row("locmoe", "2x2_fast", share=0.2, all_peers=3.0)]
    cal = calibration_from_e2e_results(rows)
    assert cal.inter_node == {"bandwidth_GBps": 2.0, "latency_us": 0.0, "flat_GBps": 3.0}  # LocMoE's launch's link
    assert cal.fixed_ms == {} and set(cal.fixed_ms_multi_node) == {"megatron_alltoall", "deepspeed_moe", "locmoe"}
    # DeepSpeed's cost is taken at its own link: the same phases on a slower link would leave it more
    ds_slower = {**rows[0], "bandwidth": {**rows[0]["bandwidth"], "inter_node_all_peers_gbps": 3.0}}
    slower = calibration_from_e2e_results([ds_slower, *rows[1:]])
    assert slower.fixed_ms_multi_node["deepspeed_moe"] < cal.fixed_ms_multi_node["deepspeed_moe"]
    # results before the all-peers figure: the pairs systems' costs across nodes are left out, LocMoE's kept
    old = calibration_from_e2e_results([_row("mcore_alltoall", "2x2_slow", share=0.5),
                                        _row("locmoe", "2x2_slow", share=0.2)])
    assert old.inter_node == {"bandwidth_GBps": 2.0, "latency_us": 0.0} and set(old.fixed_ms_multi_node) == {"locmoe"}
    assert old.source["left_out_without_all_peers_rate"] == ["mcore_alltoall"]


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
