"""The LocMoE six-phase dispatcher inside megatron-core's MoELayer (CPU, gloo, 4 ranks):
EP=4 as 2 nodes x 2 against Megatron's own alltoall dispatcher, and TP=2 x EP=2 with sequence
parallelism against a dense reference."""

import pytest
import torch

pytest.importorskip("megatron.core")

from ._dist import run_workers  # noqa: E402
from .megatron_helpers import D, build_layer as _build, dense_reference as _dense_reference  # noqa: E402
from .megatron_helpers import fwd_bwd as _fwd_bwd  # noqa: E402

pytestmark = pytest.mark.multiproc


def _worker(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe_plugin.comm.settings import DispatcherSettings
    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class
    from locmoe_plugin.megatron.router import dense_routing_map

    LocMoELayer = make_locmoe_layer_class()
    out = {}
    # A: EP=4 as 2 nodes x 2, Megatron's alltoall dispatcher vs ours (hierarchical and flat), same weights
    parallel_state.initialize_model_parallel(expert_model_parallel_size=4)
    ep = parallel_state.get_expert_model_parallel_group()
    for topk in (2, 4):
        locmoe = {"gpus_per_node": 2}
        torch.manual_seed(7)
        mega = _build(MoELayer, 1, 4, locmoe, topk)
        # "hierarchical": the overlap switched on (2 nodes: split by origin); "no_overlap": the default unsplit plan
        modes = {"hierarchical": DispatcherSettings(mode="hierarchical", overlap=True), "flat": "flat",
                 "no_overlap": "hierarchical",  # a plain mode string: overlap off (the default)
                 "int8": DispatcherSettings(mode="hierarchical", dispatch_format="int8"),
                 "int8_overlap": DispatcherSettings(mode="hierarchical", overlap=True, dispatch_format="int8")}
        ours = {m: _build(LocMoELayer, 1, 4, locmoe, topk, dispatcher=d) for m, d in modes.items()}
        out[("overlap_active", topk)] = {m: layer.token_dispatcher.core.overlap_active for m, layer in ours.items()}
        for layer in ours.values():
            layer.load_state_dict(mega.state_dict())
        torch.manual_seed(100 + rank)
        x = torch.randn(5 + rank, 2, D)
        cot = torch.randn_like(x)
        res = {"megatron": _fwd_bwd(mega, x, cot)}
        for m, layer in ours.items():
            res[m] = _fwd_bwd(layer, x, cot)
            res[m + "_traffic"] = layer.token_dispatcher.traffic.to_dict()
        res["ref"] = _dense_reference(mega, x, cot, ep)
        # inside LocMoELayer the router hands over the index form (route_indices); dense_routing_map recovers
        # Megatron's map; its forward keeps Megatron's contract there too
        with torch.no_grad():
            w_ids = ours["hierarchical"].router.route_indices(x)
            dense = mega.router(x)
            res["forms"] = (w_ids[0].shape, w_ids[1].dtype, dense_routing_map(w_ids, 8), dense,
                            dense_routing_map(dense, 8) is dense[1])
            res["forward_in_layer"] = ours["hierarchical"].router(x)
        out[("ep4", topk)] = res
    out["folded"] = _folded_vs_all_reduce(rank, LocMoELayer)
    # A': EP=4 on one node: LocMoELayer uses the pairs plan (flat_fast) there
    torch.manual_seed(9)
    one = _build(LocMoELayer, 1, 4, {"gpus_per_node": 4}, 4)
    torch.manual_seed(300 + rank)
    x = torch.randn(3 + 2 * rank, 2, D)
    cot = torch.randn_like(x)
    out[("ep4_one_node", 4)] = {"ours": _fwd_bwd(one, x, cot), "ref": _dense_reference(one, x, cot, ep),
                                "plan": one.token_dispatcher.core.plan_mode}
    parallel_state.destroy_model_parallel()
    # B: TP=2 with sequence parallelism x EP=2 (ETP=1); each rank its own node: the rail stage is used
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                             expert_tensor_parallel_size=1)
    ep = parallel_state.get_expert_model_parallel_group()
    torch.manual_seed(8)
    layer = _build(LocMoELayer, 2, 2, {"gpus_per_node": 1}, 2)
    torch.manual_seed(200 + rank)
    x = torch.randn(4, 2, D)  # this TP rank's sequence shard
    cot = torch.randn_like(x)
    out[("tp2ep2", 2)] = {"ours": _fwd_bwd(layer, x, cot), "ref": _dense_reference(layer, x, cot, ep),
                          "nodes": layer.router.topology.num_nodes}
    parallel_state.destroy_model_parallel()
    return out


def _folded_vs_all_reduce(rank, LocMoELayer):
    """LocMoELayer with the router's counts folded into the dispatcher's count exchange (the default) and with
    the router's own all-reduce: two training steps (the second with a padding mask) and an evaluation
    forward; per step the output, input and router-weight gradients, the tracked aux loss (bits) and the
    expert bias."""
    from megatron.core.transformer.moe import moe_utils

    from locmoe_plugin.megatron.router import flush_locmoe_metrics

    locmoe = {"gpus_per_node": 2, "expert_bias_rate": 0.01}
    layers = {}
    for folded in (True, False):
        torch.manual_seed(11)
        layers[folded] = _build(LocMoELayer, 1, 4, locmoe, 2)
    assert not layers[False].token_dispatcher.fold_router_counts(layers[False].router, fold=False)  # all-reduce
    res = {"folds": {f: layer.router._folds for f, layer in layers.items()}}
    for folded, layer in layers.items():
        torch.manual_seed(400 + rank)
        steps = []
        for step in range(3):
            x = torch.randn(4 + rank, 2, D, requires_grad=True)
            pad = (torch.rand(2, 4 + rank) > 0.7) if step == 1 else None  # [batch, seq], True = padding
            layer.zero_grad(set_to_none=True)
            moe_utils.clear_aux_losses_tracker()
            layer.train(step < 2)
            with torch.set_grad_enabled(step < 2):
                y, _ = layer(x, padding_mask=None if pad is None else ~pad)
                if step < 2:
                    (y * torch.randn_like(y)).sum().backward()
            flush_locmoe_metrics()
            tracked = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
            grads = [p.grad.view(torch.int32) for p in layer.router.parameters() if p.grad is not None]
            steps.append((y.detach().view(torch.int32), None if x.grad is None else x.grad.view(torch.int32),
                          grads, tracked.view(torch.int32), layer.router.core.expert_bias.view(torch.int32).clone()))
        res[folded] = steps
    return res


def test_locmoe_dispatcher_in_megatron_moe_layer():
    results = run_workers(_worker, 4)
    for res in results:
        folded = res["folded"]
        assert folded["folds"] == {True: True, False: False}
        for step, (new, old) in enumerate(zip(folded[True], folded[False])):
            for i, what in enumerate(("output", "input grad", "router grads", "aux loss", "expert bias")):
                a, b = new[i], old[i]
                same = a is None and b is None or (
                    all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) if isinstance(a, list)
                    else torch.equal(a, b))
                assert same, (step, what)
        assert len(folded[True][0][2]) > 0 and bool(folded[True][0][3].ne(0).any())  # gradients and a loss seen
        for topk in (2, 4):
            r = res[("ep4", topk)]
            y_ref, g_ref = r["ref"]
            for name in ("megatron", "hierarchical", "flat"):
                torch.testing.assert_close(r[name][0], y_ref, rtol=1e-5, atol=1e-6, msg=f"{name} k={topk}")
                torch.testing.assert_close(r[name][1], g_ref, rtol=1e-5, atol=1e-6, msg=f"{name} k={topk}")
            # hierarchical and flat: bitwise equal; top-2 sums have one order: equal to Megatron's too
            assert torch.equal(r["hierarchical"][0], r["flat"][0]) and torch.equal(r["hierarchical"][1], r["flat"][1])
            assert torch.equal(r["hierarchical"][0], r["no_overlap"][0])
            assert torch.equal(r["hierarchical"][1], r["no_overlap"][1])
            assert res[("overlap_active", topk)] == {"hierarchical": True, "flat": False, "no_overlap": False,
                                                     "int8": False, "int8_overlap": True}
            # rows and output gradients sent as int8 with block scales: close, not equal; fewer dispatch bytes
            torch.testing.assert_close(r["int8"][0], y_ref, rtol=0.05, atol=0.01, msg=f"int8 k={topk}")
            torch.testing.assert_close(r["int8"][1], g_ref, rtol=0.05, atol=0.01, msg=f"int8 k={topk}")
            assert not torch.equal(r["int8"][0], r["no_overlap"][0])
            # the overlapped routes move the same encoded rows: bitwise the unsplit int8 layer
            assert torch.equal(r["int8_overlap"][0], r["int8"][0]) and torch.equal(r["int8_overlap"][1], r["int8"][1])
            assert r["int8_overlap_traffic"] == r["int8_traffic"]
            coded, native = r["int8_traffic"], r["no_overlap_traffic"]
            assert 0 < coded["dispatch_inter_bytes"] < native["dispatch_inter_bytes"]
            assert coded["combine_inter_bytes"] == native["combine_inter_bytes"]
            if topk == 2:
                assert torch.equal(r["hierarchical"][0], r["megatron"][0])
            assert r["hierarchical_traffic"]["inter_bytes"] <= r["flat_traffic"]["inter_bytes"]
            w_shape, ids_dtype, ours_map, (mega_probs, mega_map), passed_through = r["forms"]
            assert w_shape[1] == topk and ids_dtype == torch.int64 and mega_map.dtype == torch.bool
            assert torch.equal(ours_map, mega_map) and passed_through
            assert int(ours_map.sum()) == ours_map.shape[0] * topk
            fwd_probs, fwd_map = r["forward_in_layer"]
            assert fwd_map.dtype == torch.bool and torch.equal(fwd_map, mega_map)
            torch.testing.assert_close(fwd_probs, mega_probs)
        r = res[("ep4_one_node", 4)]
        assert r["plan"] == "flat_fast"
        torch.testing.assert_close(r["ours"][0], r["ref"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ours"][1], r["ref"][1], rtol=1e-5, atol=1e-6)
        r = res[("tp2ep2", 2)]
        assert r["nodes"] == 2
        torch.testing.assert_close(r["ours"][0], r["ref"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ours"][1], r["ref"][1], rtol=1e-5, atol=1e-6)


def test_unsupported_layouts_are_refused():
    from types import SimpleNamespace

    from locmoe_plugin.config import ConfigError
    from locmoe_plugin.megatron.dispatcher import validate_parallel_config

    ok = SimpleNamespace(expert_tensor_parallel_size=1, tensor_model_parallel_size=2, sequence_parallel=True)
    validate_parallel_config(ok)
    with pytest.raises(ConfigError, match="set --expert-tensor-parallel-size 1"):
        validate_parallel_config(SimpleNamespace(expert_tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="add --sequence-parallel"):
        validate_parallel_config(SimpleNamespace(tensor_model_parallel_size=2, sequence_parallel=False))
    with pytest.raises(ConfigError, match="pass --locmoe-overlap off"):
        validate_parallel_config(SimpleNamespace(overlap_moe_expert_parallel_comm=True), overlap=True)
    validate_parallel_config(SimpleNamespace(overlap_moe_expert_parallel_comm=True), overlap=False)
    with pytest.raises(ConfigError, match="drop-and-pad"):
        validate_parallel_config(SimpleNamespace(moe_pad_expert_input_to_capacity=True))
    with pytest.raises(ConfigError, match="drop the flag"):  # the shared experts' output would be lost
        validate_parallel_config(SimpleNamespace(moe_shared_expert_overlap=True))
