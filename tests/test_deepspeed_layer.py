"""DeepSpeed adapter: the LocMoE layer on DeepSpeed's expert-parallel groups (4 gloo ranks = 2 nodes x 2)
against a dense reference from the gathered expert weights; config section; clear errors."""

import os

import pytest
import torch

pytest.importorskip("deepspeed")

from locmoe_plugin.config import ConfigError  # noqa: E402

from ._dist import run_workers  # noqa: E402

D, E = 16, 8


def _expert():
    return torch.nn.Sequential(torch.nn.Linear(D, 12, bias=False), torch.nn.GELU(), torch.nn.Linear(12, D, bias=False))


def _worker(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    from locmoe_plugin.testing import init_deepspeed_distributed

    init_deepspeed_distributed("gloo")
    from locmoe_plugin.deepspeed import LocMoE

    out = {}
    for name, settings, k in [
        ("locmoe", {"gpus_per_node": 2, "gate": "grap", "locality_loss_coeff": 0.01, "overlap": True}, 2),
        # the learned locality loss, not the default cross-node budget: the budget's controller moves in
        # every training forward, so the reference, which routes again, would route differently
        ("hybrid_flat", {"gpus_per_node": 2, "routing": "hybrid", "capacity": "factor", "capacity_factor": 1.0,
                         "min_capacity": 0, "dispatcher": "flat", "locality_loss_coeff": 0.01}, 2),
        ("dense_k4_no_overlap", {"gpus_per_node": 2, "gate": "dense", "locality_loss_coeff": 0.01, "overlap": False}, 4),
        ("dense_k4_overlap", {"gpus_per_node": 2, "gate": "dense", "locality_loss_coeff": 0.01, "overlap": True}, 4),
        # token rows and output gradients sent as int8 with block scales: close to the reference, fewer bytes
        ("dense_k4_int8", {"gpus_per_node": 2, "gate": "dense", "locality_loss_coeff": 0.01,
                           "dispatch_format": "int8"}, 4),
        ("dense_k4_int8_overlap", {"gpus_per_node": 2, "gate": "dense", "locality_loss_coeff": 0.01,
                                   "dispatch_format": "int8", "overlap": True}, 4),
        ("one_node", {"gpus_per_node": 4}, 4),  # one node: the layer uses the pairs plan (flat_fast)
        # the same with each expert module run on its rows, not as grouped GEMMs
        ("one_node_modules", {"gpus_per_node": 4, "grouped_experts": "off"}, 4),
        # one node, allgather with equal token counts: no count exchange, the router's counts in the routing
        ("one_node_allgather", {"gpus_per_node": 4, "dispatcher": "allgather", "equal_tokens": True}, 4),
    ]:
        torch.manual_seed(11)
        layer = LocMoE(D, _expert(), num_experts=E, ep_size=world, k=k, locmoe=settings)
        layer.set_deepspeed_parallelism()
        expert_params = [p for p in layer.deepspeed_moe.experts.parameters()]
        assert all(getattr(p, "allreduce", True) is False for p in expert_params)
        torch.manual_seed(40 + rank)
        s = 6 if settings.get("equal_tokens") else 6 + rank
        x = torch.randn(s, 2, D, requires_grad=True)
        cot = torch.randn(s, 2, D)
        y, l_aux, counts = layer(x)
        ((y * cot).sum() + l_aux).backward()
        # dense reference: all experts' weights, the same router, the same losses
        local = layer.deepspeed_moe.experts.deepspeed_experts
        weights = []
        for e in local:
            w1, w2 = e[0].weight.detach(), e[2].weight.detach()
            g1 = [torch.empty_like(w1) for _ in range(world)]
            g2 = [torch.empty_like(w2) for _ in range(world)]
            dist.all_gather(g1, w1)
            dist.all_gather(g2, w2)
            weights.append((g1, g2))
        all_w = [(weights[i][0][r], weights[i][1][r]) for r in range(world) for i in range(len(local))]
        xr = x.detach().clone().requires_grad_(True)
        res = layer.router(xr.reshape(-1, D))
        probs, _ = res.to_megatron()
        flat = xr.reshape(-1, D)
        ref = sum(probs[:, j : j + 1] * (torch.nn.functional.gelu(flat @ w1.t()) @ w2.t()) for j, (w1, w2) in enumerate(all_w))
        ((ref.reshape(x.shape) * cot).sum() + res.total_loss).backward()
        out[name] = dict(y=y.detach(), ref=ref.detach().reshape(x.shape), gx=x.grad, gref=xr.grad,
                         l_aux=float(l_aux), counts=counts.clone(), traffic=layer.traffic.to_dict(),
                         nodes=layer.router.topology.num_nodes, plan=layer.deepspeed_moe.dispatcher.plan_mode,
                         overlap_active=layer.deepspeed_moe.dispatcher.overlap_active,
                         gathers=layer.deepspeed_moe.dispatcher.gathers_routing,
                         folds=layer.deepspeed_moe.router.folds_counts,
                         grouped=layer.deepspeed_moe.grouped_parts is not None)
    return out


@pytest.mark.multiproc
def test_locmoe_layer_on_deepspeed_groups_matches_dense_reference():
    for res in run_workers(_worker, 4):
        for name, r in res.items():
            tol = dict(rtol=0.05, atol=0.01) if "int8" in name else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["y"], r["ref"], **tol, msg=name)
            torch.testing.assert_close(r["gx"], r["gref"], **tol, msg=name)
            if name.startswith("one_node"):
                plan = "allgather" if name == "one_node_allgather" else "flat_fast"
                assert r["nodes"] == 1 and r["plan"] == plan and r["l_aux"] > 0
                # only the gathered routing carries the router's counts on one node
                assert r["gathers"] == r["folds"] == (name == "one_node_allgather"), name
            else:
                assert r["nodes"] == 2 and r["l_aux"] > 0 and r["counts"].shape == (E,)
            assert r["traffic"]["calls"] >= 1
            assert r["overlap_active"] == (name in ("locmoe", "dense_k4_overlap", "dense_k4_int8_overlap")), name
        # the same layer with and without the overlap (the experts then run per origin: equal up to the
        # GEMM's dependence on its row count, bitwise with row-exact experts: see test_dispatcher_dist)
        for key in ("y", "gx"):
            torch.testing.assert_close(res["dense_k4_overlap"][key], res["dense_k4_no_overlap"][key], rtol=1e-6, atol=1e-7)
        assert res["dense_k4_overlap"]["traffic"] == res["dense_k4_no_overlap"]["traffic"]
        # int8 rows: encoded dispatch bytes (D one-byte codes and one fp32 scale per row instead of D fp32)
        coded, native = res["dense_k4_int8"]["traffic"], res["dense_k4_no_overlap"]["traffic"]
        assert coded["dispatch_inter_bytes"] * D * 4 == native["dispatch_inter_bytes"] * (D + 4)
        assert coded["combine_inter_bytes"] == native["combine_inter_bytes"]
        assert not torch.equal(res["dense_k4_int8"]["y"], res["dense_k4_no_overlap"]["y"])
        # with the overlap the routes move the same encoded rows (experts per origin: equal up to the GEMM)
        for key in ("y", "gx"):
            torch.testing.assert_close(res["dense_k4_int8_overlap"][key], res["dense_k4_int8"][key], rtol=1e-6, atol=1e-7)
        assert res["dense_k4_int8_overlap"]["traffic"] == res["dense_k4_int8"]["traffic"]
        # grouped experts (the default for two-layer experts) against the expert modules: bitwise on CPU
        assert {n: r["grouped"] for n, r in res.items()} == {n: n != "one_node_modules" for n in res}
        for key in ("y", "gx"):
            assert torch.equal(res["one_node"][key], res["one_node_modules"][key])


def test_config_section_and_errors(tmp_path):
    import json

    from locmoe_plugin.deepspeed import LocMoE, locmoe_settings_from_ds_config

    cfg = {"train_batch_size": 8, "locmoe": {"routing": "hybrid", "dispatcher": "flat", "gpus_per_node": 2}}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    assert locmoe_settings_from_ds_config(str(path)) == cfg["locmoe"]
    assert locmoe_settings_from_ds_config({"train_batch_size": 8}) == {}
    # the section's "routing": "hybrid" alone takes LocMoE+'s defaults; explicit keys override them
    plus = LocMoE(D, _expert(), num_experts=E, k=2, locmoe=locmoe_settings_from_ds_config(str(path)))
    c = plus.deepspeed_moe.config
    assert (c.gate, c.cross_node_budget, c.resonance_mass, c.capacity) == ("dense", 0.2, 0.9, "adaptive")
    old = LocMoE(D, _expert(), num_experts=E, k=2, locmoe={**cfg["locmoe"], "gate": "grap",
                                                          "locality_loss_coeff": 0.01, "resonance_mass": 0})
    c = old.deepspeed_moe.config
    assert (c.gate, c.cross_node_budget, c.locality_loss_coeff, c.resonance_mass) == ("grap", None, 0.01, 0)
    with pytest.raises(ConfigError, match=r"unknown LocMoE option\(s\) \['routng'\]"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"routng": "hybrid"})
    with pytest.raises(ConfigError, match="hidden_size 16 is not divisible by num_experts 3"):
        LocMoE(D, _expert(), num_experts=3, k=1, locmoe={"gate": "grap"})
    with pytest.raises(ConfigError, match="dispatcher='ring'"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"dispatcher": "ring"})
    both = LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"overlap": True, "dispatch_format": "fp8"})
    assert (both.deepspeed_moe.dispatcher_settings.overlap, both.deepspeed_moe.dispatcher_settings.dispatch_format) == (True, "fp8")
    assert LocMoE(D, _expert(), num_experts=E, k=2,
                  locmoe={"dispatch_format": "int8"}).deepspeed_moe.dispatcher_settings.dispatch_format == "int8"
    with pytest.raises(ConfigError, match='"overlap_chunks": 2 is removed: use "overlap": true'):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"overlap_chunks": 2})
    with pytest.raises(ConfigError, match="overlap=1 must be True or False"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"overlap": 1})
    with pytest.raises(ConfigError, match="equal_tokens='yes' must be True, False or None"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"equal_tokens": "yes"})
    with pytest.raises(ConfigError, match="routing='hash' needs token ids"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"routing": "hash"})
    with pytest.raises(ConfigError, match='"grouped_experts": "on" needs experts of the form nn.Sequential'):
        LocMoE(D, torch.nn.Linear(D, D), num_experts=E, k=2, locmoe={"grouped_experts": "on"})
    with pytest.raises(ConfigError, match="expected one of auto, on, off"):
        LocMoE(D, _expert(), num_experts=E, k=2, locmoe={"grouped_experts": True})
    # "auto": experts of another form run as their own modules
    assert LocMoE(D, torch.nn.Linear(D, D), num_experts=E, k=2).deepspeed_moe.grouped_parts is None
    layer = LocMoE(D, _expert(), num_experts=E, k=2)
    assert len(layer.deepspeed_moe.grouped_parts) == E
    with pytest.raises(RuntimeError, match="set_deepspeed_parallelism"):
        layer(torch.randn(3, D))
