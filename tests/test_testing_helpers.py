"""The public test helpers (locmoe_plugin.testing): spawning with a deadline, the fake group, the CPU shims."""

import time

import pytest
import torch

from locmoe_plugin import LocMoEConfig
from locmoe_plugin.telemetry import RoutingStats
from locmoe_plugin.testing import RanksDidNotFinish, fake_process_group, run_ranks

from ._dist import run_workers


def _case_worker(rank, world_size, case):
    import os

    import torch.distributed as dist

    if case == "stats":
        # RoutingStats.reduced() without a group sums over the default group
        st = RoutingStats(tokens_per_expert=torch.tensor([rank + 1, 0]), requested_per_expert=torch.tensor([rank + 1, 1]),
                          num_tokens=3, dropped_pairs=torch.tensor(1), cross_node_pairs=torch.tensor(rank))
        r = st.reduced()
        return dict(tpe=r.tokens_per_expert.tolist(), tokens=r.num_tokens, dropped=int(r.dropped_pairs),
                    cross=int(r.cross_node_pairs), gpn=os.environ.get("LOCMOE_GPUS_PER_NODE"),
                    world=dist.get_world_size())
    if case == "fail":
        if rank == 1:
            raise ValueError("rank one breaks")
        dist.barrier()  # rank 0 waits for a peer that never comes: killed after the grace period
        return "unreachable"
    if case == "hang":
        if rank == 1:
            time.sleep(600)
        return rank
    raise AssertionError(case)


@pytest.mark.multiproc
def test_run_ranks_results_errors_and_deadline():
    t0 = time.monotonic()
    res = run_ranks(_case_worker, 4, "stats", nodes=2, timeout=120)
    assert [r.ok for r in res] == [True] * 4
    v = res[2].value
    assert v["tpe"] == [1 + 2 + 3 + 4, 0] and v["tokens"] == 12 and v["dropped"] == 4 and v["cross"] == 6
    assert v["gpn"] == "2" and v["world"] == 4

    res = run_ranks(_case_worker, 2, "fail", timeout=120, grace_s=2)
    assert not res[1].ok and "rank one breaks" in res[1].error
    assert not res[0].ok  # its barrier fails (gloo sees the peer leave) or it is killed after the grace period
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_workers(_case_worker, 2, "fail", timeout=120)

    with pytest.raises(RanksDidNotFinish, match=r"rank\(s\) \[1\] of 2 did not finish within 8 s") as info:
        run_workers(_case_worker, 2, "hang", timeout=8)
    assert info.value.ranks == [1] and info.value.results[0].value == 0
    assert time.monotonic() - t0 < 100  # the hanging rank was killed, not waited for


def test_run_ranks_rejects_bad_layouts():
    with pytest.raises(ValueError, match="divisor"):
        run_ranks(_case_worker, 4, "stats", nodes=3)
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(_case_worker, 0)


def test_fake_group_builds_routers_for_64_ranks_on_8_nodes():
    cfg = LocMoEConfig(num_experts=128, hidden_size=256, routing="hybrid", locality_loss_coeff=0.01)  # the bias
    with fake_process_group(world_size=64, nodes=8, rank=19) as world:
        router = world.router(cfg)
        topo = router.topology
        assert (topo.ep_size, topo.num_nodes, topo.node, topo.experts_per_rank) == (64, 8, 2, 2)
        assert router.locality_bias.shape == (64, 128)
        out = router(torch.randn(32, 256))
        assert out.assignment.expert_ids.shape == (32, 2)
        with pytest.raises(RuntimeError, match="already exists"):
            with fake_process_group(world_size=2):
                pass
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="divide"):
        with fake_process_group(world_size=6, nodes=4):
            pass


@pytest.mark.multiproc
def test_fake_megatron_layer_when_a_peer_is_sent_nothing():
    """The fake group's all-gathers repeat this rank's counts, so a rank can be told that rows arrive from
    a peer it sends nothing to; the layer runs (the fake all-to-all receives zeros)."""
    pytest.importorskip("megatron.core")
    from locmoe_plugin.testing import fake_group, megatron_moe_layer
    from locmoe_plugin.testing.cpu_shims import megatron_cpu_shims

    local = {"routing": "hybrid", "gate": "grap", "locality_loss_coeff": 0.01, "resonance_mass": 0,
             "capacity_factor_min": 1.0}
    with fake_process_group(world_size=16, nodes=2), megatron_cpu_shims(), fake_group.megatron_parallel_state():
        layer = megatron_moe_layer(num_experts=32, hidden_size=64, locmoe=local)
        x = torch.randn(8, 2, 64)
        out, _ = layer.mlp(x)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_cpu_shims_context_restores_torch_cuda():
    pytest.importorskip("megatron.core")
    from locmoe_plugin.testing import cpu_shims

    if cpu_shims.installed():
        pytest.skip("the shims were installed for the whole process by an earlier test")
    before = (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.record_stream, torch.cuda.nvtx.range_push)
    with cpu_shims.megatron_cpu_shims():
        assert torch.cuda.current_device() == torch.device("cpu")
        with cpu_shims.megatron_cpu_shims():  # nesting: the inner exit keeps them
            pass
        assert torch.cuda.current_device() == torch.device("cpu")
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.record_stream,
            torch.cuda.nvtx.range_push) == before
