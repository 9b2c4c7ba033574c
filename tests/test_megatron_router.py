"""Megatron adapter: version gate, config mapping, and the LocMoE router inside megatron-core's MoELayer
(CPU, gloo, EP=4 as 2 emulated nodes x 2) against a dense reference from the gathered expert weights."""

import functools

import pytest
import torch

pytest.importorskip("megatron.core")

from locmoe_plugin.config import ConfigError  # noqa: E402
from locmoe_plugin.megatron.compat import UnsupportedMegatronError, check_supported, parse_version  # noqa: E402

from ._dist import run_workers  # noqa: E402


def test_version_gate_messages():
    assert check_supported((0, 16, 1)) == (0, 16, 1)
    assert check_supported((0, 19, 2)) == (0, 19, 2)
    for bad in ((0, 15, 0), (0, 20, 0), (1, 0, 0)):
        with pytest.raises(UnsupportedMegatronError, match=r"is not supported: locmoe-plugin needs megatron-core >= 0.16"):
            check_supported(bad)
    assert parse_version("0.16.1rc2") == (0, 16, 1)
    assert check_supported()[:2] >= (0, 16)  # the installed one


def test_config_mapping_from_transformer_config():
    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.megatron.router import locmoe_config_from_megatron

    tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
                           moe_router_topk=2, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3,
                           moe_expert_capacity_factor=1.25, moe_token_dispatcher_type="alltoall")
    c = locmoe_config_from_megatron(tc, {"routing": "locmoe", "locality_loss_coeff": 0.05})
    assert (c.num_experts, c.hidden_size, c.topk) == (8, 64, 2)
    assert (c.aux_loss_coeff, c.z_loss_coeff, c.locality_loss_coeff) == (0.02, 1e-3, 0.05)
    assert (c.capacity, c.capacity_factor) == ("factor", 1.25)
    assert locmoe_config_from_megatron(tc, {"capacity": "bound"}).capacity == "bound"
    dense = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ConfigError, match="set num_moe_experts"):
        locmoe_config_from_megatron(dense)


def _layer_worker(rank, world, cases):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    import torch.distributed as dist

    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    pgc = moe_utils.get_default_pg_collection()
    results = []
    for i, locmoe in enumerate(cases):
        torch.manual_seed(1234 + i)  # same init on every rank for the dense gate
        cfg = TransformerConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
            moe_token_dispatcher_type="alltoall", expert_model_parallel_size=world, use_cpu_initialization=True,
            moe_aux_loss_coeff=0.01, add_bias_linear=False, ffn_hidden_size=16, moe_ffn_hidden_size=16,
            moe_expert_capacity_factor=locmoe.get("capacity_factor"),  # Megatron's dispatcher with drops
        )
        spec = MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                               linear_fc2=RowParallelLinear)),
            router=functools.partial(LocMoEMegatronRouter, locmoe={"gpus_per_node": 2, **locmoe}),
        )
        layer = MoELayer(cfg, submodules=spec, layer_number=1, pg_collection=pgc)
        layer.set_layer_number(1)  # what TransformerLayer does
        torch.manual_seed(99 + rank)
        x = torch.randn(6, 2, 32, requires_grad=True)
        cot = torch.randn(6, 2, 32)
        moe_utils.clear_aux_losses_tracker()
        y, _ = layer(x)
        (y * cot).sum().backward()
        from locmoe_plugin.megatron.router import flush_locmoe_metrics

        before = moe_utils.get_moe_layer_wise_logging_tracker()
        telemetry_before_flush = [float(before[n]["values"].abs().sum()) if n in before else 0.0
                                  for n in ("locmoe_cross_node_share", "locmoe_max_over_mean_load")]
        st = layer.router.last_stats  # this forward's telemetry, by hand
        kept = st.tokens_per_expert.sum().item()
        expected = [st.cross_node_pairs.item() / kept, st.dropped_pairs.item() / (kept + st.dropped_pairs.item()),
                    st.tokens_per_expert.max().item() * 8 / kept]
        flush_locmoe_metrics()  # the telemetry is summed on the device until Megatron reports
        tracked = {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
        flush_locmoe_metrics()  # nothing pending any more: a second flush records nothing
        again = {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}

        # with Megatron's report flushing the routers first (enable()'s metrics patch), the loss values are
        # summed on the device and recorded at the flush: the same totals as one record per forward
        import locmoe_plugin.megatron.metrics as mrouter

        def two_forwards(defer):
            original = mrouter.report_flushes
            mrouter.report_flushes = lambda: defer
            try:
                moe_utils.clear_aux_losses_tracker()
                with torch.no_grad():
                    layer(x)
                    layer(x)
                snap = lambda: {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
                pre = snap()
                flush_locmoe_metrics()
                return pre, snap()
            finally:
                mrouter.report_flushes = original

        deferred = two_forwards(True)
        immediate = two_forwards(False)

        # dense reference: every expert's weights gathered, the same router, the losses added directly
        def gather(w):
            parts = [torch.empty_like(w) for _ in range(world)]
            dist.all_gather(parts, w.detach().contiguous())
            return parts

        fc1 = [w for e in layer.experts.local_experts for w in [e.linear_fc1.weight]]
        fc2 = [w for e in layer.experts.local_experts for w in [e.linear_fc2.weight]]
        fc1 = [w for ws in zip(*[gather(w) for w in fc1]) for w in ws]  # rank-major expert order
        fc2 = [w for ws in zip(*[gather(w) for w in fc2]) for w in ws]
        xr = x.detach().clone().requires_grad_(True)
        out = layer.router.core(xr.reshape(-1, 32))
        probs, _ = out.to_megatron()
        flat = xr.reshape(-1, 32)
        ref = sum(probs[:, e : e + 1] * (torch.nn.functional.gelu(flat @ fc1[e].t()) @ fc2[e].t()) for e in range(8))
        ((ref.reshape(6, 2, 32) * cot).sum() + out.total_loss).backward()
        gate_w = getattr(layer.router.core.gate, "weight", None)
        results.append(dict(
            y=y.detach(), ref=ref.detach().reshape(6, 2, 32), gx=x.grad, gref=xr.grad, tracked=tracked,
            again=again, expected=expected, telemetry_before_flush=telemetry_before_flush,
            deferred=deferred, immediate=immediate,
            sp_attr=None if gate_w is None else getattr(gate_w, "sequence_parallel", "missing"),
            topology=layer.router.topology.node_of_rank,
        ))
    return results


def test_locmoe_router_in_megatron_moe_layer_matches_dense_reference():
    # the learned locality loss (an explicit coefficient, so no default cross-node budget): the router's
    # state does not move between the layer's forward and the reference's
    cases = [
        {"gate": "grap", "routing": "locmoe", "locality_loss_coeff": 0.01},
        {"gate": "dense", "routing": "locmoe", "z_loss_coeff": 1e-3, "locality_loss_coeff": 0.01},
        {"gate": "grap", "routing": "hybrid", "capacity": "factor", "capacity_factor": 1.0, "min_capacity": 0,
         "locality_loss_coeff": 0.01},
    ]
    res = run_workers(_layer_worker, 4, cases)
    for rank_res in res:
        for case, r in zip(cases, rank_res):
            torch.testing.assert_close(r["y"], r["ref"], rtol=1e-5, atol=1e-6, msg=str(case))
            torch.testing.assert_close(r["gx"], r["gref"], rtol=1e-5, atol=1e-6, msg=str(case))
            assert r["topology"] == (0, 0, 1, 1)
            # losses and LocMoE telemetry reach Megatron's tracker (layer 1 -> index 0)
            assert r["tracked"]["load_balancing_loss"][0] > 0
            assert r["tracked"]["locmoe_locality_loss"][0] > 0
            assert 0 <= r["tracked"]["locmoe_cross_node_share"][0] <= 1
            assert r["telemetry_before_flush"] == [0.0, 0.0]  # recorded at flush, not in forward
            for i, name in enumerate(("locmoe_cross_node_share", "locmoe_dropped_share", "locmoe_max_over_mean_load")):
                assert r["tracked"][name][0].item() == pytest.approx(r["expected"][i], rel=1e-6)
                assert torch.equal(r["again"][name], r["tracked"][name])
            (pre, post), (_, post_immediate) = r["deferred"], r["immediate"]
            assert float(pre["load_balancing_loss"].abs().sum()) == 0.0  # deferred: nothing in forward
            assert post["load_balancing_loss"][0] > 0
            for name in post_immediate:
                torch.testing.assert_close(post[name], post_immediate[name], msg=name)
            if "capacity" in case:  # the hybrid case drops pairs: the dropped share is not trivially 0
                assert r["tracked"]["locmoe_dropped_share"][0] > 0
            if case["gate"] == "dense":
                assert r["sp_attr"] is False and r["tracked"]["z_loss"][0] > 0


def test_dropping_capacity_with_megatrons_dispatcher_is_refused():
    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
                           moe_router_topk=2, moe_token_dispatcher_type="alltoall")
    with pytest.raises(ConfigError, match="set --moe-expert-capacity-factor"):
        LocMoEMegatronRouter(tc, locmoe={"capacity": "bound"})


def test_telemetry_flush_pools_the_forwards_since_the_last_report():
    import types

    from locmoe_plugin.megatron.router import TELEMETRY_METRICS, LocMoEMegatronRouter

    logged = {}
    fake = types.SimpleNamespace(
        layer_number=1, locmoe_config=types.SimpleNamespace(num_experts=4),
        _log=lambda name, value: logged.__setitem__(name, value.item()),
        # two forwards: (cross, dropped, kept, busiest) = (3, 1, 8, 4) + (1, 1, 8, 2)
        _telemetry_sum=torch.tensor([4, 2, 16, 6]), _telemetry_forwards=2, _loss_sums={},
    )
    LocMoEMegatronRouter.flush_telemetry(fake)
    # pooled: 4/16 crossing, 2/18 dropped, busiest 6/2 = 3 of a mean 16/2/4 = 2 -> 1.5; times 2 forwards
    # (the tracker sums one record per forward; Megatron divides by the micro-batches)
    want = {"locmoe_cross_node_share": 0.5, "locmoe_dropped_share": 4 / 18, "locmoe_max_over_mean_load": 3.0}
    assert set(logged) == set(TELEMETRY_METRICS)
    for k, v in want.items():
        assert logged[k] == pytest.approx(v)
    assert fake._telemetry_sum is None
