"""The one-node layer's launch count: ``benchmarks/op_count.py --megatron --report-flush`` at its default
config (4 gloo ranks on one node, 512 tokens/rank, 32 experts, top-4, GrAP gate, LocMoE routing). A
LocMoE layer must issue no more kernels per forward + backward than megatron-core's own alltoall layer,
and the LocMoE router at most 23 top-level ops; with ``dispatcher="allgather"`` no more than megatron-core's
allgather layer (about 20 s on 2 CPU cores). Across 2 nodes x 2 the layer (two-stage plan) must stay within
a small margin of its measured kernel count (another ~15 s)."""

import os
import sys

import pytest

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.multiproc

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def test_locmoe_layer_issues_no_more_kernels_than_megatron_alltoall():
    sys.path.insert(0, BENCHMARKS)  # the spawned ranks import op_count by name (spawn passes sys.path on)
    try:
        import op_count
    finally:
        sys.path.remove(BENCHMARKS)
    a = op_count.parse_args(["--megatron", "--report-flush", "--allgather"])
    sys.path.insert(0, BENCHMARKS)
    try:
        counted = op_count.count(a)
    finally:
        sys.path.remove(BENCHMARKS)
    ops_ours, kernels_ours, _ = counted["LocMoELayer"]
    _, kernels_mega, _ = counted["megatron alltoall"]
    line = op_count.comparison(counted)
    assert sum(kernels_ours.values()) <= sum(kernels_mega.values()), line
    assert ops_ours["router"] <= 23, line
    # every phase was seen (a renamed phase would otherwise pass by counting nothing)
    assert {"router", "dispatch_preprocess", "token_dispatch", "experts"} <= set(kernels_ours), sorted(kernels_ours)
    gather_line = op_count.comparison(counted, "LocMoELayer allgather", "megatron allgather")
    gather_ours, gather_mega = (sum(counted[n][1].values()) for n in ("LocMoELayer allgather", "megatron allgather"))
    assert gather_ours <= gather_mega, gather_line
    assert {"router", "token_dispatch", "token_combine"} <= set(counted["LocMoELayer allgather"][1])


# LocMoELayer across 2 nodes x 2 (two-stage plan; dense gate, mu 0, so about half the pairs cross nodes)
# measured 312 kernels per forward + backward (docs/dispatcher.md, "Host work of the two-stage plan"; the
# router's counts folded into the count exchange: two more kernels than its all-reduce, one collective fewer).
# The margin of 8 covers what the random routing may change without a code change: a hop whose copy level
# turns sparse adds a stable sort and a gather (up to ~4 kernels as the CPU profiler counts a sort), and a
# hop whose group moves no row drops or adds its packing.
TWO_NODE_KERNELS, TWO_NODE_MARGIN = 312, 8


def test_two_node_locmoe_layer_kernel_count_does_not_grow():
    sys.path.insert(0, BENCHMARKS)
    try:
        import op_count

        a = op_count.parse_args(["--megatron", "--report-flush", "--gpus-per-node", "2", "--gate", "dense",
                                 "--mu", "0"])
        counted = op_count.count(a)
    finally:
        sys.path.remove(BENCHMARKS)
    _, kernels, _ = counted["LocMoELayer"]
    assert sum(kernels.values()) <= TWO_NODE_KERNELS + TWO_NODE_MARGIN, (op_count.comparison(counted), kernels)
    assert {"dispatch_preprocess", "token_dispatch", "token_combine"} <= set(kernels), sorted(kernels)
