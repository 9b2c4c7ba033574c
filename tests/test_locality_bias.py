"""The locality bias: the one rank-aware part of the LocMoE router, through which the locality loss can
actually move traffic onto the token's own node.

Without it, a router replicated over data-parallel ranks sees only token content; when every rank's data
come from the same distribution, the expected share of routed pairs crossing nodes is 1 - 1/N whatever the
router learns (the token's node is independent of its content). The multi-process test shows both sides.
"""

import pytest
import torch

from locmoe_plugin import ConfigError, LocMoEConfig, LocMoERouter, Topology

from ._dist import run_workers

N, D, K = 8, 32, 2


def _cfg(**kw):
    base = dict(num_experts=N, hidden_size=D, topk=K, routing="locmoe", gate="dense", locality_loss_coeff=0.01)
    return LocMoEConfig(**{**base, **kw})


def test_bias_is_one_row_per_ep_rank_and_only_this_ranks_row_acts():
    topo = Topology.from_ranks_per_node(4, 2, N, ep_rank=3)
    r = LocMoERouter(_cfg(), topo)
    assert r.locality_bias is not None and r.locality_bias.shape == (4, N)
    assert torch.count_nonzero(r.locality_bias) == 0  # starts neutral: routing as without it
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    before = r(x).assignment.expert_ids.clone()
    with torch.no_grad():
        r.locality_bias[0, 5] = 100.0  # another rank's row: no effect here
    assert torch.equal(r(x).assignment.expert_ids, before)
    with torch.no_grad():
        r.locality_bias[3, 5] = 100.0  # this rank's row: expert 5 wins for every token
    assert (r(x).assignment.expert_ids[:, 0] == 5).all()


def test_hybrid_ranks_by_the_cosine_of_the_biased_logits():
    """GrAP, d = 4, n = 2 (groups of 2 features): the bias is a logit offset, so the hybrid ranks by
    cos = (logit + bias) * sqrt(d/n) / ||x||, not by cos + bias. Hand-worked, bias row [0, 1.5]:
    x = [3, 3, 1, 1]: logits [3, 1] -> biased [3, 2.5]: expert 0 (cos + bias would give 0.949 < 1.816: 1);
    x = [1, 1, 1.2, 1.2]: logits [1, 1.2] -> biased [1, 2.7]: expert 1."""
    topo = Topology.from_ranks_per_node(2, 1, 2, ep_rank=0)
    cfg = LocMoEConfig(num_experts=2, hidden_size=4, topk=1, routing="hybrid", gate="grap",
                       capacity="factor", capacity_factor=4.0, locality_loss_coeff=0.01)
    r = LocMoERouter(cfg, topo)
    with torch.no_grad():
        r.locality_bias[0] = torch.tensor([0.0, 0.15])  # x locality_bias_scale 10 = [0, 1.5]
    x = torch.tensor([[3.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.2, 1.2]])
    out = r(x)
    assert out.assignment.expert_ids[:, 0].tolist() == [0, 1]
    aff = r.gate.affinity(x, r.gate(x) + torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(aff[0], torch.tensor([3.0, 2.5]) * 2**0.5 / 20**0.5)


def test_locality_loss_trains_only_this_ranks_row_towards_local_experts():
    topo = Topology.from_ranks_per_node(4, 2, N, ep_rank=1)  # node 0 hosts experts 0-3
    r = LocMoERouter(_cfg(aux_loss_coeff=0.0, locality_loss_coeff=1.0), topo)
    out = r(torch.randn(32, D, generator=torch.Generator().manual_seed(1)))
    out.total_loss.backward()
    g = r.locality_bias.grad
    assert torch.count_nonzero(g[[0, 2, 3]]) == 0
    assert (g[1, :4] < 0).all() and (g[1, 4:] > 0).all()  # descent raises local experts, lowers remote ones


def test_no_bias_where_it_cannot_help_or_is_not_asked_for():
    assert LocMoERouter(_cfg(), Topology.single_node(1, N)).locality_bias is None  # one rank: no rows to learn
    two = Topology.from_ranks_per_node(4, 2, N, ep_rank=0)
    assert LocMoERouter(_cfg(routing="topk", locality_loss_coeff=None), two).locality_bias is None  # no locality loss
    assert LocMoERouter(_cfg(locality_bias=False), two).locality_bias is None
    assert "locality_bias" not in dict(LocMoERouter(_cfg(locality_bias=False), two).named_parameters())


def test_bias_without_locality_loss_is_refused():
    with pytest.raises(ConfigError, match="locality_bias is trained by the locality loss"):
        _cfg(locality_bias=True, locality_loss_coeff=0.0)


def _train_worker(rank, world):
    import torch.distributed as dist

    topo = Topology.from_ranks_per_node(world, 2, N, ep_rank=rank)
    shares = {}
    for bias in (False, True):
        torch.manual_seed(0)  # replicated router, as under data parallelism
        r = LocMoERouter(_cfg(locality_loss_coeff=1.0, locality_bias=bias), topo, group=dist.group.WORLD).train()
        opt = torch.optim.Adam(r.parameters(), lr=0.05)
        cross = routed = 0.0
        for step in range(60):
            g = torch.Generator().manual_seed(1000 * step + rank)  # i.i.d. data on every rank
            out = r(torch.randn(64, D, generator=g))
            opt.zero_grad()
            out.total_loss.backward()
            for p in r.parameters():  # data-parallel gradient average
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            if step >= 50:
                c = torch.tensor([float(out.stats.cross_node_pairs), float(out.stats.tokens_per_expert.sum())])
                dist.all_reduce(c)
                cross, routed = cross + float(c[0]), routed + float(c[1])
        shares[bias] = cross / routed
    return shares


@pytest.mark.multiproc
def test_locality_needs_the_bias_on_iid_data():
    shares = run_workers(_train_worker, 4)[0]
    assert shares[False] == pytest.approx(0.5, abs=0.06)  # content-only router: 1 - 1/N, whatever it learns
    assert shares[True] < 0.15


def test_row_bias_node_matches_the_composed_ops():
    """RowBias (one autograd node): value and gradients of ``logits + scale * bias[row]`` as select + add with
    alpha give them (the bias gradient to rounding: summed before scaling), bf16 bias included."""
    from locmoe_plugin.row_bias import add_row_bias

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(7, N, requires_grad=True)
        bias = torch.randn(3, N, dtype=dtype, requires_grad=True)
        cot = torch.randn(7, N)
        out = add_row_bias(logits, bias, 1, 10.0)
        g_logits, g_bias = torch.autograd.grad(out, (logits, bias), cot)
        ref = torch.add(logits, bias[1].float(), alpha=10.0)
        r_logits, r_bias = torch.autograd.grad(ref, (logits, bias), cot)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        assert torch.equal(g_logits, r_logits) and g_bias.dtype == dtype
        torch.testing.assert_close(g_bias.float(), r_bias.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5)
        assert (g_bias[[0, 2]] == 0).all()
