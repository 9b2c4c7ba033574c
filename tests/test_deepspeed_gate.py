"""LocMoEGate against DeepSpeed's TopKGate (dense gate, same weights, dropless, randomness off)."""

import pytest
import torch

pytest.importorskip("deepspeed")

D, E, S = 32, 8, 40


def _pair(k):
    from deepspeed.moe.sharded_moe import TopKGate

    from locmoe_plugin.deepspeed import LocMoEGate

    torch.manual_seed(0)
    ds = TopKGate(D, E, k=k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                  use_rts=False, top2_2nd_expert_sampling=False)
    ours = LocMoEGate(D, E, k=k, locmoe={"gate": "dense", "routing": "topk", "renormalize": k > 1,
                                         "aux_loss_coeff": 1.0, "aux_loss_scope": "local"})
    with torch.no_grad():
        ours.router.gate.weight.copy_(ds.wg.weight)
    return ds, ours


@pytest.mark.parametrize("k", [1, 2, 4])
def test_same_experts_and_weights_as_topkgate(k):
    ds, ours = _pair(k)
    x = torch.randn(S, D)
    l_ds, c_ds, e_ds, idx_ds, loc_ds, g_ds, cnt_ds = ds(x, None, True, False)
    l_us, c_us, e_us, idx_us, loc_us, g_us, cnt_us = ours(x, None, True, False)
    assert e_ds == e_us == E
    assert torch.equal(idx_us, idx_ds)  # [k, s] expert per slot, same order
    torch.testing.assert_close(g_us, g_ds, rtol=1e-6, atol=1e-7)
    assert int(c_us) == int(c_ds)
    if k != 2:  # TopKGate's k=2 counts and aux loss use first choices only (documented difference)
        assert torch.equal(cnt_us, cnt_ds.to(cnt_us.dtype))
        torch.testing.assert_close(l_us, l_ds, rtol=1e-5, atol=1e-7)
    # locations: unique per expert and inside the capacity
    for e in range(E):
        locs = loc_us[idx_us == e]
        assert len(set(locs.tolist())) == len(locs) and (locs < int(c_us)).all()


@pytest.mark.parametrize("k", [1, 2])
def test_dense_form_matches_sparse_form(k):
    _, ours = _pair(k)
    x = torch.randn(S, D)
    _, cap, _, idx, loc, gates, _ = ours(x, None, True, False)
    _, combine, mask, _ = ours(x)
    assert combine.shape == (S, E, int(cap)) and mask.dtype == torch.bool
    for j in range(k):
        for t in range(S):
            assert combine[t, idx[j, t], loc[j, t]] == gates[j, t]
    assert int(mask.sum()) == S * k


def test_gate_inside_deepspeed_moelayer_single_rank():
    """Plugged into DeepSpeed's own MOELayer (ep_size 1): output = weighted expert outputs."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.sharded_moe import MOELayer

    from locmoe_plugin.deepspeed import LocMoEGate

    torch.manual_seed(1)
    expert = torch.nn.Linear(D, D, bias=False)
    experts = Experts(expert, E, "ep_size_1")
    gate = LocMoEGate(D, E, k=2, locmoe={"routing": "locmoe"})
    layer = MOELayer(gate, experts, "ep_size_1", 1, E)
    x = torch.randn(6, 4, D)
    y = layer(x, None)
    out = gate.router(x.reshape(-1, D))
    probs, _ = out.to_megatron()
    ref = sum(probs[:, e : e + 1] * experts.deepspeed_experts[e](x.reshape(-1, D)) for e in range(E))
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-6)
