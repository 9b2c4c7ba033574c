"""DeepSpeed adapter: ``l_aux`` is the router's already-scaled loss (aux_loss_coeff * aux + locality_loss_coeff
* locality + z_loss_coeff * z), scaled exactly once, on DeepSpeed's expert-parallel groups (2 gloo ranks = 2
nodes x 1, so the locality loss is non-zero)."""

import dataclasses
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from ._dist import run_workers  # noqa: E402

D, E, K = 8, 4, 2
COEFFS = {"aux": 0.01, "locality": 0.05, "z": 1e-3}


def _expert():
    return torch.nn.Sequential(torch.nn.Linear(D, 6, bias=False), torch.nn.GELU(), torch.nn.Linear(6, D, bias=False))


def _router_grads(loss, router):
    params = list(router.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _worker(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"

    from locmoe_plugin.testing import init_deepspeed_distributed

    init_deepspeed_distributed("gloo")
    from locmoe_plugin.deepspeed import LocMoE
    from locmoe_plugin.router import LocMoERouter

    torch.manual_seed(3)
    settings = {"gpus_per_node": 1, "gate": "dense", "aux_loss_coeff": COEFFS["aux"],
                "locality_loss_coeff": COEFFS["locality"], "z_loss_coeff": COEFFS["z"]}
    layer = LocMoE(D, _expert(), num_experts=E, ep_size=world, k=K, locmoe=settings)
    layer.set_deepspeed_parallelism()
    router = layer.router
    torch.manual_seed(20 + rank)
    x = torch.randn(5 + rank, 2, D)
    cot = torch.randn(5 + rank, 2, D)
    y, l_aux, _ = layer(x)
    scaled = {key: loss.detach() for key, loss in router.last_stats.losses.items()}

    # the same router (weights, topology, group) with every coefficient 1.0: the raw losses
    unit_config = dataclasses.replace(router.config, aux_loss_coeff=1.0, locality_loss_coeff=1.0, z_loss_coeff=1.0)
    unit = LocMoERouter(unit_config, router.topology, router.group)
    unit.load_state_dict(router.state_dict())
    raw = unit(x.reshape(-1, D)).losses
    by_hand = sum(COEFFS[key] * raw[key] for key in COEFFS)

    task = (y * cot).sum()
    return dict(
        l_aux=l_aux.detach(), by_hand=by_hand.detach(), scaled=scaled, raw={k: v.detach() for k, v in raw.items()},
        nodes=router.topology.num_nodes,
        grad_layer=_router_grads(task + l_aux, router),
        grad_by_hand=[a + b for a, b in zip(_router_grads(task, router), _router_grads(by_hand, unit))],
    )


@pytest.mark.multiproc
def test_deepspeed_l_aux_is_the_scaled_router_loss_scaled_once():
    for r in run_workers(_worker, 2):
        assert r["nodes"] == 2
        assert set(r["raw"]) == set(COEFFS) and all(float(v) > 0 for v in r["raw"].values())
        # l_aux = sum of coeff * raw loss (the losses are linear in their coefficients, up to rounding of
        # the coefficient product), and each of the router's logged losses carries its coefficient once
        torch.testing.assert_close(r["l_aux"], r["by_hand"], rtol=1e-6, atol=0)
        for key, coeff in COEFFS.items():
            torch.testing.assert_close(r["scaled"][key], coeff * r["raw"][key], rtol=1e-6, atol=0, msg=key)
        # not DeepSpeed's convention (a raw loss the loop scales): l_aux is far from the unscaled sum
        assert float(r["l_aux"]) < 0.2 * float(sum(r["raw"].values()))
        # the router's gradient of task + l_aux equals task + the by-hand scaled losses: nothing scaled twice
        for g_layer, g_hand in zip(r["grad_layer"], r["grad_by_hand"], strict=True):
            torch.testing.assert_close(g_layer, g_hand, rtol=1e-5, atol=1e-7)
        assert any(float(g.abs().sum()) > 0 for g in r["grad_layer"])
