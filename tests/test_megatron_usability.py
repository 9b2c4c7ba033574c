"""What a new Megatron user runs into, on one process as one rank of a fake expert-parallel group:
capacity hints that hold, explicit process groups, telemetry without duplicates or stale names, clear
errors from settings_from_args and the locmoe-megatron wrapper."""

import argparse
import gc
import logging

import pytest
import torch

pytest.importorskip("megatron.core")

from locmoe_plugin import collect_stats  # noqa: E402
from locmoe_plugin.config import ConfigError  # noqa: E402
from locmoe_plugin.testing import (  # noqa: E402
    fake_process_group,
    megatron_cpu_shims,
    megatron_moe_layer,
    megatron_parallel_state,
)

pytest_plugins = ["locmoe_plugin.testing.pytest_plugin"]


def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    values = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
                  moe_token_dispatcher_type="alltoall", expert_model_parallel_size=4, use_cpu_initialization=True,
                  add_bias_linear=False, ffn_hidden_size=16, moe_ffn_hidden_size=16)
    values.update(kw)
    return TransformerConfig(**values)


def test_router_only_seam_keeps_locmoe_plus_adaptive_capacity(fake_megatron_world):
    from locmoe_plugin.megatron import LocMoEMegatronRouter

    with fake_megatron_world(world_size=4, nodes=2):
        with pytest.raises(ConfigError, match="moe-expert-capacity-factor .*'adaptive' decides"):
            LocMoEMegatronRouter(_config(), locmoe={"routing": "hybrid"})
        # following the hint must not switch LocMoE+ to factor capacity
        router = LocMoEMegatronRouter(_config(moe_expert_capacity_factor=1.0), locmoe={"routing": "hybrid"})
        assert router.locmoe_config.capacity == "adaptive" and router.locmoe_config.capacity_factor is None
        # a dropless mode still takes Megatron's factor, and an explicit mode wins
        plain = LocMoEMegatronRouter(_config(moe_expert_capacity_factor=1.5), locmoe={"routing": "locmoe"})
        assert (plain.locmoe_config.capacity, plain.locmoe_config.capacity_factor) == ("factor", 1.5)
        bound = LocMoEMegatronRouter(_config(moe_expert_capacity_factor=1.0),
                                     locmoe={"routing": "hybrid", "capacity": "bound"})
        assert bound.locmoe_config.capacity == "bound"


def test_spec_layers_take_the_layers_process_groups_without_warning(fake_megatron_world, caplog):
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from locmoe_plugin.megatron import locmoe_spec

    with fake_megatron_world(world_size=8, nodes=2, expert_model_parallel_size=4):
        pgc = ProcessGroupCollection.use_mpu_process_groups()
        own_ep = dist.new_group(list(range(4)))  # the same ranks, a group object Megatron's globals do not hold
        pgc.ep = own_ep
        spec = locmoe_spec(get_gpt_layer_local_spec(num_experts=8), {"routing": "locmoe"})
        with caplog.at_level(logging.WARNING):
            layer = build_module(spec, config=_config(), layer_number=1, pg_collection=pgc)
        assert "Unknown MLP type" not in caplog.text
        assert type(layer.mlp).__name__ == "LocMoELayer"
        assert layer.mlp.router.core.group is own_ep


def test_telemetry_lists_each_router_once_and_drops_stale_names():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from locmoe_plugin.megatron import count_locmoe_layers, flush_locmoe_metrics, locmoe_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tracker = get_moe_layer_wise_logging_tracker()
    with fake_process_group(world_size=4, nodes=2) as world, megatron_cpu_shims(), megatron_parallel_state():
        assert world.nodes == 2
        layers = torch.nn.ModuleList(
            megatron_moe_layer(num_experts=8, hidden_size=32, layer_number=i + 1, num_layers=2) for i in range(2))
        assert count_locmoe_layers(layers) == 2
        assert count_locmoe_layers(locmoe_spec(get_gpt_layer_local_spec(num_experts=8)), num_layers=2) == 2
        for layer in layers:
            layer.mlp(torch.randn(6, 2, 32))
        stats = collect_stats(layers)
        assert sorted(stats) == ["0.mlp.router", "1.mlp.router"]
        st = stats["0.mlp.router"]
        assert st.cross_node_share == st.to_dict()["cross_node_share"]
        assert 0.0 <= st.cross_node_share <= 1.0
        flush_locmoe_metrics()
        assert "locmoe_cross_node_share" in tracker
        del layers, stats, st, layer
        gc.collect()
        flush_locmoe_metrics()  # no LocMoE router left: a later stock model reports no LocMoE names
        assert not [name for name in tracker if name.startswith("locmoe_")]


def test_settings_from_args_on_a_plain_namespace_names_the_fix():
    from locmoe_plugin.megatron import add_arguments, settings_from_args

    with pytest.raises(ConfigError, match="--hidden-size.*extra_args_provider"):
        settings_from_args(argparse.Namespace(locmoe=True, num_experts=8))
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--hidden-size", type=int)
    with pytest.raises(ConfigError, match="--locmoe-dispatcher.*add_arguments"):
        settings_from_args(argparse.Namespace(locmoe=True, num_experts=8, hidden_size=32))
    add_arguments(parser)
    overrides, dispatcher = settings_from_args(parser.parse_args(
        ["--locmoe", "--num-experts", "8", "--hidden-size", "32", "--locmoe-routing", "hybrid"]))
    assert overrides == {"routing": "hybrid"} and dispatcher.mode == "hierarchical" and not dispatcher.overlap


def test_wrapper_help_lists_the_flags_and_refuses_other_scripts(tmp_path, capsys):
    from locmoe_plugin.megatron.launcher import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--locmoe", "--locmoe-routing", "--locmoe-capacity", "--locmoe-dispatcher"):
        assert flag in out
    script = tmp_path / "core_only.py"
    script.write_text("from megatron.core.transformer.moe.moe_layer import MoELayer\nprint('RAN')\n")
    assert main([str(script), "--locmoe"]) == 2
    captured = capsys.readouterr()
    assert "RAN" not in captured.out and "not a Megatron-LM script" in captured.err and "enable(settings=" in captured.err


def test_flag_validation_maps_megatrons_capacity_factor_as_the_router_does():
    """Hybrid routing keeps its adaptive capacity under --moe-expert-capacity-factor (the router's mapping),
    so a setting only adaptive capacity takes (--locmoe-delta) is valid in the flags' check too."""
    import argparse

    from locmoe_plugin.megatron import add_arguments, locmoe_config_from_megatron, settings_from_args

    ns = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--locmoe", "--locmoe-routing", "hybrid", "--locmoe-delta", "0.5"])
    for k, v in dict(num_experts=8, hidden_size=32, moe_router_topk=2, expert_model_parallel_size=1,
                     moe_expert_capacity_factor=1.0).items():
        setattr(ns, k, v)
    overrides, _ = settings_from_args(ns)
    tc = argparse.Namespace(num_moe_experts=8, hidden_size=32, moe_router_topk=2, moe_aux_loss_coeff=0.01,
                            moe_z_loss_coeff=None, moe_expert_capacity_factor=1.0)
    config = locmoe_config_from_megatron(tc, overrides)
    assert (config.capacity, config.delta) == ("adaptive", 0.5)
