"""LocMoE+ resonance: the misranking rate, the capacity schedule, the expert-choice threshold and the
hybrid's expert-choice ranking, with hand-worked values."""

import math

import pytest
import torch

from locmoe_plugin.capacity import CapacityController
from locmoe_plugin.config import ConfigError, LocMoEConfig
from locmoe_plugin.gate import GrAPGate
from locmoe_plugin.resonance import (
    chance_misranking,
    misranking_counts,
    resonance_factor,
    summed_affinity_keep,
)
from locmoe_plugin.router import LocMoERouter
from locmoe_plugin.routing import route
from locmoe_plugin.topology import Topology


def test_misranking_counts_by_hand():
    # owners: t0, t2 -> expert 0; t1, t3 -> expert 1. Expert 0: own {0.5, 0.3}, others {0.2, 0.35}:
    # 0.35 >= 0.3 is the one misranked pair of 2 * 2. Expert 1: own {0.4, 0.6}, others {0.1, 0.1}: none.
    aff = torch.tensor([[0.5, 0.1], [0.2, 0.4], [0.3, 0.1], [0.35, 0.6]])
    u, pairs = misranking_counts(aff)
    assert u.tolist() == [1, 0] and pairs.tolist() == [4, 4]
    assert u.dtype == torch.long
    # a zero-norm token (all-zero row) and a non-finite one are left out, not counted as owners of expert 0
    more = torch.cat([aff, torch.zeros(1, 2), torch.tensor([[float("nan"), 0.3]])])
    u2, pairs2 = misranking_counts(more)
    assert u2.tolist() == [1, 0] and pairs2.tolist() == [4, 4]
    # empty batch: nothing compared
    u3, pairs3 = misranking_counts(torch.zeros(0, 3))
    assert u3.tolist() == [0, 0, 0] and pairs3.tolist() == [0, 0, 0]


def test_chance_misranking_closed_form():
    """Exchangeable continuous affinities (an untrained router): q = 1 / (2 (n + 1)), here 0.1 for n = 4."""
    assert chance_misranking(4) == pytest.approx(0.1) and chance_misranking(8) == pytest.approx(1 / 18)
    g = torch.Generator().manual_seed(3)
    u, pairs = misranking_counts(torch.rand(6000, 4, generator=g))
    q = u.sum().item() / pairs.sum().item()
    assert q == pytest.approx(0.1, abs=0.004)


def test_resonance_factor_by_hand():
    # q = 1/8 at n = 2 (chance 1/6): 2.0 * (1/8) / (1/6) = 1.5; at chance the factor is the isotropic one
    assert resonance_factor(1 / 8, 2, 2.0) == pytest.approx(1.5)
    assert resonance_factor(chance_misranking(32), 32, 1.25) == pytest.approx(1.25)
    assert resonance_factor(0.0, 32, 2.0) == 0.0


def _tokens_around_experts(kappa: float, n=8, d=256, s=4096, seed=0) -> torch.Tensor:
    """``[s, d]`` tokens: isotropic noise of norm ~sqrt(d) plus ``kappa * sqrt(d)`` along the GrAP
    direction of the token's home expert (``t mod n``, balanced)."""
    g = torch.Generator().manual_seed(seed)
    home = torch.arange(s) % n
    direction = torch.zeros(n, d)
    for i in range(n):
        direction[i, i * d // n:(i + 1) * d // n] = (n / d) ** 0.5
    return torch.randn(s, d, generator=g) + kappa * d**0.5 * direction[home]


def test_adaptive_factor_falls_as_tokens_concentrate():
    """Tokens drawn around their experts with rising concentration: the factor falls monotonically from
    about the isotropic factor (2.0) to below 0.5. Each value is 2.0 * 2 (n + 1) * q_hat (n = 8), e.g.
    q_hat ~ 0.053 (chance 1/18) at kappa = 0 and ~ 0.0066 at kappa = 0.2. The earlier
    ``1 / (n * q_hat)`` rose towards 1.0 on the same tokens."""
    n, d = 8, 256
    cfg = LocMoEConfig(num_experts=n, hidden_size=d, topk=1, routing="hybrid", capacity="adaptive",
                       adaptive_interval=1, capacity_factor_min=0.05)
    gate = GrAPGate(d, n)
    ctl = CapacityController(cfg)
    factors, qs = [], []
    for kappa in (0.0, 0.05, 0.1, 0.15, 0.2):
        ctl.capacity(4096, gate.affinity(_tokens_around_experts(kappa)), True)
        factors.append(ctl.factor)
        qs.append(ctl.q_hat)
        assert ctl.factor == pytest.approx(2.0 * 2 * (n + 1) * ctl.q_hat)
    assert factors[0] == pytest.approx(2.0, rel=0.1)  # chance level
    assert all(a > b for a, b in zip(factors, factors[1:])), factors
    assert factors[-1] < 0.5, factors


def test_capacity_bound_remark7_exponential_form():
    """Remark 7: C_min = (1/n) exp(d delta^2 / (2 - delta^2)); d = 5120, n = 16, delta = 0.03:
    exp(4.608 / 1.9991) / 16 = exp(2.30504) / 16 = 0.62653."""
    want = math.exp(0.03**2 * 5120 / (2 - 0.03**2)) / 16
    assert want == pytest.approx(0.62653, abs=1e-5)
    for form, factor in (("exp", want), ("exact", 1.9648), ("erfc", 1.9664)):
        cfg = LocMoEConfig(num_experts=16, hidden_size=5120, topk=1, capacity="bound", delta=0.03,
                           capacity_bound_form=form, capacity_factor_min=0.1)
        ctl = CapacityController(cfg)
        ctl.capacity(10, torch.rand(10, 16), True)
        assert ctl.factor == pytest.approx(factor, abs=1e-4), form


def test_summed_affinity_keep_by_hand():
    # expert 0 candidates 0.5, 0.3, 0.15, 0.05 (total 1.0); mass ranked above: 0, 0.5, 0.8, 0.95.
    # expert 1: 0.4 and -0.2 (counts 0); the -1 pair is never kept.
    ids = torch.tensor([[0], [0], [1], [0], [0], [1], [-1]])
    scores = torch.tensor([[0.15], [0.5], [0.4], [0.05], [0.3], [-0.2], [0.9]])
    keep = summed_affinity_keep(ids, scores, 2, 0.8).reshape(-1).tolist()
    assert keep == [False, True, True, False, True, False, False]  # 0.5, 0.3 (0.8 not < 0.8), 0.4
    keep = summed_affinity_keep(ids, scores, 2, 0.85).reshape(-1).tolist()
    assert keep == [True, True, True, False, True, False, False]
    keep = summed_affinity_keep(ids, scores, 2, 1.0).reshape(-1).tolist()
    assert keep == [True, True, True, True, True, False, False]  # exactly the positive pairs


def test_route_applies_the_threshold_with_the_capacity():
    aff = torch.tensor([[0.5, 0.1], [0.3, 0.2], [0.15, 0.1], [0.05, 0.6]])
    a, _ = route(aff, topk=1, mode="hybrid", affinity=aff, capacity=10, resonance_mass=0.8)
    assert a.expert_ids.reshape(-1).tolist() == [0, 0, -1, 1]  # expert 0 keeps 0.5 and 0.3 only
    a, _ = route(aff, topk=1, mode="hybrid", affinity=aff, capacity=1, resonance_mass=0.8)
    assert a.expert_ids.reshape(-1).tolist() == [0, -1, -1, 1]  # the capacity binds first


def _token(cos0: float, norm: float) -> torch.Tensor:
    """A d = 4 token with cosine ``cos0`` to GrAP expert 0 (features 0, 1), 0 to expert 1 (features 2, 3)."""
    inside = torch.tensor([1.0, 1.0, 0.0, 0.0]) / 2**0.5
    outside = torch.tensor([1.0, -1.0, 0.0, 0.0]) / 2**0.5
    return norm * (cos0 * inside + (1 - cos0**2) ** 0.5 * outside)


def test_expert_choice_ranks_by_unbiased_cosine_with_locality_bias():
    """A small-norm token with cosine -0.11 and a token with +0.06 both choose expert 0 through the
    locality bias; with room for one, expert 0 keeps the +0.06 token. Ranking by the cosine of the biased
    logits, (g + b) sqrt(d/n) / ||x||, kept the small-norm token (biased score ~7 against ~0.07)."""
    cfg = LocMoEConfig(num_experts=2, hidden_size=4, topk=1, routing="hybrid", gate="grap", capacity="factor",
                       capacity_factor=0.5, min_capacity=1, aux_loss_coeff=0.0, locality_loss_coeff=0.01,
                       resonance_mass=0)
    router = LocMoERouter(cfg, Topology.single_node(2, 2, ep_rank=0))
    with torch.no_grad():
        router.locality_bias[0] = torch.tensor([0.05, 0.0]) / cfg.locality_bias_scale  # logit offset 0.05
    x = torch.stack([_token(-0.11, 0.01), _token(0.06, 10.0)])
    aff = router.gate.affinity(x)
    assert aff[:, 0].tolist() == pytest.approx([-0.11, 0.06], abs=1e-6)
    out = router(x)
    assert out.assignment.requested_ids.reshape(-1).tolist() == [0, 0]  # both chose expert 0
    assert out.stats.capacity == 1
    assert out.assignment.expert_ids.reshape(-1).tolist() == [-1, 0]


def test_resonance_config_validation():
    base = dict(num_experts=4, hidden_size=16, topk=1)
    for bad in (1.5, -0.1, True, "0.9"):
        with pytest.raises(ConfigError, match="resonance_mass"):
            LocMoEConfig(**base, routing="hybrid", resonance_mass=bad)
    with pytest.raises(ConfigError, match="routing='hybrid'"):
        LocMoEConfig(**base, routing="locmoe", capacity="adaptive", resonance_mass=0.9)
    for bad in (0, -1.0, math.inf, "2"):
        with pytest.raises(ConfigError, match="capacity_factor_isotropic"):
            LocMoEConfig(**base, routing="hybrid", capacity_factor_isotropic=bad)
    with pytest.raises(ConfigError, match="capacity_bound_form"):
        LocMoEConfig(**base, capacity="bound", capacity_bound_form="beta")
    assert LocMoEConfig(**base, routing="hybrid", resonance_mass=1.0).resonance_mass == 1.0


def test_threshold_reads_the_capacity_order_with_the_same_result():
    """The hybrid sorts its pairs once (routing.score_order) for the capacity and the threshold: the order by
    raw affinity keeps exactly what the threshold's own order (affinity clamped at 0) keeps, ties, negative
    and dropped pairs included."""
    from locmoe_plugin.routing import pair_keys, score_order

    torch.manual_seed(3)
    for _ in range(20):
        ids = torch.randint(-1, 6, (40, 2))
        scores = torch.randn(40, 2).round(decimals=1)  # many ties
        order = score_order(pair_keys(ids, 6), scores)
        for mass in (0.3, 0.7, 0.95):
            assert torch.equal(summed_affinity_keep(ids, scores, 6, mass, order=order),
                               summed_affinity_keep(ids, scores, 6, mass))
