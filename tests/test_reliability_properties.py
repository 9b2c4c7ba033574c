"""Property tests (hypothesis): any config value is accepted with a valid config or refused with
ConfigError (never another exception), and the router gives finite, consistent output for any finite
input, including empty batches, all-zero rows and huge values."""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locmoe_plugin.config import ConfigError, LocMoEConfig
from locmoe_plugin.router import LocMoERouter

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.sampled_from(["grap", "dense", "hybrid", "hash", "bound", "adaptive", "factor", "local"]),
)
FIELDS = ["num_experts", "hidden_size", "topk", "gate", "routing", "aux_loss_coeff", "aux_loss_scope",
          "locality_loss_coeff", "z_loss_coeff", "capacity", "capacity_factor", "min_capacity",
          "capacity_factor_min", "capacity_factor_max", "delta", "adaptive_interval", "drop_policy",
          "max_nodes_per_token", "locality_bias", "locality_bias_scale", "expert_bias_rate", "gpus_per_node",
          "hash_seed", "renormalize", "renormalize_kept"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4))
def test_any_config_is_valid_or_refused_with_config_error(changes):
    values = {"num_experts": 8, "hidden_size": 64, **changes}
    try:
        cfg = LocMoEConfig.from_dict(values)
    except ConfigError:
        return
    for name in ("aux_loss_coeff", "locality_loss_coeff", "z_loss_coeff", "capacity_factor_min",
                 "capacity_factor_max", "locality_bias_scale", "expert_bias_rate"):
        value = getattr(cfg, name)
        assert not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value), name
    for name in ("capacity_factor", "delta"):
        value = getattr(cfg, name)
        assert value is None or (not isinstance(value, bool) and math.isfinite(value)), name
    assert cfg.delta is None or cfg.capacity in ("bound", "adaptive")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    routing=st.sampled_from(["topk", "locmoe", "hybrid"]),
    capacity=st.sampled_from(["none", "factor", "bound", "adaptive"]),
    tokens=st.integers(0, 24),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e6]),
    zero_rows=st.integers(0, 24),
    seed=st.integers(0, 2**16),
)
def test_router_output_is_finite_and_consistent_for_any_finite_input(routing, capacity, tokens, scale, zero_rows,
                                                                     seed):
    if routing == "hybrid" and capacity == "none":
        capacity = "adaptive"
    cfg = LocMoEConfig(num_experts=4, hidden_size=16, topk=2, routing=routing, capacity=capacity,
                       capacity_factor=1.0 if capacity == "factor" else None, adaptive_interval=1)
    router = LocMoERouter(cfg).train()
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed)) * scale
    x[:zero_rows] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            out = router(x)
    a = out.assignment
    assert a.expert_ids.shape == (tokens, 2) and torch.isfinite(a.weights).all()
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert int(out.stats.dropped_pairs) + int(out.stats.tokens_per_expert.sum()) == 2 * tokens
    for value in (router.capacity.delta, router.capacity.factor):
        assert value is None or (math.isfinite(value) and value > 0)
    if out.stats.capacity is not None:
        assert int(out.stats.tokens_per_expert.max()) <= out.stats.capacity
