"""Every invalid configuration fails at construction with a message that names the fix."""

import pytest

from locmoe_plugin import ConfigError, LocMoEConfig, LocMoERouter, Topology, TopologyError

BASE = dict(num_experts=16, hidden_size=1024, topk=2)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=1000, gate="grap"), r"hidden_size 1000 is not divisible by num_experts 16: GrAP needs d % n == 0"),
        (dict(topk=17), r"topk=17 is larger than num_experts=16.*use topk <= 16"),
        (dict(topk=0), r"topk=0 must be an integer >= 1"),
        (dict(num_experts=0), r"num_experts=0 must be an integer >= 1"),
        (dict(gate="linear"), r"gate='linear' is not one of 'grap', 'dense'"),
        (dict(routing="expert_choice"), r"routing='expert_choice' is not one of 'topk', 'locmoe', 'hybrid'"),
        (dict(aux_loss_coeff=-0.1), r"aux_loss_coeff=-0.1 must be a finite number >= 0"),
        (dict(aux_loss_scope="dp"), r"aux_loss_scope='dp' is not one of 'ep_group', 'local'"),
        (dict(z_loss_coeff=float("nan")), r"z_loss_coeff=nan must be a finite number >= 0"),
        (dict(locality_loss_coeff=-1.0), r"locality_loss_coeff=-1.0 must be a finite number >= 0"),
        (dict(routing="topk", locality_loss_coeff=0.1), r"needs routing='locmoe' or 'hybrid'.*set locality_loss_coeff=0"),
        (dict(capacity="fixed"), r"capacity='fixed' is not one of 'none', 'factor', 'bound', 'adaptive'"),
        (dict(routing="hybrid", capacity="none"), r"routing='hybrid' \(LocMoE\+\) needs a capacity.*'factor', 'bound' or 'adaptive'"),
        (dict(capacity="factor"), r"capacity='factor' needs capacity_factor \(e.g. 1.25\)"),
        (dict(capacity="factor", capacity_factor=0.0), r"capacity_factor=0.0 must be > 0"),
        (dict(capacity="bound", capacity_factor=1.0), r"capacity_factor=1.0 is only used with capacity='factor'"),
        (dict(min_capacity=-1), r"min_capacity=-1 must be an integer >= 0"),
        (dict(capacity_factor_min=2.0, capacity_factor_max=1.0), r"must satisfy 0 < min <= max"),
        (dict(delta=1.5), r"delta=1.5 is outside \(0, 1\).*leave it None"),
        (dict(adaptive_interval=0), r"adaptive_interval=0 must be an integer >= 1"),
        (dict(drop_policy="random"), r"drop_policy='random' is not one of 'score', 'choice', 'position'"),
        (dict(max_nodes_per_token=0), r"max_nodes_per_token=0 must be an integer >= 1"),
        (dict(gpus_per_node=0), r"gpus_per_node=0 must be an integer >= 1"),
    ],
)
def test_invalid_config_messages(changes, message):
    with pytest.raises(ConfigError, match=message):
        LocMoEConfig(**{**BASE, **changes})


def test_defaults_resolve_per_routing_mode():
    # locmoe: the dense gate and the default cross-node budget (no locality loss unless asked for)
    assert LocMoEConfig(**BASE).gate == "dense" and LocMoEConfig(**BASE).cross_node_budget == 0.2
    assert LocMoEConfig(**BASE).locality_loss_coeff == 0.0
    assert LocMoEConfig(**BASE, locality_loss_coeff=None, cross_node_budget=None).cross_node_budget == 0.2
    mu = LocMoEConfig(**BASE, locality_loss_coeff=0.01)  # an explicit locality loss: no default budget
    assert mu.cross_node_budget is None and mu.locality_loss_coeff == 0.01
    assert LocMoEConfig(**BASE, routing="topk").locality_loss_coeff == 0.0
    assert LocMoEConfig(**BASE, routing="hybrid").capacity == "adaptive"
    assert LocMoEConfig(**BASE).capacity == "none"
    assert LocMoEConfig(**{**BASE, "hidden_size": 1000}, gate="dense").hidden_size == 1000  # dense has no d % n rule


def test_hybrid_defaults_to_the_measured_point():
    """LocMoE+: the dense gate, the cross-node budget 0.2 (selection margin, no locality loss or bias),
    adaptive capacity and the summed-affinity threshold 0.9."""
    cfg = LocMoEConfig(**BASE, routing="hybrid")
    assert (cfg.gate, cfg.cross_node_budget, cfg.budget_mechanism) == ("dense", 0.2, "selection")
    assert (cfg.locality_loss_coeff, cfg.locality_bias) == (0.0, False)
    assert (cfg.capacity, cfg.resonance_mass) == ("adaptive", 0.9)
    # resolved values survive replace / to_dict: a copy is the same config
    assert cfg.replace(topk=1).resonance_mass == 0.9 and LocMoEConfig.from_dict(cfg.to_dict()) == cfg
    # the local aux loss cannot read the budget's share: the learned locality loss instead
    local = LocMoEConfig(**BASE, routing="hybrid", aux_loss_scope="local")
    assert local.cross_node_budget is None and local.locality_loss_coeff == 0.01


def test_hybrid_explicit_settings_override_the_defaults():
    old = LocMoEConfig(**BASE, routing="hybrid", gate="grap", locality_loss_coeff=0.01, resonance_mass=0)
    assert (old.gate, old.cross_node_budget, old.budget_mechanism) == ("grap", None, None)
    assert (old.locality_loss_coeff, old.locality_bias, old.resonance_mass) == (0.01, True, 0)
    assert old.replace(topk=1).resonance_mass == 0  # off stays off through a copy
    assert LocMoEConfig(**BASE, routing="hybrid", cross_node_budget=0.1).cross_node_budget == 0.1
    assert LocMoEConfig(**BASE, routing="hybrid", resonance_mass=1.0).resonance_mass == 1.0
    # the other routings have no expert choice: no default threshold, 0 (off) accepted, a value refused
    assert LocMoEConfig(**BASE).resonance_mass is None
    assert LocMoEConfig(**BASE, routing="topk", resonance_mass=0).resonance_mass == 0
    assert LocMoEConfig(**BASE, routing="hash").gate == "grap"
    with pytest.raises(ConfigError, match=r"resonance_mass=0.9 is LocMoE\+'s .*set it to 0"):
        LocMoEConfig(**BASE, resonance_mass=0.9)
    with pytest.raises(ConfigError, match=r"resonance_mass=1.5 must be in \(0, 1\].*0 \(off\)"):
        LocMoEConfig(**BASE, routing="hybrid", resonance_mass=1.5)


def test_from_dict_rejects_unknown_keys_and_roundtrips():
    cfg = LocMoEConfig(**BASE, capacity="factor", capacity_factor=1.25)
    assert LocMoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown LocMoE option\(s\) \['top_k'\]"):
        LocMoEConfig.from_dict({**BASE, "top_k": 2})


def test_config_is_frozen():
    cfg = LocMoEConfig(**BASE)
    with pytest.raises(Exception):
        cfg.topk = 4


# ------------------------------------------------------------------------------------ topology
def test_topology_two_nodes_by_two():
    t = Topology.from_ranks_per_node(4, 2, 8, ep_rank=3)
    assert (t.num_nodes, t.ranks_per_node, t.experts_per_rank, t.experts_per_node) == (2, 2, 2, 4)
    assert t.node == 1 and t.local_index == 1
    assert t.ranks_of_node(1) == (2, 3)
    assert t.rail(0) == (0, 2) and t.rail(1) == (1, 3)
    assert t.experts_of_node(0) == (0, 1, 2, 3)
    assert t.expert_to_node.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.expert_to_rank.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert t.local_expert_mask().tolist() == [False] * 4 + [True] * 4


def test_topology_from_global_ranks_with_tensor_parallel_stride():
    # TP=2 on 2 nodes of 4 GPUs: EP group {0, 2, 4, 6} -> ranks 0,2 on node 0, 4,6 on node 1
    t = Topology.from_global_ranks([0, 2, 4, 6], gpus_per_node=4, num_experts=8)
    assert t.node_of_rank == (0, 0, 1, 1)
    # EP group inside one 8-GPU node
    assert Topology.from_global_ranks([1, 3, 5, 7], 8, 8).num_nodes == 1


def test_topology_interleaved_nodes():
    t = Topology(("hostA", "hostB", "hostA", "hostB"), num_experts=4, ep_rank=2)
    assert t.node_of_rank == (0, 1, 0, 1) and t.node == 0 and t.local_index == 1
    assert t.experts_of_node(1) == (1, 3)
    assert t.rail(1) == (2, 3)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Topology.from_ranks_per_node(4, 3, 8), r"ranks per node 3 does not divide the expert-parallel size 4"),
        (lambda: Topology.from_ranks_per_node(4, 2, 6), r"num_experts 6 is not divisible by the expert-parallel size 4"),
        (lambda: Topology((0, 0, 0, 1), 4), r"nodes hold different numbers of expert-parallel ranks \(\[3, 1\]\)"),
        (lambda: Topology((0, 1), 4, ep_rank=2), r"ep_rank 2 is outside"),
        (lambda: Topology.from_global_ranks([0, 1], 0, 2), r"gpus_per_node=0 must be >= 1"),
    ],
)
def test_topology_errors(build, message):
    with pytest.raises(TopologyError, match=message):
        build()


def test_router_checks_config_against_topology():
    topo = Topology.from_ranks_per_node(4, 2, 16)
    with pytest.raises(ConfigError, match=r"max_nodes_per_token=3 exceeds the 2 node\(s\)"):
        LocMoERouter(LocMoEConfig(**BASE, max_nodes_per_token=3), topo)
    with pytest.raises(ConfigError, match=r"topk=10 cannot fit on max_nodes_per_token=1 node\(s\) of 8 experts"):
        LocMoERouter(LocMoEConfig(**{**BASE, "topk": 10}, max_nodes_per_token=1), topo)
    with pytest.raises(ConfigError, match=r"topology was built for 8 experts"):
        LocMoERouter(LocMoEConfig(**BASE), Topology.from_ranks_per_node(4, 2, 8))


def test_detect_uses_local_world_size(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        t = Topology.detect(dist.group.WORLD, num_experts=4)
        assert t.ep_size == 1 and t.num_nodes == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert Topology.detect(dist.group.WORLD, num_experts=4).num_nodes == 1  # via host names
    finally:
        dist.destroy_process_group()


def test_replace_resolves_defaulted_fields_again():
    hybrid = LocMoEConfig(num_experts=8, hidden_size=32, routing="hybrid")
    assert (hybrid.resonance_mass, hybrid.cross_node_budget, hybrid.capacity) == (0.9, 0.2, "adaptive")
    # the hybrid defaults do not follow the config to another routing (a fresh construction's result)
    plain = hybrid.replace(routing="locmoe")
    assert plain == LocMoEConfig(num_experts=8, hidden_size=32, routing="locmoe")
    assert (plain.resonance_mass, plain.capacity) == (None, "none")
    # giving the locality loss drops the default budget, as at construction
    learned = hybrid.replace(locality_loss_coeff=0.01)
    assert learned.cross_node_budget is None and learned.locality_bias is True
    # explicit values stay
    off = LocMoEConfig(num_experts=8, hidden_size=32, routing="hybrid", resonance_mass=0).replace(topk=1)
    assert off.resonance_mass == 0
    with pytest.raises(ConfigError, match="resonance_mass"):
        LocMoEConfig(num_experts=8, hidden_size=32, routing="hybrid", resonance_mass=0.5).replace(routing="locmoe")
