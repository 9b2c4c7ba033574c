"""LocMoELayer under the contract of Megatron's 1F1B all-to-all overlap (``overlap_moe_expert_parallel_comm``;
CPU, gloo, 4 ranks as 2 nodes x 2). That schedule runs the layer as separate nodes (route + preprocess, dispatch,
experts, combine) and frees the inputs of the dispatch, expert and combine nodes right after their forward.
Run phase by phase with those inputs freed, the layer with the flag set gives the outputs and gradients of the
layer run whole; without the copies the flag makes, the backward fails. (The schedule itself needs CUDA
streams: ``tests/gpu/megatron_1f1b.py`` trains the GPT with it on GPUs.)"""

import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from ._dist import run_workers  # noqa: E402
from .megatron_helpers import D, build_layer as _build, fwd_bwd as _fwd_bwd  # noqa: E402

pytestmark = pytest.mark.multiproc


def _free(*tensors):
    """What megatron-core's schedule node does to its inputs after its forward (``free_input``)."""
    for t in tensors:
        t.untyped_storage().resize_(0)


def _phases_freed(layer, x, cot):
    """The layer as the 1F1B schedule's nodes call it, each node's inputs freed after its forward."""
    x = x.clone().requires_grad_(True)
    h = x * 1.0  # stands for the pre-MLP layernorm's output: the router's and the dispatch's input
    probs, routing_map = layer.route(h)
    tokens, probs = layer.preprocess(h, probs, routing_map)
    dispatched, dispatched_probs = layer.dispatch(tokens, probs)
    _free(tokens, probs)  # moe_dispatch node
    expert_out, _ = layer.routed_experts_compute(dispatched, dispatched_probs)
    _free(dispatched)  # mlp node (the schedule keeps dispatched_probs in the layer's state)
    out = layer.combine(expert_out)
    _free(expert_out)  # moe_combine node
    out = layer.postprocess(out, None)
    (out * cot).sum().backward()
    return out.detach(), x.grad


def _worker(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    from locmoe_plugin.megatron.dispatcher import make_dispatcher_class, make_locmoe_layer_class

    LocMoELayer = make_locmoe_layer_class()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=4)
    out = {}
    for grouped in (False, True):
        torch.manual_seed(7)
        whole = _build(LocMoELayer, 1, 4, {"gpus_per_node": 2}, 2, grouped=grouped)
        phased = _build(LocMoELayer, 1, 4, {"gpus_per_node": 2}, 2, grouped=grouped)
        phased.load_state_dict(whole.state_dict())
        # the flag as Megatron-LM's --overlap-moe-expert-parallel-comm sets it (its other checks need bf16 on a GPU)
        phased.config.overlap_moe_expert_parallel_comm = True
        phased.token_dispatcher._copies_node_inputs = True
        torch.manual_seed(100 + rank)
        x = torch.randn(6 + rank, 2, D)
        cot = torch.randn_like(x)
        y, gx = _fwd_bwd(whole, x, cot)
        y2, gx2 = _phases_freed(phased, x, cot)
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(whole.named_parameters(), phased.parameters())]
        out[grouped] = {"y": torch.equal(y, y2), "x grad": torch.equal(gx, gx2),
                        "weight grads": [n for n, a, b in grads if not torch.equal(a, b)]}
        # without the copies: the router's or the experts' backward reads freed rows
        phased.token_dispatcher._copies_node_inputs = False
        try:
            _phases_freed(phased, x, cot)
            out[(grouped, "uncopied")] = "ran"
        except RuntimeError as exc:
            out[(grouped, "uncopied")] = str(exc)[:80]
    # the flag reaches the dispatcher from the layer's config
    torch.manual_seed(7)
    layer = _build(LocMoELayer, 1, 4, {"gpus_per_node": 2}, 2)
    cfg = copy.copy(layer.config)
    cfg.overlap_moe_expert_parallel_comm = True
    flagged = make_dispatcher_class()(layer.num_local_experts, layer.local_expert_indices, cfg,
                                      moe_utils.get_default_pg_collection(), layer.router.topology,
                                      layer.router.dispatcher_settings)
    out["flags"] = (layer.token_dispatcher._copies_node_inputs, flagged._copies_node_inputs)
    parallel_state.destroy_model_parallel()
    return out


def test_layer_phases_with_freed_node_inputs_match_the_whole_layer():
    for rank, res in enumerate(run_workers(_worker, 4)):
        assert res["flags"] == (False, True), rank
        for grouped in (False, True):
            assert res[grouped] == {"y": True, "x grad": True, "weight grads": []}, (rank, grouped, res[grouped])
            assert res[(grouped, "uncopied")] != "ran", (rank, grouped)
