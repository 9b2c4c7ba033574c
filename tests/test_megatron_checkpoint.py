"""Checkpoints: a TopKRouter (dense gate) checkpoint loads into the LocMoE dense router and routes the
same; a LocMoE layer saves and loads through Megatron's distributed checkpointing; clear errors."""

import pytest
import torch

pytest.importorskip("megatron.core")

from ._dist import run_workers  # noqa: E402
from .megatron_helpers import build_layer as _build, fwd_bwd as _fwd_bwd  # noqa: E402

pytestmark = pytest.mark.multiproc


def _worker(rank, world, ckpt_dir):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class

    LocMoELayer = make_locmoe_layer_class()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    out = {}
    # 1. Megatron's own layer (TopKRouter) -> LocMoE layer with a dense gate and plain top-k routing
    torch.manual_seed(3)
    ref_layer = _build(MoELayer, 1, world, {}, 2)
    ref_layer.router = _topk_router(ref_layer)
    ckpt = ref_layer.state_dict()
    ours = _build(LocMoELayer, 1, world, {"gpus_per_node": 2, "gate": "dense", "routing": "topk",
                                           "aux_loss_coeff": 0.0, "expert_bias_rate": 1e-3}, 2)
    ours.load_state_dict(ckpt)
    torch.manual_seed(50 + rank)
    x = torch.randn(5, 2, 32)
    cot = torch.randn_like(x)
    out["topk_ref"] = _fwd_bwd(ref_layer, x, cot)[0]
    out["topk_ours"] = _fwd_bwd(ours, x, cot)[0]
    out["weights_equal"] = torch.equal(ours.router.core.gate.weight, ref_layer.router.weight)
    out["expert_bias_moved"] = bool(ours.router.core.expert_bias.abs().sum() > 0)  # from 0, after one forward
    # 2. the GrAP router refuses a learned gate with a message that names the fix
    grap = _build(LocMoELayer, 1, world, {"gpus_per_node": 2, "gate": "grap"}, 2)
    try:
        grap.load_state_dict(ckpt)
        out["grap_error"] = None
    except RuntimeError as exc:
        out["grap_error"] = str(exc)
    # 3. Megatron distributed checkpointing round trip, with the capacity state and the expert bias
    # GrAP: no gate weight (this worker seeds each rank differently, so a learned gate would start unlike
    # on the ranks, where Megatron's same seed on every rank makes it replicated)
    settings = {"gpus_per_node": 2, "capacity": "bound", "expert_bias_rate": 0.01, "gate": "grap"}
    layer = _build(LocMoELayer, 1, world, settings, 2)
    layer.train()
    _fwd_bwd(layer, x, cot)  # estimates delta / factor
    dist_checkpointing.save(layer.sharded_state_dict(), ckpt_dir)
    torch.manual_seed(1000)
    fresh = _build(LocMoELayer, 1, world, settings, 2)
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir)
    fresh.load_state_dict(loaded)
    out["ckpt_params_equal"] = all(torch.equal(a, b) for a, b in zip(layer.parameters(), fresh.parameters()))
    out["ckpt_expert_bias"] = (layer.router.core.expert_bias.clone(), fresh.router.core.expert_bias.clone())
    out["ckpt_capacity"] = (layer.router.core.capacity.state_dict(), fresh.router.core.capacity.state_dict())
    out["ckpt_out"] = (_fwd_bwd(layer.eval(), x, cot)[0], _fwd_bwd(fresh.eval(), x, cot)[0])
    parallel_state.destroy_model_parallel()
    return out


def _topk_router(layer):
    """Give a plain MoELayer Megatron's TopKRouter (the test builds layers with the LocMoE router)."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    r = TopKRouter(config=layer.config, pg_collection=moe_utils.get_default_pg_collection())
    r.set_layer_number(1)
    return r


def test_checkpoints(tmp_path):
    (tmp_path / "ckpt").mkdir()
    res = run_workers(_worker, 4, str(tmp_path / "ckpt"))
    for r in res:
        assert r["weights_equal"] and r["expert_bias_moved"]
        torch.testing.assert_close(r["topk_ours"], r["topk_ref"], rtol=1e-5, atol=1e-6)
        assert r["grap_error"] and "load it with --locmoe-gate dense" in r["grap_error"]
        assert r["ckpt_params_equal"]
        saved, restored = r["ckpt_capacity"]
        assert saved["factor"] is not None and restored == saved
        saved_bias, restored_bias = r["ckpt_expert_bias"]
        assert saved_bias.abs().sum() > 0 and torch.equal(saved_bias, restored_bias)
        assert torch.equal(*r["ckpt_out"])
