"""Four gloo ranks that disagree or meet bad batches: every case ends in the same clear error on every
rank, or in equal state, never in a hang. Each spawn has a deadline (``run_workers(timeout=...)``), so a
hang fails the test; all cases share two spawns (core only, no Megatron / DeepSpeed imports)."""

from __future__ import annotations

import os
import time
import warnings

import pytest

from tests._dist import run_workers

pytestmark = pytest.mark.multiproc

WORLD = 4


def _outcome(fn):
    """``("ok", value)`` or ``("error", type name, message)``; the process group stays usable because every
    rank takes the same branch."""
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the case's outcome is the test's subject
        return ("error", type(exc).__name__, str(exc))


def _disagreement_cases(rank, world):
    import torch
    import torch.distributed as dist

    from locmoe_plugin.comm.groups import build_comm_groups
    from locmoe_plugin.comm.settings import DispatcherSettings
    from locmoe_plugin.config import LocMoEConfig
    from locmoe_plugin.router import LocMoERouter
    from locmoe_plugin.topology import Topology

    W = dist.group.WORLD
    last = rank == world - 1

    def route(dtype=torch.float32, hidden=64, **kw):
        cfg = dict(num_experts=8, hidden_size=64, topk=2, routing="locmoe")
        cfg.update(kw)
        r = LocMoERouter(LocMoEConfig(**cfg), Topology.from_ranks_per_node(world, 2, cfg["num_experts"], rank), W)
        return int(r(torch.randn(16, hidden, dtype=dtype)).stats.tokens_per_expert.sum())

    cases = {
        "agree": lambda: route(),
        "topk": lambda: route(topk=1 if last else 2),
        "aux_loss_scope": lambda: route(aux_loss_scope="local" if last else "ep_group"),
        "num_experts": lambda: route(num_experts=16 if last else 8),
        "capacity": lambda: route(capacity="factor" if last else None, capacity_factor=1.0 if last else None),
        "dtype": lambda: route(dtype=torch.bfloat16 if last else torch.float32),
        "hidden": lambda: route(hidden=128 if last else 64),
        "gpus_per_node (topology)": lambda: Topology.for_group(W, 8, 1 if last else 2).num_nodes,
        "gpus_per_node (dispatcher groups)": lambda: build_comm_groups(
            Topology.from_ranks_per_node(world, 4 if last else 2, 8, rank), W).topology.num_nodes,
        # whether the allgather mode gathers the routing without a count exchange (it sizes the gather)
        "equal_tokens": lambda: Topology.for_group(W, 8, 4, settings=DispatcherSettings(
            mode="allgather", equal_tokens=not last).agreement()).num_nodes,
    }
    os.environ["LOCMOE_GPUS_PER_NODE"] = "1" if rank == 0 else "2"
    cases["LOCMOE_GPUS_PER_NODE"] = lambda: Topology.for_group(W, 8).num_nodes
    out = {}
    for name, fn in cases.items():
        out[name] = _outcome(fn)
    del os.environ["LOCMOE_GPUS_PER_NODE"]
    return out


def _bad_batch_cases(rank, world):
    import torch
    import torch.distributed as dist

    from locmoe_plugin.config import LocMoEConfig
    from locmoe_plugin.router import LocMoERouter
    from locmoe_plugin.topology import Topology

    W = dist.group.WORLD
    warnings.simplefilter("ignore")

    def router(**kw):
        torch.manual_seed(0)
        cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, routing="hybrid", adaptive_interval=1, **kw)
        return LocMoERouter(cfg, Topology.from_ranks_per_node(world, 2, 8, rank), W).train()

    def batch(step, r=rank, s=32):
        g = torch.Generator().manual_seed(1000 * step + r)
        return torch.randn(s, 64, generator=g) + torch.linspace(-1, 1, 64)

    out = {}
    # an empty rank does not bias delta: the token-weighted mean over ranks equals the pooled tokens' mean
    r = router(capacity="bound")
    r(batch(0) if rank else torch.zeros(0, 64))
    pooled = torch.cat([batch(0, q) for q in range(1, world)])
    expected = float(r.gate.affinity(pooled, r.gate(pooled)).max(-1).values.mean())
    out["empty rank delta"] = (r.capacity.delta, expected)
    # every rank's first batch empty / padding, then NaN on one rank mid-run: the same state as a clean run
    clean, dirty = router(capacity="adaptive"), router(capacity="adaptive")
    for step in range(5):
        if step == 0:
            dirty(torch.zeros(0, 64) if rank % 2 else torch.zeros(32, 64))
        if step == 2:
            dirty(torch.full((32, 64), float("nan")) if rank == 1 else batch(99))
        clean(batch(step))
        dirty(batch(step))
    out["adaptive after bad batches"] = [(c.capacity.delta, c.capacity.factor) for c in (clean, dirty)]
    out["deferred"] = dirty.capacity.skipped
    return out


def test_disagreeing_ranks_fail_together_naming_the_setting():
    t0 = time.time()
    results = run_workers(_disagreement_cases, WORLD, timeout=150)
    expect = {
        "topk": "topk: rank 0: 2, rank 1: 2, rank 2: 2, rank 3: 1",
        "aux_loss_scope": "aux_loss_scope: rank 0: 'ep_group'",
        "num_experts": "num_experts: rank 0: 8",
        "capacity": "capacity: rank 0: 'none', rank 1: 'none', rank 2: 'none', rank 3: 'factor'",
        "dtype": "input dtype: rank 0: 'torch.float32', rank 1: 'torch.float32', rank 2: 'torch.float32', "
                 "rank 3: 'torch.bfloat16'",
        "hidden": "input last dimension: rank 0: 64",
        "gpus_per_node (topology)": "gpus_per_node: rank 0: '2', rank 1: '2', rank 2: '2', rank 3: '1'",
        "gpus_per_node (dispatcher groups)": "ranks per node (gpus_per_node): rank 0: 2",
        "LOCMOE_GPUS_PER_NODE": "gpus_per_node: rank 0: '1', rank 1: '2'",
        "equal_tokens": "equal_tokens: rank 0: True, rank 1: True, rank 2: True, rank 3: False",
    }
    for rank_out in results:
        assert rank_out["agree"] == ("ok", 32)
        for case, text in expect.items():
            status, kind, message = rank_out[case]
            assert (status, kind) == ("error", "DisagreementError"), (case, rank_out[case])
            assert text in message, (case, message)
    for case in expect:  # the same error on every rank
        assert len({r[case] for r in results}) == 1, case
    assert time.time() - t0 < 150


def test_bad_batches_on_some_ranks_leave_the_capacity_of_a_clean_run():
    results = run_workers(_bad_batch_cases, WORLD, timeout=120)
    for out in results:
        got, expected = out["empty rank delta"]
        assert got == pytest.approx(expected, rel=1e-5)
        clean, dirty = out["adaptive after bad batches"]
        assert dirty == clean and all(v is not None for v in clean)
        assert out["deferred"] == 1  # the empty / padding first batches (the NaN rank: left out, others count)
    assert len({str(o) for o in results}) == 1


def _hang(rank, world):
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))  # the other rank never joins
    return rank


def test_run_workers_kills_a_hang_at_the_deadline():
    """Rank 0 waits in a collective rank 1 never joins: the spawn ends by the deadline (killed, or the
    collective's own timeout, which the helper sets to the deadline) and names rank 0; it does not hang."""
    from locmoe_plugin.testing import RanksDidNotFinish

    t0 = time.time()
    with pytest.raises((RanksDidNotFinish, AssertionError), match=r"rank\(?s?\)? \[?0"):
        run_workers(_hang, 2, timeout=15)
    assert time.time() - t0 < 40
