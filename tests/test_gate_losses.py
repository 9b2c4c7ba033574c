"""Gates and losses: hand-worked values and the properties REFERENCE.md asks for."""

import math

import pytest
import torch

from locmoe_plugin.gate import DenseGate, GrAPGate, cosine_affinity, grap_weight
from locmoe_plugin.losses import locality_loss, switch_aux_loss, z_loss


def test_grap_is_group_means_and_weights_orthogonal():
    x = torch.tensor([[1.0, 3.0, -2.0, 2.0, 0.0, 6.0], [0.5, 0.5, 1.0, 1.0, -1.0, -3.0]])
    gate = GrAPGate(6, 3)
    # groups of 2 features: means by hand
    expected = torch.tensor([[2.0, 0.0, 3.0], [0.5, 1.0, -2.0]])
    torch.testing.assert_close(gate(x), expected)
    w = grap_weight(6, 3)
    torch.testing.assert_close(x @ w.t(), expected)
    gram = w @ w.t()
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)))  # orthogonal rows
    assert list(gate.parameters()) == []


def test_grap_affinity_is_cosine_with_grap_weights():
    torch.manual_seed(0)
    x = torch.randn(32, 64, dtype=torch.float64)
    gate = GrAPGate(64, 8)
    torch.testing.assert_close(gate.affinity(x), cosine_affinity(x, grap_weight(64, 8, torch.float64)))
    # hand value: x = e_0 (first feature only), group 0 of 8 features: cos = (1/8)/(1*sqrt(1/8)) = sqrt(1/8)
    e0 = torch.zeros(1, 64)
    e0[0, 0] = 1.0
    assert gate.affinity(e0)[0, 0].item() == pytest.approx(math.sqrt(1 / 8))


def test_zero_norm_tokens_give_no_nan():
    x = torch.zeros(4, 16)
    for gate in (GrAPGate(16, 4), DenseGate(16, 4)):
        aff = gate.affinity(x)
        assert torch.isfinite(aff).all() and (aff == 0).all()
    zero_rows = DenseGate(16, 4, init_method=torch.nn.init.zeros_)
    assert torch.isfinite(zero_rows.affinity(torch.randn(3, 16))).all()


def test_dense_gate_uses_init_method_and_is_fp32():
    g = DenseGate(8, 4, init_method=lambda w: torch.nn.init.constant_(w, 0.5))
    assert (g.weight == 0.5).all()
    assert g(torch.ones(2, 8, dtype=torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(g(torch.ones(2, 8)), torch.full((2, 4), 4.0))


def test_switch_aux_loss_hand_value_and_balance_minimum():
    # 2 experts, 2 tokens, k=1: both tokens to expert 0; probs rows (0.75, 0.25), (0.25, 0.75)
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]], requires_grad=True)
    counts = torch.tensor([2, 0])
    loss = switch_aux_loss(probs, counts, 2, coeff=0.01)
    # f = (1, 0), P = (0.5, 0.5): 0.01 * 2 * (1*0.5) = 0.01
    assert loss.item() == pytest.approx(0.01)
    loss.backward()
    # d/dprobs[t, 0] = 0.01 * 2 * f_0 / s = 0.01
    torch.testing.assert_close(probs.grad, torch.tensor([[0.01, 0.0], [0.01, 0.0]]))
    balanced = switch_aux_loss(torch.full((4, 4), 0.25), torch.tensor([1, 1, 1, 1]), 4, 0.01)
    assert balanced.item() == pytest.approx(0.01)


def test_locality_loss_hand_value():
    # 4 experts, experts 0,1 local. logits 0 -> uniform: local mass 1/2 -> loss = log 2
    logits = torch.zeros(3, 4)
    mask = torch.tensor([True, True, False, False])
    assert locality_loss(logits, mask, 1.0).item() == pytest.approx(math.log(2))
    # local mass p: logits (a, a, 0, 0) -> m = 2e^a/(2e^a+2) ; check a = log 3 -> m = 3/4
    logits = torch.tensor([[math.log(3), math.log(3), 0.0, 0.0]])
    assert locality_loss(logits, mask, 0.5).item() == pytest.approx(0.5 * -math.log(0.75))


def test_locality_loss_finite_differentiable_and_minimal_when_local():
    mask = torch.tensor([True, True, False, False, False, False])
    torch.manual_seed(0)
    logits = torch.randn(16, 6, requires_grad=True)
    loss = locality_loss(logits, mask, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # gradient pushes local logits up and remote logits down
    assert (logits.grad[:, :2] < 0).all() and (logits.grad[:, 2:] > 0).all()
    # extreme logits stay finite (no log(0))
    far = torch.tensor([[-1e4, -1e4, 1e4, 1e4, 1e4, 1e4]])
    assert torch.isfinite(locality_loss(far, mask, 1.0))
    # all mass on own-node experts (uniform or not) -> ~0, the minimum; any remote mass -> larger
    local_only = torch.tensor([[30.0, 10.0, -30.0, -30.0, -30.0, -30.0], [5.0, 5.0, -40.0, -40.0, -40.0, -40.0]])
    assert locality_loss(local_only, mask, 1.0).item() < 1e-7
    for _ in range(20):
        other = torch.randn(2, 6) * 3
        assert locality_loss(other, mask, 1.0) > locality_loss(local_only, mask, 1.0)


def test_locality_loss_has_no_effect_on_single_node():
    logits = torch.randn(8, 4, requires_grad=True)
    loss = locality_loss(logits, torch.ones(4, dtype=torch.bool), 0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


def test_z_loss_hand_value():
    logits = torch.zeros(2, 4)  # logsumexp = log 4
    assert z_loss(logits, 0.1).item() == pytest.approx(0.1 * math.log(4) ** 2)


def test_losses_on_empty_batch_are_zero_not_nan():
    e = torch.zeros(0, 4, requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    for loss in (switch_aux_loss(torch.softmax(e, -1), torch.zeros(4), 0, 0.01), locality_loss(e, mask, 0.1), z_loss(e, 0.1)):
        assert loss.item() == 0.0
