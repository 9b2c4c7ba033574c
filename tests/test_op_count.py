"""The one-node layer's launch count: ``benchmarks/op_count.py --megatron --report-flush`` at its default
config (4 gloo ranks on one node, 512 tokens/rank, 32 experts, top-4, GrAP gate, LocMoE routing). A
LocMoE layer must issue no more kernels per forward + backward than megatron-core's own alltoall layer,
and the LocMoE router at most 23 top-level ops; with ``dispatcher="allgather"`` no more than megatron-core's
allgather layer (about 20 s on 2 CPU cores)."""

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
