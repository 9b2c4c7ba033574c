"""Hash routing (Hash Layers, Roller et al. 2021; the LocMoE paper's baseline): the token-id hash, route(),
the core router, the config rules, and the Megatron path that hands the token ids to the router."""

import pytest
import torch

from locmoe_plugin import ConfigError, LocMoEConfig, LocMoERouter, Topology
from locmoe_plugin.routing import _mul32, hash_experts, mix32, route

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


# --------------------------------------------------------------------------------- the hash function
def _mix32_py(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _experts_py(token_id, n, k, seed=0):
    """The documented formula in plain Python integers: slot j draws r_j = (h_j * (n - j)) >> 32 and
    takes the r_j-th smallest expert not taken yet."""
    out = []
    for j in range(k):
        h = _mix32_py((((token_id & M32) ^ seed) + j * GOLDEN) & M32)
        free = [e for e in range(n) if e not in out]
        out.append(free[(h * (n - j)) >> 32])
    return out


def test_mix32_hand_worked():
    # x = 1, step by step: x ^= x>>16 -> 1; * 0x7feb352d -> 2146121005; ^= >>15 -> 2146121005 ^ 65494
    # = 2146159355; * 0x846ca68b mod 2**32 -> 1753872457; ^= >>16 (26762) -> 1753845952
    assert 2146121005 ^ (2146121005 >> 15) == 2146159355
    assert (2146159355 * 0x846CA68B) % 2**32 == 1753872457
    assert 1753872457 ^ (1753872457 >> 16) == 1753845952
    assert mix32(torch.tensor([0, 1, 2])).tolist() == [0, 1753845952, 3507691905]
    big = torch.tensor([0, 1, 0xFFFF, 0x10000, 0xDEADBEEF, M32])
    for c in (0x7FEB352D, 0x846CA68B, GOLDEN):  # exact mod-2**32 product, no int64 overflow
        assert _mul32(big, c).tolist() == [(int(v) * c) % 2**32 for v in big]


def test_hash_experts_hand_worked():
    # token 5, seed 0, n=8, k=2: h_0 = mix32(5) = 1548080446 -> r_0 = h_0*8 >> 32 = 2 -> expert 2;
    # h_1 = mix32(5 + 0x9E3779B9) = 2803216774 -> r_1 = h_1*7 >> 32 = 4 -> free [0,1,3,4,5,6,7][4] = 5
    assert _mix32_py(5) == 1548080446 and (1548080446 * 8) >> 32 == 2
    assert _mix32_py(5 + GOLDEN) == 2803216774 and (2803216774 * 7) >> 32 == 4
    # token 1000: r_0 = 2 -> 2; r_1 = 1 -> free [0,1,3,...][1] = 1. Seed 7 on token 5: 5^7 = 2,
    # h_0 = mix32(2) = 3507691905 -> r_0 = 6; r_1 = 0 -> expert 0
    assert hash_experts(torch.tensor([5, 1000]), 8, 2).tolist() == [[2, 5], [2, 1]]
    assert hash_experts(torch.tensor([5]), 8, 2, seed=7).tolist() == [[6, 0]]
    ids = [0, 1, 2, 3, 5, 17, 1000, 50256, 2**31 - 1, -1]
    for n, k, seed in [(8, 2, 0), (16, 4, 7), (5, 5, 2**32 - 1), (64, 3, 12345)]:
        assert hash_experts(torch.tensor(ids), n, k, seed).tolist() == [_experts_py(i, n, k, seed) for i in ids]


def test_hash_experts_distinct_deterministic_shape():
    ids = torch.randint(0, 2**31, (3000,), generator=torch.Generator().manual_seed(0))
    for n, k in [(8, 8), (16, 4), (4, 1)]:
        e = hash_experts(ids, n, k)
        assert e.dtype == torch.int64 and e.shape == (3000, k)
        assert ((e >= 0) & (e < n)).all()
        assert (e.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    torch.manual_seed(123)  # no dependence on torch's RNG, the ids' dtype or their shape
    a = hash_experts(ids, 16, 4, seed=3)
    torch.manual_seed(456)
    assert torch.equal(hash_experts(ids.int().reshape(30, 100), 16, 4, seed=3), a.reshape(30, 100, 4))
    assert not torch.equal(hash_experts(ids, 16, 4, seed=4), a)  # the seed changes the map
    assert hash_experts(torch.zeros(0, dtype=torch.long), 8, 2).shape == (0, 2)


def _chi2(counts):
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("stride", [1, 16, 1024, 65536])
def test_hash_experts_roughly_uniform(stride):
    """Expert loads per slot, and (slot 0, slot 1) pairs, over 20000 structured ids: chi-square below
    about its 1e-4 quantile. A modulo hash (id % n) puts every multiple of 16 on one expert."""
    n, k = 16, 2
    ids = torch.arange(20000) * stride
    e = hash_experts(ids, n, k)
    for j in range(k):
        assert _chi2(torch.bincount(e[:, j], minlength=n)) < 45  # 15 dof
    pair = torch.bincount(e[:, 0] * n + e[:, 1], minlength=n * n)
    off_diag = pair[torch.arange(n * n) // n != torch.arange(n * n) % n]
    assert _chi2(off_diag) < 330  # 239 dof
    if stride >= 16:
        assert _chi2(torch.bincount(ids % n, minlength=n)) > 1e5  # what the bound rejects


# ------------------------------------------------------------------------------------------ route()
def test_route_hash_weights_and_capacity_drops():
    ids = torch.tensor([9, 9, 9, 9, 7])
    a, probs = route(None, topk=2, mode="hash", token_ids=ids, num_experts=8)
    want = hash_experts(ids, 8, 2)
    assert not set(want[0].tolist()) & set(want[4].tolist())  # token 7 shares no expert with token 9
    assert torch.equal(a.expert_ids, want) and torch.equal(a.requested_ids, want)
    assert a.weights.dtype == torch.float32 and (a.weights == 0.5).all()
    assert torch.equal(probs, a.to_megatron()[0]) and torch.allclose(probs.sum(-1), torch.ones(5))
    # the four copies of token 9 ask the same two experts: capacity 2 keeps the first two in token order
    for policy in ("score", "position"):
        c, _ = route(None, topk=2, mode="hash", token_ids=ids, num_experts=8, capacity=2, drop_policy=policy)
        assert torch.equal(c.requested_ids, want)
        assert c.kept.tolist() == [[True, True]] * 2 + [[False, False]] * 2 + [[True, True]]
        assert c.expert_ids[2:4].eq(-1).all() and c.weights[2:4].eq(0).all() and c.weights[[0, 1, 4]].eq(0.5).all()
        assert int((~c.kept).sum()) == 4
        assert int(c.requested_per_expert().sum() - c.tokens_per_expert().sum()) == 4
    one, _ = route(None, topk=1, mode="hash", token_ids=ids, num_experts=8)
    assert (one.weights == 1.0).all()
    with pytest.raises(ValueError, match="needs token_ids and num_experts"):
        route(None, topk=2, mode="hash", num_experts=8)


# ------------------------------------------------------------------------------------------ router
def test_router_routes_by_token_ids_with_telemetry():
    topo = Topology.from_ranks_per_node(2, 1, 8, ep_rank=0)  # experts 0-3 on this node, 4-7 remote
    cfg = LocMoEConfig(num_experts=8, hidden_size=30, topk=2, routing="hash", hash_seed=11)  # 30 % 8 != 0
    router = LocMoERouter(cfg, topo)
    assert router.gate is None and list(router.parameters()) == []
    token_ids = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(3, 5, 30, requires_grad=True)
    out = router(hidden, token_ids)
    want = hash_experts(token_ids.reshape(-1), 8, 2, seed=11)
    assert torch.equal(out.assignment.expert_ids, want) and (out.assignment.weights == 0.5).all()
    assert out.logits is None and out.losses == {}  # aux_loss_coeff 0.01 is accepted and unused
    assert out.total_loss.item() == 0.0
    d = out.stats.to_dict()
    assert d["cross_node_pairs"] == int((want >= 4).sum()) and d["routed_pairs"] == 30 and d["dropped_pairs"] == 0
    assert d["tokens_per_expert"] == torch.bincount(want.reshape(-1), minlength=8).tolist()
    assert d["cross_node_share"] == pytest.approx(int((want >= 4).sum()) / 30)
    assert "aux_loss" not in d and d["capacity"] is None

    capped = LocMoERouter(cfg.replace(capacity="factor", capacity_factor=0.5, min_capacity=0), topo)
    st = capped(hidden, token_ids).stats
    assert st.capacity == 2 and int(st.tokens_per_expert.max()) <= 2  # ceil(0.5 * 15 * 2 / 8)
    assert int(st.dropped_pairs) == 30 - int(st.tokens_per_expert.sum()) > 0

    with pytest.raises(ValueError, match=r"routing='hash' picks experts from the token ids: call the router as"):
        router(hidden)
    with pytest.raises(ValueError, match=r"token_ids has 5 ids for 15 tokens"):
        router(hidden, token_ids[0])


# ------------------------------------------------------------------------------------------ config
BASE = dict(num_experts=16, hidden_size=1024, topk=2, routing="hash")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(gate="dense"), r"gate='dense' with routing='hash'.*leave gate at 'grap'"),
        (dict(locality_loss_coeff=0.01),
         r"needs routing='locmoe' or 'hybrid': routing='hash' has no gate.*set locality_loss_coeff=0"),
        (dict(z_loss_coeff=1e-3), r"z_loss_coeff=0.001 with routing='hash'.*set z_loss_coeff=0"),
        (dict(capacity="bound"), r"capacity='bound' with routing='hash'.*use capacity='factor'"),
        (dict(capacity="adaptive", delta=0.1), r"capacity='adaptive' with routing='hash'.*use capacity='factor'"),
        (dict(max_nodes_per_token=1), r"max_nodes_per_token=1 with routing='hash'.*remove max_nodes_per_token"),
        (dict(hash_seed=-1), r"hash_seed=-1 must be an integer in \[0, 2\*\*32\)"),
        (dict(hash_seed=2**32), r"hash_seed=4294967296 must be an integer"),
        (dict(routing="topk", hash_seed=3), r"hash_seed=3 is only used with routing='hash'"),
    ],
)
def test_hash_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        LocMoEConfig(**{**BASE, **changes})


def test_hash_config_defaults():
    cfg = LocMoEConfig(**BASE)
    assert (cfg.locality_loss_coeff, cfg.capacity, cfg.aux_loss_coeff, cfg.hash_seed) == (0.0, "none", 0.01, 0)
    assert LocMoEConfig(**{**BASE, "hidden_size": 1000}).hidden_size == 1000  # no gate: no d % n rule
    assert LocMoEConfig(**BASE, capacity="factor", capacity_factor=1.25).capacity == "factor"
    assert LocMoEConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------ Megatron
def test_megatron_flags_and_construction_checks():
    pytest.importorskip("megatron.core")
    import argparse

    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.megatron.args import add_arguments, settings_from_args
    from locmoe_plugin.megatron.router import LocMoEMegatronRouter, current_token_ids

    parser = add_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--locmoe", "--locmoe-routing", "hash", "--locmoe-hash-seed", "3"])
    for k, v in dict(num_experts=8, hidden_size=64, moe_router_topk=2, expert_model_parallel_size=1,
                     moe_expert_capacity_factor=None).items():
        setattr(ns, k, v)
    assert settings_from_args(ns)[0] == {"routing": "hash", "hash_seed": 3}
    assert settings_from_args(ns)[1].mode == "hierarchical"

    tc = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
                           moe_token_dispatcher_type="alltoall", recompute_granularity="selective",
                           recompute_modules=["moe"])
    with pytest.raises(ConfigError, match=r"routing='hash' reads the token ids.*reruns the router during backward"):
        LocMoEMegatronRouter(tc, locmoe={"routing": "hash"})
    with pytest.raises(RuntimeError, match=r"needs the token ids, and none are set: call .*attach_token_ids"):
        current_token_ids()


def _megatron_worker(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.megatron import locmoe_spec
    from locmoe_plugin.megatron import router as mrouter
    from locmoe_plugin.megatron import token_ids

    out = {}
    # A: a GPTModel (EP=2 as 2 nodes) with hash routing; the pre-hook hands input_ids to both MoE layers
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=world, use_cpu_initialization=True,
        add_bias_linear=False, ffn_hidden_size=16, moe_ffn_hidden_size=16, hidden_dropout=0.0, attention_dropout=0.0,
    )
    spec = locmoe_spec(get_gpt_layer_local_spec(num_experts=8), {"routing": "hash", "hash_seed": 5, "gpus_per_node": 1})
    model = GPTModel(cfg, spec, vocab_size=64, max_sequence_length=8)
    seen = []
    for layer in model.decoder.layers:
        # inside LocMoELayer the router routes through route_indices; dense_routing_map gives Megatron's map
        for target in mrouter.routing_hook_targets(layer.mlp.router):
            target.register_forward_hook(lambda m, args, o, r=layer.mlp.router: seen.append(
                (r, args[0].detach(), mrouter.dense_routing_map(o, 8))))
    input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 + rank))
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    handle = mrouter.attach_token_ids(model)
    model(input_ids, torch.arange(8).expand(2, 8), mask).sum().backward()  # trains without router grads
    out["cleared"] = token_ids._token_ids is None
    out["grads"] = all(p.grad is not None for p in model.decoder.layers[0].mlp.experts.parameters())
    out["maps"] = [o.tolist() for _, _, o in seen]
    # the same experts as the core router called with the ids in Megatron's [s, b] order, and as the hash
    out["core"] = [m.core(h, input_ids.t()).to_megatron()[1].tolist() for m, h, _ in seen]
    want = torch.zeros(16, 8, dtype=torch.bool).scatter_(1, hash_experts(input_ids.t().reshape(-1), 8, 2, 5), True)
    out["hash"] = want.tolist()
    out["cross_node"] = [float(m.last_stats.to_dict()["cross_node_share"]) for m, _, _ in seen]
    handle.remove()
    try:
        model(input_ids, torch.arange(8).expand(2, 8), mask)
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    parallel_state.destroy_model_parallel()

    # B: sequence parallelism with TP=2: the stored ids are this rank's shard, cut as the embedding cuts
    # the hidden states (torch LayerNorm refuses SP, so a stand-in module with GPTModel's attributes)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)

    class Stand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"sequence_parallel": True})()
            self.tp_group = parallel_state.get_tensor_model_parallel_group()

        def forward(self, input_ids, position_ids=None, attention_mask=None):
            emb = input_ids.t().unsqueeze(-1).float()  # [s, b, 1], as LanguageModelEmbedding's output
            local = tensor_parallel.scatter_to_sequence_parallel_region(emb, group=self.tp_group)
            return torch.equal(mrouter.current_token_ids(), local.squeeze(-1).long())

    stand = Stand()
    handle = mrouter.attach_token_ids(stand)
    ids = torch.arange(16).reshape(2, 8)
    out["sp"] = (stand(ids), stand(input_ids=ids), token_ids._token_ids)  # positional, keyword, cleared
    handle.remove()
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.multiproc
def test_megatron_pre_hook_gives_the_core_routers_experts():
    pytest.importorskip("megatron.core")
    from ._dist import run_workers

    for r in run_workers(_megatron_worker, 2):
        assert r["cleared"] and r["grads"]
        assert len(r["maps"]) == 2  # both MoE layers
        for routing_map, core in zip(r["maps"], r["core"]):
            assert routing_map == core == r["hash"]
        assert all(0 <= share <= 1 for share in r["cross_node"])
        assert "needs the token ids, and none are set" in r["error"]
        assert r["sp"] == (True, True, None)
