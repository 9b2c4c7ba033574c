"""bench_layer's system list: the allgather LocMoE row on one node, and its comparison with Megatron's
allgather layer (the timing itself runs on GPUs; a toy CPU run is in docs/benchmarks.md)."""

import types

from .test_bench_layer_rounds import bench  # noqa: F401  (the fixture: benchmarks/bench_layer.py loaded once)


def test_locmoe_allgather_runs_on_the_first_gates_model(bench):
    args = types.SimpleNamespace(systems=["locmoe", "locmoe_allgather", "mcore_allgather"], gates=["dense", "grap"],
                                 baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_dense", "dense"), ("locmoe_grap", "grap"),
                                        ("locmoe_allgather", "dense"), ("mcore_allgather", "topk")]
    assert "locmoe_allgather" in bench.ONE_NODE_SYSTEMS and "locmoe_allgather" not in bench.DEFAULT_SYSTEMS


def test_every_locmoe_row_is_compared_with_megatrons_allgather_layer(bench):
    rounds = {"mcore_alltoall": [10.0, 12.0, 10.0], "mcore_allgather": [9.0, 10.0, 9.0],
              "locmoe_dense": [9.5, 11.0, 9.5], "locmoe_allgather": [8.1, 10.0, 9.0]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 1}, "systems": systems})
    assert "compare: locmoe_allgather / mcore_allgather = 1.000 [per-round ratios: quartiles 0.900-1.000]" in lines
    assert any(line.startswith("compare: locmoe_dense / mcore_allgather = 1.056") for line in lines), lines


def test_held_out_windows_do_not_depend_on_the_training_seed(bench):
    import layer_training  # on the path once bench_layer is loaded (it imports it)

    parse = bench.parse
    a, b = parse(["--seed", "1234"]), parse(["--seed", "2345"])
    assert layer_training.eval_seed(a) == layer_training.eval_seed(b) == 7
    assert layer_training.eval_seed(parse(["--seed", "1", "--eval-seed", "11"])) == 11
    # a namespace from before the option (e.g. a saved run's arguments): the old per-seed windows
    assert layer_training.eval_seed(types.SimpleNamespace(seed=1234)) == 1241


def test_the_unfolded_layer_is_compared_with_the_first_gates_layer(bench):
    args = types.SimpleNamespace(systems=["locmoe", "locmoe_unfolded", "mcore_alltoall"], gates=["dense", "grap"],
                                 baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_dense", "dense"), ("locmoe_grap", "grap"),
                                        ("locmoe_unfolded", "dense"), ("mcore_alltoall", "topk")]
    assert "locmoe_unfolded" not in bench.DEFAULT_SYSTEMS
    rounds = {"mcore_alltoall": [10.0, 10.0, 10.0], "locmoe_dense": [4.0, 4.2, 4.4],
              "locmoe_grap": [3.0, 3.0, 3.0], "locmoe_unfolded": [4.0, 4.0, 4.0]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v, "cross_node_share": 0.2} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 2, "mu": {"dense": 0.0, "grap": 0.0}}, "systems": systems})
    assert "compare: locmoe_dense / locmoe_unfolded = 1.050 [per-round ratios: quartiles 1.000-1.100]" in lines, lines
    assert not any(line.startswith("compare: locmoe_grap / locmoe_unfolded") for line in lines), lines


def test_the_overlapped_layer_is_compared_with_the_first_gates_layer(bench):
    args = types.SimpleNamespace(systems=["locmoe", "locmoe_overlap", "mcore_alltoall"], gates=["dense"],
                                 baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_dense", "dense"), ("locmoe_overlap", "dense"),
                                        ("mcore_alltoall", "topk")]
    assert "locmoe_overlap" not in bench.DEFAULT_SYSTEMS
    rounds = {"mcore_alltoall": [10.0, 10.0, 10.0], "locmoe_dense": [4.0, 4.4, 4.8], "locmoe_overlap": [4.0, 4.0, 4.0]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v, "cross_node_share": 0.2} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 2, "mu": {"dense": 0.0}}, "systems": systems})
    assert any(line.startswith("compare: locmoe_dense / locmoe_overlap = 1.100 [per-round ratios: quartiles")
               for line in lines), lines
    assert any(line.startswith("compare: locmoe_overlap / mcore_alltoall = 0.400") for line in lines), lines


def test_the_allgather_layer_is_compared_with_its_count_exchange_form(bench):
    args = types.SimpleNamespace(systems=["locmoe", "locmoe_allgather", "locmoe_allgather_counted"],
                                 gates=["dense"], baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_dense", "dense"), ("locmoe_allgather", "dense"),
                                        ("locmoe_allgather_counted", "dense")]
    assert "locmoe_allgather_counted" not in bench.DEFAULT_SYSTEMS + bench.ONE_NODE_SYSTEMS
    rounds = {"mcore_alltoall": [10.0, 10.0, 10.0], "locmoe_dense": [9.0, 9.0, 9.0],
              "locmoe_allgather": [8.0, 9.0, 9.0], "locmoe_allgather_counted": [10.0, 10.0, 9.0]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 1}, "systems": systems})
    assert "compare: locmoe_allgather / locmoe_allgather_counted = 0.900 [per-round ratios: quartiles 0.800-1.000]" in lines, lines


def test_a_gates_row_named_alone_runs_on_its_own_models_hidden_states(bench):
    import pytest

    args = types.SimpleNamespace(systems=["locmoe_dense", "locmoe_allgather", "mcore_alltoall"], gates=["dense"],
                                 baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_dense", "dense"), ("locmoe_allgather", "dense"),
                                        ("mcore_alltoall", "topk")]
    args.systems = ["locmoe_grap"]  # a gate that was not trained: refused, not run on another model's states
    with pytest.raises(SystemExit, match="locmoe_grap: no such LocMoE row"):
        bench.system_names(args)


def test_grouped_expert_rows_and_their_comparisons(bench):
    args = types.SimpleNamespace(systems=["locmoe_grouped", "locmoe_allgather_grouped", "mcore_alltoall",
                                          "mcore_alltoall_grouped", "mcore_allgather_grouped"],
                                 gates=["dense"], baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_grouped", "dense"), ("locmoe_allgather_grouped", "dense"),
                                        ("mcore_alltoall", "topk"), ("mcore_alltoall_grouped", "topk"),
                                        ("mcore_allgather_grouped", "topk")]
    rounds = {"mcore_alltoall": [10.0, 10.0, 10.0], "mcore_alltoall_grouped": [8.0, 8.0, 8.0],
              "mcore_allgather_grouped": [9.0, 9.0, 9.0], "locmoe_grouped": [7.2, 7.2, 7.2]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 1}, "systems": systems})
    assert "compare: locmoe_grouped / mcore_alltoall_grouped = 0.900 [per-round ratios: quartiles 0.900-0.900]" in lines
    assert "compare: locmoe_grouped / mcore_allgather_grouped = 0.800 [per-round ratios: quartiles 0.800-0.800]" in lines


def test_our_deepspeed_layer_is_compared_with_its_expert_modules(bench):
    args = types.SimpleNamespace(systems=["locmoe_ds", "locmoe_ds_modules", "deepspeed_moe"], gates=["dense"],
                                 baseline_router="trained")
    assert bench.system_names(args) == [("locmoe_ds", "dense"), ("locmoe_ds_modules", "dense"),
                                        ("deepspeed_moe", "topk")]
    rounds = {"locmoe_ds": [8.0, 8.0, 8.0], "locmoe_ds_modules": [10.0, 10.0, 10.0], "deepspeed_moe": [16.0, 16.0, 16.0]}
    systems = {n: {"ms": sorted(v)[1], "ms_rounds": v} for n, v in rounds.items()}
    lines = bench.comparisons({"meta": {"nodes": 1}, "systems": systems})
    assert "compare: locmoe_ds / locmoe_ds_modules = 0.800 [per-round ratios: quartiles 0.800-0.800]" in lines
    assert "compare: locmoe_ds / deepspeed_moe = 0.500 [per-round ratios: quartiles 0.500-0.500]" in lines
