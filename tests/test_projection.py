"""``locmoe project``: traffic and time terms against hand-worked numbers, calibration, bad input."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest

from locmoe_plugin.cli import main
from locmoe_plugin.config import ConfigError
from locmoe_plugin.projection import (Calibration, ClusterSpec, ModelSpec, RoutingSpec, count_rows,
                                      expected_rows, predict_layer)
from locmoe_plugin.projection.cost import EXTRA_SYSTEMS, SYSTEMS, dense_grad_reduce_ms
from locmoe_plugin.projection.traffic import node_pmfs, padded_rows


def test_share_pmfs_by_hand():
    # 2 nodes x 2 ranks, 8 experts (G = 4 per node), k = 2, share 0.5: m ~ Bin(2, .5) = 1/4, 1/2, 1/4
    own, rem = node_pmfs("share", 2, 2, 8, 2, share=0.5)
    assert np.allclose(own, [0.25, 0.5, 0.25])  # j_own = k - m
    assert np.allclose(rem, [0.25, 0.5, 0.25])  # one remote node holds all m
    # uniform top-2 of 8 with G = 4: hypergeometric C(4,j) C(4,2-j) / C(8,2) = 6/28, 16/28, 6/28
    own, rem = node_pmfs("uniform", 2, 2, 8, 2)
    assert np.allclose(own, [6 / 28, 16 / 28, 6 / 28]) and np.allclose(rem, own)


def test_rows_by_hand():
    own, rem = node_pmfs("share", 2, 2, 8, 2, share=0.5)
    s = 100
    pairs = expected_rows("pairs", 2, 2, 8, 2, s, own, rem)
    assert pairs.inter == pytest.approx(s * 1.0)  # E[m] = 1 pair across
    assert pairs.intra == pytest.approx(s * 1.0 * 0.5)  # E[k - m] = 1, half of the node's experts elsewhere
    hier = expected_rows("hierarchical", 2, 2, 8, 2, s, own, rem)
    assert hier.inter == pytest.approx(s * 0.75)  # P(m > 0)
    # P(rank hit | j): G = 4, E_r = 2: j=1 -> 1/2, j=2 -> 1 - C(2,2)/C(4,2) = 5/6;
    # E f = 0.5 * 0.5 + 0.25 * 5/6; own tokens + one remote node's rail rows, one other local rank
    f = 0.5 * 0.5 + 0.25 * 5 / 6
    assert hier.intra == pytest.approx(s * (f + f))
    # one node: the hierarchical mode runs the pairs plan
    o1, r1 = node_pmfs("share", 1, 4, 8, 2, share=0.0)
    assert expected_rows("hierarchical", 1, 4, 8, 2, s, o1, r1) == expected_rows("pairs", 1, 4, 8, 2, s, o1, r1)


def test_count_rows_by_hand():
    # 2 nodes x 2 ranks, 4 experts (1 per rank). rank 0: token A -> experts {2, 3}, token B -> {1, 2}
    ids = [np.array([[2, 3], [1, 2]]), np.zeros((0, 2), int), np.array([[0, -1]]), np.zeros((0, 2), int)]
    c = count_rows(ids, 2, 2, 4)
    assert c[0]["pairs"].inter == 3 and c[0]["pairs"].intra == 1
    assert c[0]["hierarchical"].inter == 2  # A and B each once to node 1
    assert c[0]["hierarchical"].intra == 1  # own token B to rank 1; rail rank 2's token needs only rank 0
    # rank 2 gets A and B on the rail; of them only A needs rank 3
    assert c[2]["hierarchical"].intra == 1 and c[2]["hierarchical"].inter == 1


def test_deepspeed_padded_rows():
    # the measured run: 8192 tokens, k 4, c_f 1.25, 32 experts on 2 x 2 -> C = 1280, 16 remote experts
    r = padded_rows(2, 2, 32, 4, 8192, 1.25)
    assert r.inter == 16 * 1280 and r.intra == 8 * 1280
    # bench_layer's 640 MiB across nodes: 4 ranks x (dispatch + combine) x rows x 2048 x 2 B
    assert 4 * 2 * r.inter * 2048 * 2 / 2**20 == 640


def test_time_terms_by_hand():
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=100.0, intra_latency_us=10.0, inter_bw_GBps=10.0,
                     inter_latency_us=20.0, peak_tflops=100.0, gemm_efficiency=0.5)
    m = ModelSpec(hidden=1000, ffn=500, experts=8, topk=2, tokens_per_rank=100, swiglu=False, layers=2, seq=10)
    rt = RoutingSpec(cross_node_share=0.5)
    t = predict_layer("locmoe_flat", cl, m, rt)
    row = 1000 * 2  # bytes
    # per a2a: 20 us + max(100 rows * 2000 B / 10 GB/s, 50 rows * 2000 B / 100 GB/s) = 0.02 + 0.02 ms
    assert t.comm_ms == pytest.approx(4 * (0.02 + 100 * row / 10e6))
    # GEMM: 200 rows x (3 x 2 x 1000 x 500 x 2 matrices = 6e6 FLOPs) at 50 TFLOP/s, in ms
    assert t.gemm_ms == pytest.approx(200 * 6e6 / 50e9)
    assert t.inter_bytes == pytest.approx(4 * 100 * row)
    hier = predict_layer("locmoe_hier", cl, m, rt)
    own, rem = node_pmfs("share", 2, 2, 8, 2, share=0.5)
    rows = expected_rows("hierarchical", 2, 2, 8, 2, 100, own, rem)
    assert hier.comm_ms == pytest.approx(4 * (0.02 + rows.inter * row / 10e6 + 0.01 + rows.intra * row / 100e6))
    attn = 100 * 3 * (2 * 4 * 1000**2 + 4 * 10 * 1000) / 50e9
    assert hier.step_ms == pytest.approx(2 * (hier.layer_ms + attn))
    # overlap (split by origin): each of the 4 rail transfers hides, up to its own time, the local rows'
    # node hop, plus their experts' forward (dispatch) and backward (gradients' return) in DeepSpeed's layer
    cal = Calibration(fixed_ms={"locmoe": 1.0})
    plain = predict_layer("locmoe_hier", cl, m, rt, cal)
    rail, node = 0.02 + rows.inter * row / 10e6, 0.01 + rows.intra * row / 100e6
    local = 1 - plain.pair_share
    g = plain.gemm_ms
    hidden = (2 * min(rail, local * node) + min(rail, local * (node + g / 3))
              + min(rail, local * (node + 2 * g / 3)))
    ov = predict_layer("locmoe_hier_overlap", cl, m, rt, cal)
    assert ov.layer_ms == pytest.approx(plain.layer_ms - hidden) and hidden > 0
    assert ov.comm_ms == pytest.approx(plain.comm_ms) and ov.inter_bytes == plain.inter_bytes
    # Megatron's six phases: only the node hops hide
    ph = predict_layer("locmoe_hier_overlap_phases", cl, m, rt, cal)
    assert ph.layer_ms == pytest.approx(plain.layer_ms - 4 * min(rail, local * node))
    assert ov.layer_ms < ph.layer_ms < plain.layer_ms
    # no pair crosses: nothing to hide; one node: the overlap is a no-op
    zero = RoutingSpec(cross_node_share=0.0)
    assert predict_layer("locmoe_hier_overlap", cl, m, zero, cal).layer_ms == pytest.approx(
        predict_layer("locmoe_hier", cl, m, zero, cal).layer_ms)
    one = cl.with_nodes(1)
    assert predict_layer("locmoe_hier_overlap", one, m, rt, cal).layer_ms == pytest.approx(
        predict_layer("locmoe_hier", one, m, rt, cal).layer_ms)
    with pytest.raises(ConfigError, match="unknown system"):
        predict_layer("locmoe_chunked", cl, m, rt, cal)
    # imbalance scales the busiest rank's bytes and rows
    t2 = predict_layer("locmoe_flat", cl, m, RoutingSpec(cross_node_share=0.5, imbalance=2.0))
    assert t2.gemm_ms == pytest.approx(2 * t.gemm_ms)


def test_calibration_roundtrip(tmp_path):
    out = json.load(open("benchmarks/results/2026-11-22_h200x4_layer_locality_bias/layer_1node_4gpu.json"))
    from locmoe_plugin.projection import write_calibration, load_calibration

    cal = write_calibration(str(tmp_path / "c.json"), out)
    back = load_calibration(str(tmp_path / "c.json"))
    assert back.fixed_ms == pytest.approx(cal.fixed_ms) and back.expert_gemm_tflops == pytest.approx(cal.expert_gemm_tflops)
    # the GEMM rate: 12 s k d F flops in the GrAP row's 5.12 ms
    assert cal.expert_gemm_tflops == pytest.approx(12 * 8192 * 4 * 2048 * 1408 / 5.120740999984719e-3 / 1e12, rel=1e-6)
    # the calibrated one-node prediction gives back the measured time (fixed = measured - terms)
    cl = ClusterSpec(nodes=1, gpus_per_node=4, intra_bw_GBps=1.0, intra_latency_us=0, inter_bw_GBps=1.0,
                     inter_latency_us=0, peak_tflops=1.0)
    m = ModelSpec(hidden=2048, ffn=1408, experts=32, topk=4, tokens_per_rank=8192, swiglu=False)
    t = predict_layer("megatron_alltoall", cl, m, RoutingSpec(cross_node_share=0.0), back)
    assert t.layer_ms == pytest.approx(out["systems"]["mcore_alltoall"]["ms"])


def _run(capsys, *argv):
    rc = main(["project", *argv])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("argv, word", [
    (["--preset", "h100", "--inter-bw", "0"], "inter_bw_GBps"),
    (["--preset", "h100", "--experts", "60"], "divisible"),
    (["--preset", "h100", "--experts", "64", "--topk", "65"], "topk=65 > experts=64"),
    (["--preset", "h100", "--cross-node-share", "1.5"], "[0, 1]"),
    (["--preset", "h100", "--cross-node-share", "-0.1"], "[0, 1]"),
    (["--nodes", "2"], "--preset"),
    (["--preset", "h100", "--grad-dtype", "fp8"], "--grad-dtype"),
    (["--preset", "h100", "--optimizer", "zero1"], "--optimizer"),
    (["--preset", "h100", "--dispatch-format", "fp4"], "--dispatch-format"),
])
def test_bad_input(capsys, argv, word):
    rc, out = _run(capsys, *argv)
    assert rc == 2
    assert word in out.err and out.err.count("\n") == 1


def test_cli_table_json_png(capsys, tmp_path):
    rc, out = _run(capsys, "--preset", "ascend910b", "--nodes", "4", "--experts", "256", "--png", str(tmp_path / "p.png"))
    assert rc == 0 and "locmoe_hier" in out.out and "128 (32)" in out.out
    rc, out = _run(capsys, "--preset", "h100", "--json", "--cross-node-share", "0.2")
    d = json.loads(out.out)
    assert d["systems"]["megatron_alltoall"]["speedup_vs_megatron_alltoall"] == 1.0
    assert math.isclose(d["systems"]["locmoe_flat"]["pair_share"], 0.2)


def test_dense_gradient_reduction_by_hand(capsys):
    """The dense gradients' all-reduce across nodes: a ring over all N GPUs, one ring per NIC."""
    m = ModelSpec(hidden=1000, ffn=500, experts=8, topk=2, tokens_per_rank=100, layers=3)
    cl = ClusterSpec(nodes=2, gpus_per_node=4, intra_bw_GBps=100.0, intra_latency_us=0.0, inter_bw_GBps=10.0,
                     inter_latency_us=0.0, peak_tflops=100.0)
    grad_bytes = 3 * (4 * 1000**2 + 1000 * 8) * 4  # 3 layers x (attention 4 d^2 + router d E) x fp32
    want = 2 * 7 / 8 * grad_bytes / 4 / 10e6  # ms: 2 (N-1)/N of it over the G NICs of a node at 10 GB/s
    assert dense_grad_reduce_ms(cl, m) == pytest.approx(want)
    assert dense_grad_reduce_ms(cl, replace(m, grad_dtype="bf16")) == pytest.approx(want / 2)
    assert dense_grad_reduce_ms(cl.with_nodes(1), m) == 0.0  # inside one node: hidden beside the backward
    for system in SYSTEMS:  # the same for every system: added to the step whole in step_dp_ms
        t = predict_layer(system, cl, m, RoutingSpec(cross_node_share=0.2))
        assert t.dp_grad_ms == pytest.approx(want) and t.step_dp_ms == pytest.approx(t.step_ms + want)
    # the distributed optimizer: a reduce-scatter of the fp32 gradients and an all-gather of the bf16 parameters,
    # (N-1)/N of each, instead of 2 (N-1)/N of the gradients
    params = 3 * (4 * 1000**2 + 1000 * 8)
    dist_want = 7 / 8 * (params * 4 + params * 2) / 4 / 10e6
    assert dense_grad_reduce_ms(cl, replace(m, optimizer="distributed")) == pytest.approx(dist_want)
    assert dist_want == pytest.approx(0.75 * want)  # 6 bytes per parameter against 8
    bf16_both = replace(m, optimizer="distributed", grad_dtype="bf16")  # 2 + 2 bytes: as the bf16 all-reduce
    assert dense_grad_reduce_ms(cl, bf16_both) == pytest.approx(want / 2)
    with pytest.raises(ConfigError, match="grad_dtype"):
        replace(m, grad_dtype="int8")
    with pytest.raises(ConfigError, match="--optimizer"):
        replace(m, optimizer="zero3")
    rc, out = _run(capsys, "--preset", "h100", "--json", "--grad-dtype", "bf16")
    d = json.loads(out.out)["systems"]
    base, loc = d["megatron_alltoall"], d["locmoe_hier"]
    assert loc["speedup_with_dp_vs_megatron_alltoall"] == pytest.approx(base["step_dp_ms"] / loc["step_dp_ms"])
    assert 1.0 < loc["speedup_with_dp_vs_megatron_alltoall"] < loc["speedup_vs_megatron_alltoall"]
    rc, out = _run(capsys, "--preset", "h100", "--json", "--optimizer", "distributed")
    sharded = json.loads(out.out)
    rc, out = _run(capsys, "--preset", "h100", "--json")
    replicated = json.loads(out.out)
    assert sharded["inputs"]["model"]["optimizer"] == "distributed"
    assert (sharded["systems"]["locmoe_hier"]["dp_grad_ms"]
            == pytest.approx(0.75 * replicated["systems"]["locmoe_hier"]["dp_grad_ms"]))


def test_dispatch_format_prices_two_of_four_transfers_by_hand(capsys):
    """fp8 / int8 rows: the dispatch's forward and the combine's backward move hidden + 4 x ceil(hidden / 128)
    bytes per row instead of hidden x elt, in LocMoE's systems (overlapped too) across nodes only."""
    m = ModelSpec(hidden=2048, ffn=1408, experts=32, topk=4, tokens_per_rank=8192, layers=8)
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=200.0, intra_latency_us=0.0, inter_bw_GBps=3.0,
                     inter_latency_us=0.0, peak_tflops=900.0)
    r = RoutingSpec(cross_node_share=0.2)
    fp8 = replace(m, dispatch_format="fp8")
    assert fp8.dispatch_row_bytes == 2048 + 4 * 16 == replace(m, dispatch_format="int8").dispatch_row_bytes
    for system in SYSTEMS + EXTRA_SYSTEMS:
        native, coded = predict_layer(system, cl, m, r), predict_layer(system, cl, fp8, r)
        if system.startswith("locmoe_") and system != "locmoe_allgather":
            assert coded.inter_bytes == pytest.approx(native.inter_bytes * (4096 + 2112) / (2 * 4096))
            assert coded.intra_bytes == pytest.approx(native.intra_bytes * (4096 + 2112) / (2 * 4096))
            # the link-bound part shrinks by the same share; GEMM and fixed costs stay
            assert coded.comm_ms == pytest.approx(native.comm_ms * (4096 + 2112) / (2 * 4096))
            assert coded.gemm_ms == native.gemm_ms
            hidden = [t.fixed_ms + t.gemm_ms + t.comm_ms - t.layer_ms for t in (native, coded)]
            if "overlap" in system:  # shorter dispatch-direction transfers hide less, never more
                assert 0 < hidden[1] <= hidden[0], system
            else:
                assert hidden == pytest.approx([0, 0], abs=1e-9), system
        else:  # the other frameworks' systems stay native
            assert coded == native, system
        # on one node the dispatcher sends rows native whatever the format
        one = replace(cl, nodes=1)
        assert predict_layer(system, one, fp8, r) == predict_layer(system, one, m, r), system
    with pytest.raises(ConfigError, match="--dispatch-format"):
        replace(m, dispatch_format="bf8")
    rc, out = _run(capsys, "--preset", "h100", "--json", "--dispatch-format", "fp8")
    d = json.loads(out.out)
    assert rc == 0 and d["inputs"]["model"]["dispatch_format"] == "fp8"
    rc, out = _run(capsys, "--preset", "h100", "--json")
    native = json.loads(out.out)["systems"]["locmoe_hier"]
    assert d["systems"]["locmoe_hier"]["inter_bytes"] < native["inter_bytes"]


def test_default_share_is_the_default_budget_per_node_count(capsys):
    """Without --cross-node-share LocMoE holds its default budget, which scales with the nodes."""
    rt = RoutingSpec()
    assert [rt.share_on(n) for n in (1, 2, 4, 8)] == pytest.approx([0.0, 0.2, 0.3, 0.35])
    assert RoutingSpec(cross_node_share=0.1).share_on(4) == 0.1
    for nodes, share in (("2", 0.2), ("4", 0.3)):
        rc, out = _run(capsys, "--preset", "h100", "--nodes", nodes, "--experts", "64", "--json")
        assert rc == 0
        assert math.isclose(json.loads(out.out)["systems"]["locmoe_flat"]["pair_share"], share, rel_tol=1e-9)


def test_inter_scale_by_hand():
    from locmoe_plugin.projection.cost import inter_scale

    assert inter_scale(2.0, 4, one_way_ratio=1.0) == 2.0  # full duplex: the sends decide
    # shared (one direction alone reaches 2 x the exchange's rate): the busiest sends 2 x the mean and
    # receives the mean of the other three, (4 - 2) / 3
    assert inter_scale(2.0, 4, one_way_ratio=2.0) == pytest.approx((2.0 + 2.0 / 3.0) / 2)
    assert inter_scale(1.0, 4, 2.0) == pytest.approx(1.0) and inter_scale(4.0, 4, 2.0) == pytest.approx(2.0)
    # in between: one direction alone at 1.2 x; on 2 ranks sending 1.13 x the mean the shared budget
    # (1.13 + 0.87) / 2 = 1 binds, at 1.37 x the one-way rate does (1.37 / 1.2)
    assert inter_scale(1.13, 2, 1.2) == pytest.approx(1.0)
    assert inter_scale(1.37, 2, 1.2) == pytest.approx(1.37 / 1.2)
    assert inter_scale(1.5, 2, 5.0) == inter_scale(1.5, 2, 2.0)  # clamped to [1, 2]


def test_one_way_rate_sets_the_duplex():
    """A calibration's one-way figure places the link between full duplex and shared."""
    from locmoe_plugin.projection.calibration import Calibration

    cl = ClusterSpec(nodes=2, gpus_per_node=1, intra_bw_GBps=100.0, intra_latency_us=0.0, inter_bw_GBps=5.0,
                     inter_latency_us=0.0, peak_tflops=100.0)
    assert cl.inter_one_way_ratio == 1.0 and replace(cl, inter_duplex="shared").inter_one_way_ratio == 2.0
    cal = Calibration(inter_node={"bandwidth_GBps": 5.0, "latency_us": 0.0, "duplex": "full", "one_way_GBps": 6.0})
    assert cal.apply(cl).inter_one_way_ratio == pytest.approx(1.2)
    m = ModelSpec(hidden=1000, ffn=500, experts=8, topk=2, tokens_per_rank=100, swiglu=False)
    skew = RoutingSpec(cross_node_share=0.5, inter_imbalance=1.5)
    full, mid = predict_layer("locmoe_flat", cl, m, skew), predict_layer("locmoe_flat", cl, m, skew, cal)
    shared = predict_layer("locmoe_flat", replace(cl, inter_duplex="shared"), m, skew)
    assert shared.comm_ms < mid.comm_ms < full.comm_ms
    with pytest.raises(ConfigError, match="one_way"):
        Calibration(inter_node={"bandwidth_GBps": 5.0, "one_way_GBps": 0.0})
    with pytest.raises(ConfigError, match="inter_one_way_bw_GBps"):
        replace(cl, inter_one_way_bw_GBps=-1.0)


def test_inter_imbalance_scales_cross_node_bytes_only():
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=100.0, intra_latency_us=0.0, inter_bw_GBps=10.0,
                     inter_latency_us=0.0, peak_tflops=100.0, gemm_efficiency=0.5)
    m = ModelSpec(hidden=1000, ffn=500, experts=8, topk=2, tokens_per_rank=100, swiglu=False)
    base = predict_layer("locmoe_flat", cl, m, RoutingSpec(cross_node_share=0.5))
    t = predict_layer("locmoe_flat", cl, m, RoutingSpec(cross_node_share=0.5, inter_imbalance=2.0))
    assert t.gemm_ms == pytest.approx(base.gemm_ms)  # expert rows stay balanced
    inter = 100 * 1000 * 2 / 10e6  # ms per all-to-all at balance (it dominates the intra part)
    assert t.comm_ms == pytest.approx(4 * 2 * inter)
    shared = predict_layer("locmoe_flat", replace(cl, inter_duplex="shared"), m,
                           RoutingSpec(cross_node_share=0.5, inter_imbalance=2.0))
    assert shared.comm_ms == pytest.approx(4 * (2 + 2 / 3) / 2 * inter)
    with pytest.raises(ConfigError, match="inter_imbalance"):
        RoutingSpec(cross_node_share=0.5, inter_imbalance=0.5)
    with pytest.raises(ConfigError, match="inter_duplex"):
        replace(cl, inter_duplex="half")


def test_two_stage_extra_from_dispatch_rows():
    from locmoe_plugin.projection.calibration import calibration_from_layer_results, two_stage_extra_ms

    def row(k, tree, pairs):
        return {"topk": k, "systems": {"hier_tree": {"ms": tree}, "hierarchical": {"ms": pairs}}}

    res = [{"meta": {"nodes": 1}, "rows": [row(4, 5.0, 4.0), row(4, 4.5, 4.0), row(4, 7.0, 4.0), row(2, 9.0, 1.0)]},
           {"meta": {"nodes": 2}, "rows": [row(4, 99.0, 1.0)]}]  # across nodes: not a host-cost measurement
    assert two_stage_extra_ms(res, 4) == pytest.approx(1.0)  # median of 1.0, 0.5, 3.0
    assert two_stage_extra_ms(res, 8) is None
    out = json.load(open("benchmarks/results/2026-11-22_h200x4_layer_locality_bias/layer_1node_4gpu.json"))
    cal = calibration_from_layer_results(out, two_stage_ms=1.5)
    assert cal.fixed_ms_multi_node["locmoe"] == pytest.approx(cal.fixed_ms["locmoe"] + 1.5)
    assert cal.fixed_for("locmoe_hier", 2) == pytest.approx(cal.fixed_ms["locmoe"] + 1.5)
    assert cal.fixed_for("locmoe_hier", 1) == pytest.approx(cal.fixed_ms["locmoe"])
    dense = calibration_from_layer_results(out, fixed_from="locmoe_dense")
    assert dense.fixed_ms["locmoe"] != pytest.approx(cal.fixed_ms["locmoe"])


def test_measured_link_reaches_the_model():
    from locmoe_plugin.projection.calibration import inter_link

    meta = {"inter_node_bw_GBps": 2.0, "inter_node_link": {"bandwidth_GBps": 2.0, "latency_us": 80.0,
                                                           "one_way_GBps": 3.9, "duplex": "shared"}}
    link = inter_link(meta)
    assert link == {"bandwidth_GBps": 2.0, "latency_us": 80.0, "duplex": "shared", "one_way_GBps": 3.9,
                    "probe_samples": 1}
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=1.0, intra_latency_us=0, inter_bw_GBps=9.0,
                     inter_latency_us=0, peak_tflops=1.0)
    eff = Calibration(inter_node=link).apply(cl)
    assert (eff.inter_bw_GBps, eff.inter_latency_us, eff.inter_duplex) == (2.0, 80.0, "shared")
    assert eff.inter_one_way_ratio == pytest.approx(1.95)
    assert inter_link({"inter_node_bw_GBps": 0.0}) is None


def test_probed_rates_price_their_own_transfers():
    from locmoe_plugin.projection.calibration import inter_link
    from locmoe_plugin.projection.cost import predict_layer

    link = inter_link({"inter_node_link": {"bandwidth_GBps": 2.0, "latency_us": 0.0, "collective_GBps": 4.0,
                                           "flat_GBps": 8.0}})
    assert (link["collective_GBps"], link["flat_GBps"]) == (4.0, 8.0)
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=1e6, intra_latency_us=0, inter_bw_GBps=2.0,
                     inter_latency_us=0, peak_tflops=1e6)
    model = ModelSpec(hidden=1024, ffn=512, experts=8, topk=2, tokens_per_rank=1024, dtype="bf16")
    routing = RoutingSpec(cross_node_share=0.5)
    probed = Calibration(inter_node=link)
    rail_only = Calibration(inter_node={"bandwidth_GBps": 2.0, "latency_us": 0.0})

    def comm(system, cal):
        return predict_layer(system, cl, model, routing, cal).comm_ms

    # the allgather layer: 4 transfers of (N - 1) s rows x 2 KiB at the collectives' 4 GB/s, not the rail's 2
    assert comm("megatron_allgather", probed) == pytest.approx(4 * 1024 * 2048 / 4e6)
    assert comm("megatron_allgather", rail_only) == pytest.approx(2 * comm("megatron_allgather", probed))
    # the pairs all-to-alls at the all-peers rate (4 x faster than the rail here); the rail stage unchanged
    for system in ("megatron_alltoall", "deepspeed_moe", "locmoe_flat"):
        assert comm(system, rail_only) == pytest.approx(4 * comm(system, probed))
    assert comm("locmoe_hier", probed) == comm("locmoe_hier", rail_only)
    for bad in ({"collective_GBps": 0.0}, {"flat_GBps": -1.0}):
        with pytest.raises(ConfigError, match="flat_GBps"):
            Calibration(inter_node={"bandwidth_GBps": 2.0, **bad})


def _validate_projection():
    """``benchmarks/validate_projection.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_projection", "benchmarks/validate_projection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_validation_script_predicts_every_measured_pair():
    mod = _validate_projection()
    rows = [r for r in mod.validate("benchmarks/results") if r["variant"] == "model"]
    assert len(rows) >= 8 and {"mcore_alltoall", "locmoe_grap", "locmoe_dense"} <= {r["system"] for r in rows}
    for r in rows:
        assert math.isfinite(r["error"]) and r["predicted_ms"] > 0
        assert (r["two_stage_ms"] > 0) == r["system"].startswith("locmoe")
    # the 2-GPU pair (1 node x 2 -> 2 nodes x 1) with the probe's latency; errored rows are skipped
    new = {r["system"]: r for r in rows if r["run"] == "2026-11-26_h200x2_overlap_layer/layer"}
    assert set(new) == {"mcore_alltoall", "mcore_allgather", "mcore_grouplimited", "deepspeed_moe", "locmoe_grap"}
    assert all(r["layout"] == "2x1" and r["latency_us"] > 0 and r["duplex"] == "full" for r in new.values())
    assert new["mcore_grouplimited"]["inter_imbalance"] > 1.2  # from the recorded per-rank bytes
    dis = mod.validate_dispatch("benchmarks/results")
    got = {(r["setting"], r["system"], round(r["share"], 2)) for r in dis}
    assert {(st, sy, sh) for st in ("socket", "socket8") for sy in ("hierarchical", "overlap")
            for sh in (0.0, 0.15, 0.5)} <= got
    # a run without its own probe takes `locmoe bandwidth`'s figure of its link setting; one with a probe its own
    old = [r for r in dis if r["run"].startswith("2026-11-26_h200x2_overlap_layer/")]
    assert {r["link_GBps"] for r in old} == {3.20, 6.75} and all(r["probe"] == "one-shot" for r in old)
    probed = [r for r in dis if r["run"].startswith("2026-11-26_h100x4_91beeac/")]
    assert probed and all(r["probe"] == "repeated" for r in probed)
    for r in dis:  # within one call: more cross-node bytes, or a slower link (no lower latency), never less time
        slower = [q for q in dis if q["system"] == r["system"] and q["share"] >= r["share"]
                  and q["link_GBps"] <= r["link_GBps"] and q["latency_us"] >= r["latency_us"]
                  and os.path.dirname(q["run"]) == os.path.dirname(r["run"])]
        assert all(q["predicted_ms"] >= r["predicted_ms"] - 1e-9 for q in slower)
    # systems with a dispatch format: priced in that format from the one-node row of the same system, so at one
    # run's link and share the fp8 row's modelled transfer time is below the native row's
    assert mod.dispatch_system("overlap_phases_fp8") == ("locmoe_hier", True, "fp8")
    assert mod.dispatch_system("flat_int8") == ("locmoe_flat", False, "int8")
    assert mod.dispatch_system("megatron") == (None, False, "native")
    coded = [r for r in dis if r["system"] == "hierarchical_fp8" and r["share"] > 0.1]
    assert coded
    for r in coded:
        native = next(q for q in dis if q["run"] == r["run"] and q["system"] == "hierarchical"
                      and q["share"] == r["share"])
        assert 0 < r["predicted_ms"] - r["one_node_ms"] < native["predicted_ms"] - native["one_node_ms"]


def test_allgather_rows_follow_the_layout():
    from locmoe_plugin.projection.traffic import Rows, allgather_rows

    assert allgather_rows(2, 1, 8) == Rows(inter=8.0, intra=0.0)
    assert allgather_rows(1, 4, 8) == Rows(inter=0.0, intra=24.0)
    assert allgather_rows(4, 2, 8) == Rows(inter=24.0, intra=32.0)  # (P - 1) s = 56 rows in all


def test_validation_takes_a_list_of_result_folders(tmp_path):
    import shutil

    mod = _validate_projection()
    a = "benchmarks/results/2026-11-22_h200x4_layer"
    b = tmp_path / "new_4gpu_run"  # a run folder of its own, as a new measurement arrives
    shutil.copytree("benchmarks/results/2026-11-26_h200x2_overlap_layer/layer", b)
    one = mod.validate([a])
    both = mod.validate([a, str(b), a])  # a repeated folder counts once
    assert {r["run"] for r in both} == {"2026-11-22_h200x4_layer", "new_4gpu_run"}
    assert [r for r in both if r["run"] == "2026-11-22_h200x4_layer"] == one
    # the two-stage host cost comes from one-node dispatch runs, found under benchmarks/results when the
    # given folders have none
    new = [r for r in both if r["run"] == "new_4gpu_run" and r["system"] == "locmoe_grap"]
    assert new and new[0]["two_stage_ms"] > 0 and new[0]["spread"] is not None
    assert mod.round_spread({"ms_rounds": [1.0, 2.0, 3.0, 4.0, 5.0]}) == (4.0 - 2.0) / 2 / 3.0
    assert mod.round_spread({"ms": 1.0}) is None


def _e2e_result(model: dict, step_ms: float, gbps: float, **fields) -> dict:
    """A ``bench_e2e.py`` result of 400 tokens per step on 2 nodes x 2 (``fields`` replace or add keys)."""
    return {"nodes": 2, "gpus_per_node": 2, "layout": "2x2_fast", "model": model, "tokens_per_step": 400,
            "tokens_per_s": {"median": 400 / step_ms * 1e3}, "bandwidth": {"inter_node_gbps": gbps}, **fields}


def test_validation_checks_the_dense_gradient_term_on_fp32_bf16_pairs(tmp_path):
    """An end-to-end system run with fp32 and with bf16 gradient reduction in one launch: the measured step
    difference against the predicted one (a ring over the 4 ranks, one ring per rank of a node)."""
    mod = _validate_projection()
    model = {"num_layers": 2, "hidden_size": 1000, "num_experts": 8, "topk": 2, "ffn_hidden_size": 500,
             "seq_len": 100, "micro_batch": 1}

    def result(step_ms, gbps):
        return _e2e_result(model, step_ms, gbps, system="locmoe")

    run = tmp_path / "call" / "e2e"
    run.mkdir(parents=True)
    (run / "e2e_2x2_fast_locmoe.json").write_text(json.dumps(result(500.0, 3.0)))
    (run / "e2e_2x2_fast_locmoe+bf16grad.json").write_text(json.dumps(result(450.0, 5.0)))
    for name in ("e2e_1x4_locmoe.json", "e2e_1x4_locmoe+bf16grad.json"):  # one node: no inter-node term, no row
        (run / name).write_text(json.dumps({**result(100.0, 5.0), "nodes": 1, "layout": "1x4"}))
    (rows,) = mod.validate_dense_grads([str(tmp_path)])
    params = 2 * (4 * 1000**2 + 1000 * 8)  # 2 layers x (attention 4 d^2 + router d E)
    assert rows["pair"] == "fp32 - bf16" and rows["system"] == "locmoe"
    assert rows["measured_ms"] == pytest.approx(50.0) and rows["link_GBps"] == pytest.approx(4.0)
    assert rows["predicted_ms"] == pytest.approx(2 * 3 / 4 * params * (4 - 2) / 2 / 4e6)
    # the distributed optimizer's run beside the replicated one: an fp32 all-reduce (8 bytes per parameter on the
    # ring) against a reduce-scatter of fp32 gradients and an all-gather of bf16 parameters (4 + 2)
    (run / "e2e_2x2_fast_locmoe+distopt.json").write_text(json.dumps(result(480.0, 5.0)))
    rows = {r["pair"]: r for r in mod.validate_dense_grads([str(tmp_path)])}
    d = rows["replicated - distributed"]
    assert d["measured_ms"] == pytest.approx(20.0) and d["system"] == "locmoe"
    assert d["predicted_ms"] == pytest.approx(3 / 4 * params * (8 - 6) / 2 / 4e6)
    # both settings changed: each file pairs with the one that differs in one setting only; with bf16 gradients
    # the two optimizers move 4 bytes per parameter alike (predicted 0, left out of the ratios)
    (run / "e2e_2x2_fast_locmoe+bf16grad+distopt.json").write_text(json.dumps(result(440.0, 5.0)))
    for f in run.glob("e2e_2x2_fast_*.json"):  # each result names its variant, as bench_e2e writes it
        f.write_text(json.dumps({**json.loads(f.read_text()), "variant": f.stem.removeprefix("e2e_2x2_fast_")}))
    rows = mod.validate_dense_grads([str(tmp_path)])
    got = sorted((r["system"], r["pair"], round(r["measured_ms"], 6)) for r in rows)
    assert got == [("locmoe", "fp32 - bf16", 50.0), ("locmoe", "replicated - distributed", 20.0),
                   ("locmoe+bf16grad", "replicated - distributed", 10.0),
                   ("locmoe+distopt", "fp32 - bf16", 40.0)]
    alike = next(r for r in rows if r["system"] == "locmoe+bf16grad")
    assert alike["predicted_ms"] == 0.0


def test_concentrated_copies_by_hand_and_against_the_counter():
    """The "copies" model: a token's remote pairs on one other node, pairs_per_copy of them per copy."""
    from locmoe_plugin.projection import count_rows, expected_rows
    from locmoe_plugin.projection.traffic import node_pmfs

    # 2 nodes of 4 experts, top-4, share 0.25, 2 pairs per copy: half the tokens cross (c = 0.25 * 4 / 2)
    own, rem = node_pmfs("copies", 2, 2, 8, 4, share=0.25, pairs_per_copy=2.0)
    assert rem.tolist() == pytest.approx([0.5, 0, 0.5, 0, 0]) and own.tolist() == pytest.approx([0, 0, 0.5, 0, 0.5])
    # a fractional mean splits between the two integers around it; the pair share holds
    own, rem = node_pmfs("copies", 4, 1, 16, 4, share=0.3, pairs_per_copy=2.5)
    assert float(np.arange(5) @ rem) * 3 == pytest.approx(0.3 * 4) and own.sum() == pytest.approx(1.0)
    assert rem[2] == pytest.approx(rem[3]) and rem[1] == rem[4] == 0
    # fewer pairs per copy than the share needs: every token crosses, to one node
    own, rem = node_pmfs("copies", 2, 1, 8, 4, share=0.5, pairs_per_copy=1.0)
    assert rem[0] == pytest.approx(0.0) and rem[2] == pytest.approx(1.0)
    # 4 nodes, more remote pairs per token than one copy carries (3 at 1.3 per copy): every token crosses, to
    # 3 / 1.3 = 2.31 of its 3 other nodes on average, and keeps 1 pair at home
    own, rem = node_pmfs("copies", 4, 1, 16, 4, share=0.75, pairs_per_copy=1.3)
    c = 3 / (3 * 1.3)
    assert rem.tolist() == pytest.approx([1 - c, 0.7 * c, 0.3 * c, 0, 0]) and own.tolist() == pytest.approx([0, 1, 0, 0, 0])
    assert float(np.arange(5) @ rem) * 3 == pytest.approx(0.75 * 4)
    assert expected_rows("hierarchical", 4, 1, 16, 4, 100, own, rem).inter == pytest.approx(100 * 3 * c)

    # nothing crosses at share 0; a layout with fewer than k experts per node has no such router: the share model
    own, rem = node_pmfs("copies", 2, 2, 8, 4, share=0.0, pairs_per_copy=2.0)
    assert rem[0] == 1.0 and own[4] == 1.0 and expected_rows("hierarchical", 2, 2, 8, 4, 100, own, rem).inter == 0
    for got, want in zip(node_pmfs("copies", 4, 1, 16, 8, share=0.3, pairs_per_copy=2.0),
                         node_pmfs("share", 4, 1, 16, 8, share=0.3)):
        assert got.tolist() == pytest.approx(want.tolist())
    # a sampled routing of that kind, counted exactly: half the tokens put 2 of 4 experts on the other node
    rng = np.random.default_rng(0)
    s, e, r = 4000, 16, 2  # 2 nodes x 2 ranks, 4 experts per rank, 8 per node
    ids = []
    for p in range(4):
        node = p // r
        local, remote = np.arange(8) + 8 * node, np.arange(8) + 8 * (1 - node)
        rows = []
        for _ in range(s):
            n_rem = 2 if rng.random() < 0.5 else 0
            rows.append(np.concatenate([rng.choice(local, 4 - n_rem, replace=False),
                                        rng.choice(remote, n_rem, replace=False)]))
        ids.append(np.stack(rows))
    counted = count_rows(ids, 2, r, e)
    own, rem = node_pmfs("copies", 2, r, e, 4, share=0.25, pairs_per_copy=2.0)
    exp = expected_rows("hierarchical", 2, r, e, 4, s, own, rem)
    assert np.mean([c["hierarchical"].inter for c in counted]) == pytest.approx(exp.inter, rel=0.03)
    assert np.mean([c["hierarchical"].intra for c in counted]) == pytest.approx(exp.intra, rel=0.03)
    # the binomial "share" model of the same pair share overstates this router's copies
    b_own, b_rem = node_pmfs("share", 2, r, e, 4, share=0.25)
    assert expected_rows("hierarchical", 2, r, e, 4, s, b_own, b_rem).inter > 1.3 * exp.inter


def test_pairs_per_copy_input():
    with pytest.raises(ConfigError, match=r"pairs_per_copy=0.5: a copy carries at least one pair"):
        RoutingSpec(cross_node_share=0.2, pairs_per_copy=0.5)
    m = ModelSpec(hidden=2048, ffn=1408, experts=32, topk=4, tokens_per_rank=8192, swiglu=False)
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=200.0, intra_latency_us=0, inter_bw_GBps=2.0,
                     inter_latency_us=0, peak_tflops=1000.0)
    spread = predict_layer("locmoe_hier", cl, m, RoutingSpec(cross_node_share=0.285))
    concentrated = predict_layer("locmoe_hier", cl, m, RoutingSpec(cross_node_share=0.285, pairs_per_copy=2.9))
    assert concentrated.layer_ms < spread.layer_ms
    flat = [predict_layer("locmoe_flat", cl, m, RoutingSpec(cross_node_share=0.285, pairs_per_copy=mu))
            for mu in (None, 2.9)]
    assert flat[0].layer_ms == pytest.approx(flat[1].layer_ms)  # the pairs plan sends one row per pair either way


def test_validation_reads_pairs_per_copy_from_the_recorded_bytes():
    mod = _validate_projection()
    m = ModelSpec(hidden=16, ffn=16, experts=8, topk=4, tokens_per_rank=100, dtype="bf16", swiglu=False)
    # 0.25 x 4 x 100 = 100 remote pairs per rank over 50 rail rows (50 x 16 x 2 bytes) = 2 pairs per copy
    v = {"cross_node_share": 0.25, "inter_bytes_per_rank": {"dispatch": [1500.0, 1700.0]}}
    assert mod.measured_pairs_per_copy(v, m, 4, ranks=2) == pytest.approx(2.0)
    assert mod.measured_pairs_per_copy({"cross_node_share": 0.25}, m, 4, ranks=2) is None
    assert mod.measured_pairs_per_copy({**v, "cross_node_share": 0.0}, m, 4, ranks=2) is None
    # no per-rank counts: the run's total (2 ranks' dispatch + combine = 4 x 1600 bytes) gives the same mean
    total = {"cross_node_share": 0.25, "inter_node_MiB": 4 * 1600.0 / 2**20}
    assert mod.measured_pairs_per_copy(total, m, 4, ranks=2) == pytest.approx(2.0)
    assert mod.measured_pairs_per_copy(total, m, 4, ranks=4) == pytest.approx(4.0)  # the same bytes over more ranks


def test_validation_reports_how_far_the_projected_speedup_leans():
    mod = _validate_projection()

    def row(run, system, predicted, measured):
        return {"run": run, "system": system, "predicted_ms": predicted, "measured_ms": measured, "layout": "2x2",
                "probe": "per-pattern", "link_GBps": 2.0}

    rows = [row("a", "mcore_alltoall", 120.0, 100.0), row("a", "locmoe_dense", 40.0, 50.0),  # 3.0 x vs 2.0 x
            row("b", "mcore_alltoall", 90.0, 100.0),  # no LocMoE row: no entry
            row("c", "mcore_alltoall", 100.0, 100.0), row("c", "locmoe_dense", 50.0, 50.0)]
    got = {x["run"]: x for x in mod.speedup_lean(rows)}
    assert set(got) == {"a", "c"}
    assert got["a"]["predicted"] == pytest.approx(3.0) and got["a"]["measured"] == pytest.approx(2.0)
    assert got["a"]["ratio"] == pytest.approx(1.5) and got["c"]["ratio"] == pytest.approx(1.0)


def test_validation_checks_the_dispatch_format_term_on_native_fp8_pairs(tmp_path):
    """LocMoE with native rows and with fp8 rows in one folder: the measured step difference against the
    projection's locmoe_hier step native minus fp8 at the native run's share and the mean measured rate."""
    mod = _validate_projection()
    model = {"num_layers": 2, "hidden_size": 1024, "num_experts": 8, "topk": 2, "ffn_hidden_size": 512,
             "seq_len": 100, "micro_batch": 1}

    def result(step_ms, gbps, nodes=2, layout="2x2_fast"):
        return _e2e_result(model, step_ms, gbps, nodes=nodes, layout=layout, cross_node_share=0.2)

    run = tmp_path / "call" / "e2e"
    run.mkdir(parents=True)
    (run / "e2e_2x2_fast_locmoe.json").write_text(json.dumps(result(500.0, 3.0)))
    (run / "e2e_2x2_fast_locmoe_fp8.json").write_text(json.dumps(result(480.0, 5.0)))
    (run / "e2e_2x2_slow_locmoe_fp8.json").write_text(json.dumps(result(480.0, 5.0, layout="2x2_slow")))  # no pair
    for name in ("e2e_1x4_locmoe.json", "e2e_1x4_locmoe_fp8.json"):  # one node: no row
        (run / name).write_text(json.dumps(result(100.0, 5.0, nodes=1, layout="1x4")))
    rows = mod.validate_dispatch_format([str(tmp_path)])
    assert len(rows) == 1 and rows[0]["format"] == "fp8" and rows[0]["layout"] == "2x2_fast"
    assert rows[0]["measured_ms"] == pytest.approx(20.0) and rows[0]["link_GBps"] == pytest.approx(4.0)
    cl = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=200.0, intra_latency_us=0.0, inter_bw_GBps=4.0,
                     inter_latency_us=0.0, peak_tflops=1000.0)
    m = ModelSpec(hidden=1024, ffn=512, experts=8, topk=2, tokens_per_rank=100, layers=2)
    r = RoutingSpec(cross_node_share=0.2)
    native, coded = predict_layer("locmoe_hier", cl, m, r), predict_layer("locmoe_hier", cl, replace(m, dispatch_format="fp8"), r)
    assert rows[0]["predicted_ms"] == pytest.approx(native.step_ms - coded.step_ms) and rows[0]["predicted_ms"] > 0


def test_validation_takes_locmoe_across_2_nodes_from_its_2_node_plan_on_one_node(tmp_path):
    """Where a call timed the 2-node plan on its one node's links (run_gpu_layer.sh LAYOUTS=plan2nodes), LocMoE's
    cost across 2 nodes comes from that run, not from the one-node run plus the two-stage figure."""
    import shutil

    mod = _validate_projection()
    run = tmp_path / "call"
    shutil.copytree("benchmarks/results/2026-11-28_h100x4_3df8f58_validation/fast", run)
    before = {r["system"]: r for r in mod.validate([str(run)]) if r["variant"] == "model"}
    assert before["locmoe_dense"]["two_stage_source"] == "own call"
    plan2 = json.loads((run / "layer_1node_4gpu.json").read_text())  # stands for a run with 5 ms more host work
    plan2["meta"].update(nodes=2, gpus_per_node=2, inter_node_bw_GBps=150.0)
    plan2["meta"].pop("inter_node_link", None)
    plan2["systems"]["locmoe_dense"]["ms"] += 5.0
    (run / "layer_plan2nodes_4gpu.json").write_text(json.dumps(plan2))
    after = {r["system"]: r for r in mod.validate([str(run)]) if r["variant"] == "model"}
    dense = after["locmoe_dense"]
    assert dense["two_stage_source"] == "2-node plan on one node"
    assert dense["predicted_ms"] - before["locmoe_dense"]["predicted_ms"] == pytest.approx(
        dense["two_stage_ms"] - before["locmoe_dense"]["two_stage_ms"])
    assert after["mcore_alltoall"] == before["mcore_alltoall"]  # only LocMoE's plan differs across nodes
    plan2["systems"]["locmoe_dense"]["ms"] += 3.0  # 3 ms more in that run: 3 ms more across nodes
    (run / "layer_plan2nodes_4gpu.json").write_text(json.dumps(plan2))
    more = {r["system"]: r for r in mod.validate([str(run)]) if r["variant"] == "model"}["locmoe_dense"]
    assert more["predicted_ms"] - dense["predicted_ms"] == pytest.approx(3.0)
    plan2["meta"]["gpus_per_node"] = 1  # another split of the GPUs is not this layout's plan
    (run / "layer_plan2nodes_4gpu.json").write_text(json.dumps(plan2))
    assert [r for r in mod.validate([str(run)]) if r["variant"] == "model"] == list(before.values())
