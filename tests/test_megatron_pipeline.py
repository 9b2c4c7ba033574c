"""LocMoE layers under Megatron's pipeline schedule (CPU, gloo, 4 ranks: PP=2 x EP=2, each EP group split
into 2 nodes): a GPT whose MoE layers are LocMoE layers trains through
``forward_backward_pipelining_without_interleaving`` with 4 micro-batches; the LocMoE dispatcher moves
tokens on both stages and the router losses (MoEAuxLossAutoScaler) reach the locality bias on both."""

import pytest
import torch

pytest.importorskip("megatron.core")

from ._dist import run_workers  # noqa: E402

pytestmark = pytest.mark.multiproc

SEQ, MBS, MICRO = 16, 2, 4


def _worker(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.demo import cpu_shims
    from locmoe_plugin.megatron.spec import count_locmoe_layers, locmoe_spec

    cpu_shims.install()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32, moe_ffn_hidden_size=32,
        num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_token_dispatcher_type="alltoall",
        pipeline_model_parallel_size=2, expert_model_parallel_size=2, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    spec = locmoe_spec(get_gpt_layer_local_spec(num_experts=4), {"gpus_per_node": 1, "locality_loss_coeff": 0.1})
    assert count_locmoe_layers(spec) == 1
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(cfg, spec, vocab_size=64, max_sequence_length=SEQ, pre_process=first, post_process=last)
    layers = [m for n, m in model.named_modules() if type(m).__name__ == "LocMoELayer"]
    assert len(layers) == 1  # one transformer layer per stage
    for layer in layers:
        layer.token_dispatcher.traffic.reset()
    g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    batches = iter([torch.randint(0, 64, (MBS, SEQ + 1), generator=g) for _ in range(MICRO)])
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        tokens, labels = data[:, :-1], data[:, 1:]
        pos = torch.arange(SEQ).expand(MBS, SEQ)
        out = model(tokens, pos, mask, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=MICRO,
        seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    result = {
        "last": last,
        "losses": [float(x["lm loss"]) for x in losses] if last else [],
        "dispatched": [layer.token_dispatcher.traffic.calls for layer in layers],
        "bias_grad": [float(layer.router.core.locality_bias.grad.abs().sum()) for layer in layers],
        "expert_grad": [float(sum(p.grad.abs().sum() for p in layer.experts.parameters())) for layer in layers],
    }
    ps.destroy_model_parallel()
    dist.barrier()
    return result


def test_locmoe_layers_train_under_the_pipeline_schedule():
    results = run_workers(_worker, 4)
    for r in results:
        assert r["dispatched"] == [MICRO]  # the LocMoE dispatcher ran once per micro-batch on every stage
        assert all(g > 0 for g in r["bias_grad"])  # router losses flowed back through the schedule
        assert all(g > 0 for g in r["expert_grad"])
    last = [r for r in results if r["last"]]
    assert len(last) == 2
    for r in last:
        assert len(r["losses"]) == MICRO
        # the schedule scales each micro-batch's loss by 1 / num_microbatches: ln 64 = 4.16 at initialisation
        assert all(4.0 < x * MICRO < 4.4 for x in r["losses"])
