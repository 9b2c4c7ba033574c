"""Router on 4 gloo ranks emulating 2 nodes x 2: the global aux loss and capacity agreement."""

import pytest
import torch

from locmoe_plugin.bounds import ec_min_exact
from locmoe_plugin.capacity import estimate_delta
from locmoe_plugin.resonance import misranking_counts

from ._dist import run_workers

pytestmark = pytest.mark.multiproc

N, D, K, S = 8, 64, 2, 48


def _worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import LocMoEConfig, LocMoERouter, Topology

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(S + 8 * rank, D, generator=g)  # uneven batch sizes
    topo = Topology.from_ranks_per_node(world, 2, N, ep_rank=rank)
    out = {}
    # case 1: aux loss over the EP group
    cfg = LocMoEConfig(num_experts=N, hidden_size=D, topk=K, aux_loss_coeff=0.01)
    torch.manual_seed(5)  # the same gate weights on every rank and every run: the loss gap below is fixed
    r = LocMoERouter(cfg, topo, group=dist.group.WORLD)
    res = r(x)
    out["aux"] = res.losses["aux"].item()
    out["probs_mean"] = res.probs.mean(0)
    out["requested"] = res.stats.requested_per_expert
    out["pairs"] = x.shape[0] * K
    out["reduced_tokens"] = res.stats.reduced(dist.group.WORLD).tokens_per_expert
    out["local_tokens"] = res.stats.tokens_per_expert
    # case 2: capacity "bound" with estimated delta and "adaptive": every rank agrees
    for mode in ("bound", "adaptive"):
        cfg = LocMoEConfig(num_experts=N, hidden_size=D, topk=K, routing="hybrid", capacity=mode, gate="grap",
                           locality_loss_coeff=0.01, resonance_mass=0)  # GrAP affinities, checked below
        r = LocMoERouter(cfg, topo, group=dist.group.WORLD).train()
        r(x)
        out[mode] = (r.capacity.delta, r.capacity.factor, r.capacity.q_hat)
    # case 3: loss-free balancing offsets move from the EP group's counts: equal on every rank, with no
    # aux loss (the counts are still all-reduced)
    cfg = LocMoEConfig(num_experts=N, hidden_size=D, topk=K, gate="dense", aux_loss_coeff=0.0, expert_bias_rate=0.5)
    torch.manual_seed(7)
    r = LocMoERouter(cfg, topo, group=dist.group.WORLD).train()
    res = r(x)
    out["eb_requested"] = res.stats.requested_per_expert
    out["eb_bias"] = r.expert_bias.clone()
    out["x"] = x
    return out


def test_router_on_four_ranks():
    res = run_workers(_worker, 4)
    total = sum(r["requested"] for r in res)
    pairs = sum(r["pairs"] for r in res)
    for r in res:
        expected = 0.01 * N * torch.sum(total.double() / pairs * r["probs_mean"].double()).item()
        assert r["aux"] == pytest.approx(expected, rel=1e-5)
        # and the local-only loss lies outside that tolerance (so the check above tells the reduction happened)
        local = 0.01 * N * torch.sum(r["requested"].double() / r["pairs"] * r["probs_mean"].double()).item()
        assert abs(local - expected) > 2e-5 * expected, (local, expected)
        assert torch.equal(r["reduced_tokens"], sum(q["local_tokens"] for q in res))
    # expert bias: 0.5 * sign(mean - load) of the group's load, the same on every rank
    load = sum(r["eb_requested"] for r in res).float()
    want = 0.5 * torch.sign(load.mean() - load)
    assert want.abs().sum() > 0
    for r in res:
        assert torch.equal(r["eb_bias"], want)
    local = res[0]["eb_requested"].float()
    assert not torch.equal(0.5 * torch.sign(local.mean() - local), want)  # local counts would differ
    # capacity agreement
    for mode in ("bound", "adaptive"):
        assert len({r[mode] for r in res}) == 1, [r[mode] for r in res]
    # delta = mean top-1 affinity over every rank's tokens (ranks weighted by their token counts)
    from locmoe_plugin.gate import GrAPGate

    gate = GrAPGate(D, N)
    delta = estimate_delta(gate.affinity(torch.cat([r["x"] for r in res]))).item()
    assert res[0]["bound"][0] == pytest.approx(delta, rel=1e-5)
    assert res[0]["bound"][1] == pytest.approx(min(4.0, max(0.5, ec_min_exact(delta, D, N))), rel=1e-5)
    counts = [misranking_counts(gate.affinity(r["x"])) for r in res]  # misranked pairs summed over ranks
    q_hat = sum(u.sum() for u, _ in counts).item() / sum(p.sum() for _, p in counts).item()
    assert res[0]["adaptive"][2] == pytest.approx(q_hat, rel=1e-9)
