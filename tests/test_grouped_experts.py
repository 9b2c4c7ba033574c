"""Grouped expert MLPs: the grouped GEMM form against a loop over experts (CPU, bit for bit), and
``LocMoEGroupedMLP`` against megatron-core's ``SequentialMLP`` inside Megatron's and LocMoE's layers
(2 gloo ranks): outputs, input and weight gradients, checkpoints, the spec swap, refusals."""

import functools

import pytest
import torch
import torch.nn.functional as F

from locmoe_plugin import grouped_experts
from locmoe_plugin.grouped_experts import _loop, expert_mlp, group_offsets


def _swiglu(h):
    a, b = torch.chunk(h, 2, dim=-1)
    return F.silu(a) * b


def _grads_of(fn, inputs, cot):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.backward(cot)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_probs", [False, True])
def test_grouped_equals_loop_bitwise(gated, with_probs):
    torch.manual_seed(0)
    e, h, f = 4, 32, 16
    counts = [5, 0, 7, 3]  # an expert without rows
    n = sum(counts)
    rows = torch.randn(n, h, requires_grad=True)
    fc1 = torch.randn(e, 2 * f if gated else f, h, requires_grad=True)
    fc2 = torch.randn(e, h, f, requires_grad=True)
    probs = torch.rand(n, requires_grad=True) if with_probs else None
    act = _swiglu if gated else F.gelu
    cot = torch.randn(n, h)
    inputs = [rows, fc1, fc2] + ([probs] if with_probs else [])

    def run(fn, tokens):
        def call(r, w1, w2, *p):
            return fn(r, tokens, w1, w2, act, p[0] if p else None)
        return _grads_of(call, inputs, cot)

    ref_out, ref_grads = run(_loop, counts)
    for tokens in (counts, torch.tensor(counts)):  # host ints or a count tensor
        out, grads = run(expert_mlp, tokens)
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    # a wrong order of rows per expert is seen: the comparison can fail
    out, _ = run(expert_mlp, [7, 0, 5, 3])
    assert not torch.equal(out, ref_out)
    # and the grouped path ran (not the loop fallback)
    assert grouped_experts.grouped_mm(rows.device) is not None and grouped_experts._aligned(rows, fc1, fc2)


def test_no_rows_and_odd_sizes_fall_back_to_the_loop():
    torch.manual_seed(1)
    fc1, fc2 = torch.randn(3, 8, 6, requires_grad=True), torch.randn(3, 6, 8, requires_grad=True)
    empty = torch.randn(0, 6, requires_grad=True)
    out = expert_mlp(empty, torch.zeros(3, dtype=torch.long), fc1, fc2, F.gelu)
    assert out.shape == (0, 6)
    out.sum().backward()  # torch's grouped_mm cannot run a backward without rows; the loop can
    assert fc1.grad is not None and not fc1.grad.any()
    rows = torch.randn(5, 6)  # 6 fp32 = 24 bytes: not the 16-byte rows grouped_mm needs
    assert not grouped_experts._aligned(rows, fc1, fc2)
    torch.testing.assert_close(expert_mlp(rows, [2, 0, 3], fc1, fc2, F.gelu), _loop(rows, [2, 0, 3], fc1, fc2, F.gelu, None),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected rows \[n, H\]"):
        expert_mlp(torch.randn(5, 7), [5, 0, 0], fc1, fc2, F.gelu)


def test_a_device_without_grouped_mm_loops_over_experts(monkeypatch):
    """Ascend NPU: the device module offers no grouped matmul; the same math runs as a loop (bit for bit)."""
    torch.manual_seed(3)
    rows, fc1, fc2 = torch.randn(9, 16), torch.randn(3, 8, 16), torch.randn(3, 16, 8)
    grouped = expert_mlp(rows, [4, 0, 5], fc1, fc2, F.silu)
    calls = []
    monkeypatch.setattr(grouped_experts, "grouped_mm", lambda device: calls.append(device.type))  # returns None
    looped = expert_mlp(rows, [4, 0, 5], fc1, fc2, F.silu)
    assert calls == ["cpu"] and torch.equal(grouped, looped)


def test_group_offsets():
    assert group_offsets([3, 0, 4], torch.device("cpu")).tolist() == [3, 3, 7]
    offs = group_offsets(torch.tensor([1, 2]), torch.device("cpu"))
    assert offs.dtype == torch.int32 and offs.tolist() == [1, 3]


def test_npu_has_no_grouped_mm():
    from locmoe_plugin.device import grouped_mm

    assert grouped_mm(torch.device("meta")) is None  # neither CUDA nor CPU: callers loop over experts
    assert grouped_mm(torch.device("cpu")) is not None


# ---------------------------------------------------------------------------------------------- Megatron
megatron = pytest.importorskip("megatron.core")


def _layer_worker(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class
    from locmoe_plugin.megatron.grouped_mlp import make_grouped_mlp_class

    from .megatron_helpers import D, build_layer, fwd_bwd

    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    out = {}
    for cls in (MoELayer, make_locmoe_layer_class()):
        for gated in (False, True):
            extra = dict(gated_linear_unit=True, activation_func=F.silu) if gated else {}
            locmoe = {"gpus_per_node": world}
            torch.manual_seed(5)
            seq = build_layer(cls, 1, world, locmoe, 2, **extra)
            grouped = build_layer(cls, 1, world, locmoe, 2, grouped=True, **extra)
            assert type(grouped.experts) is make_grouped_mlp_class()
            grouped.load_state_dict(seq.state_dict())  # the same checkpoint
            torch.manual_seed(20 + rank)
            x = torch.randn(6 + rank, 2, D)
            cot = torch.randn_like(x)
            res = {}
            for name, layer in (("seq", seq), ("grouped", grouped)):
                layer.zero_grad(set_to_none=True)
                y, gx = fwd_bwd(layer, x, cot)
                res[name] = (y, gx, [p.grad.clone() for p in layer.experts.parameters()])
            res["keys"] = (sorted(seq.state_dict()), sorted(grouped.state_dict()),
                           sorted(seq.sharded_state_dict()), sorted(grouped.sharded_state_dict()))
            out[(cls.__name__, gated)] = res
    # "auto" with a config the grouped form does not run (expert bias): SequentialMLP's loop, same results
    torch.manual_seed(6)
    seq = build_layer(MoELayer, 1, world, {"gpus_per_node": world}, 2, add_bias_linear=True)
    auto = build_layer(MoELayer, 1, world, {"gpus_per_node": world}, 2, grouped="auto", add_bias_linear=True)
    auto.load_state_dict(seq.state_dict())
    x = torch.randn(5, 2, D)
    out["auto_with_bias"] = (auto.experts.grouped, torch.equal(fwd_bwd(seq, x, x)[0], fwd_bwd(auto, x, x)[0]))
    try:
        build_layer(MoELayer, 1, world, {"gpus_per_node": world}, 2, grouped="on", add_bias_linear=True)
        out["on_with_bias"] = None
    except Exception as exc:  # noqa: BLE001 - the message is the result
        out["on_with_bias"] = str(exc)
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.multiproc
def test_grouped_mlp_matches_sequential_mlp_in_megatron_and_locmoe_layers():
    from ._dist import run_workers

    for res in run_workers(_layer_worker, 2):
        assert res.pop("auto_with_bias") == (False, True)
        assert "--disable-bias-linear" in res.pop("on_with_bias")
        assert len(res) == 4
        for case, r in res.items():
            y, gx, gw = r["seq"]
            y2, gx2, gw2 = r["grouped"]
            assert torch.equal(y, y2) and torch.equal(gx, gx2), case
            assert len(gw) == len(gw2) > 0 and all(torch.equal(a, b) for a, b in zip(gw, gw2)), case
            state, state2, sharded, sharded2 = r["keys"]
            assert state == state2 and sharded == sharded2, case


def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=4, add_bias_linear=False,
                ffn_hidden_size=16, use_cpu_initialization=True)
    return TransformerConfig(**{**base, **kw})


def test_refusals_name_the_fix():
    from locmoe_plugin.config import ConfigError
    from locmoe_plugin.megatron.grouped_mlp import check_grouped_experts

    check_grouped_experts(_config())
    with pytest.raises(ConfigError, match="--disable-bias-linear"):
        check_grouped_experts(_config(add_bias_linear=True))
    with pytest.raises(ConfigError, match="--expert-tensor-parallel-size 1"):
        check_grouped_experts(_config(expert_tensor_parallel_size=2))


def test_spec_swap_both_forms():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from locmoe_plugin.megatron.grouped_mlp import make_grouped_mlp_class, with_grouped_experts
    from locmoe_plugin.megatron.spec import locmoe_spec

    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    grouped = make_grouped_mlp_class()
    as_spec = MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=mlp))  # megatron-core 0.16
    as_partial = MoESubmodules(experts=functools.partial(SequentialMLP, submodules=mlp))  # 0.19
    assert with_grouped_experts(as_spec).experts.module is grouped
    assert with_grouped_experts(as_partial).experts.func is grouped
    other = MoESubmodules(experts=ModuleSpec(module=torch.nn.Identity))
    assert with_grouped_experts(other) is other  # TEGroupedMLP and others are kept
    assert with_grouped_experts(as_spec, "off") is as_spec
    layer_spec = ModuleSpec(module=MoELayer, submodules=as_spec)
    default = locmoe_spec(layer_spec, {}).submodules.experts  # "auto"
    assert default.module is grouped and default.params["grouped"] == "auto"
    assert locmoe_spec(layer_spec, {}, grouped_experts="on").submodules.experts.params["grouped"] == "on"
    assert locmoe_spec(layer_spec, {}, grouped_experts="off").submodules.experts.module is SequentialMLP
    swapped = locmoe_spec(functools.partial(MoELayer, submodules=as_partial), {}, grouped_experts="on")
    assert swapped.keywords["submodules"].experts.func is grouped
    from locmoe_plugin.config import ConfigError

    with pytest.raises(ConfigError, match="expected one of auto, on, off"):
        locmoe_spec(layer_spec, {}, grouped_experts=True)


def test_megatron_flag():
    import argparse

    from locmoe_plugin.megatron.args import add_arguments, grouped_experts_from_args

    parser = add_arguments(argparse.ArgumentParser())
    assert grouped_experts_from_args(parser.parse_args(["--locmoe-grouped-experts", "off"])) == "off"
    assert grouped_experts_from_args(parser.parse_args([])) == "auto"
    assert grouped_experts_from_args(argparse.Namespace()) == "auto"
