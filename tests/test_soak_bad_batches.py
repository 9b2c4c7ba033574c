"""Soak: a few hundred training steps with NaN, empty and all-padding batches interleaved end in the same
capacity, drops, losses and parameters as the same run without them (CPU, one process).

The training loop does what a framework's loss scaler does: it skips the optimizer step of a batch whose
loss is not finite. Padding is marked as such (``valid``), as Megatron's ``padding_mask`` marks it."""

from __future__ import annotations

import warnings

import pytest
import torch

from locmoe_plugin.config import LocMoEConfig
from locmoe_plugin.router import LocMoERouter

N, D, S, STEPS = 8, 32, 32, 200


def _clean(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(S, D, generator=g) + torch.linspace(-1, 1, D) * (1 + step / STEPS)


def _bad(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    kind = i % 3
    if kind == 0:
        return torch.full((S, D), float("nan")), None
    if kind == 1:
        return torch.zeros(0, D), None
    return torch.zeros(S, D), torch.zeros(S, dtype=torch.bool)  # a batch of padding only


def _train(capacity: str, with_bad: bool) -> tuple[LocMoERouter, list]:
    torch.manual_seed(0)
    cfg = LocMoEConfig(num_experts=N, hidden_size=D, topk=2, gate="dense", routing="hybrid", capacity=capacity,
                       adaptive_interval=1, z_loss_coeff=1e-3, expert_bias_rate=1e-3)
    router = LocMoERouter(cfg).train()
    opt = torch.optim.SGD(router.parameters(), lr=0.05)
    skipped, bad_i = 0, 0
    for step in range(STEPS):
        batches = [(_clean(step), None)]
        if with_bad and step % 4 == 0:
            batches.insert(0, _bad(bad_i))
            bad_i += 1
        for x, valid in batches:
            opt.zero_grad()
            out = router(x, valid=valid)
            loss = out.total_loss
            if not torch.isfinite(loss):
                skipped += 1
                continue
            loss.backward()
            opt.step()
    router.eval()
    final = router(_clean(STEPS + 1))
    return router, [final.stats.capacity, int(final.stats.dropped_pairs), final.stats.tokens_per_expert.tolist(),
                    {k: float(v) for k, v in final.losses.items()}, skipped]


@pytest.mark.parametrize("capacity", ["adaptive", "bound"])
def test_bad_batches_leave_a_run_as_a_clean_one(capacity):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean, clean_final = _train(capacity, False)
        dirty, dirty_final = _train(capacity, True)
    torch.set_num_threads(threads)
    assert dirty_final[-1] > 0 and clean_final[-1] == 0  # NaN batches were met and their steps skipped
    assert dirty_final[:-1] == clean_final[:-1]  # capacity, drops, loads and losses
    assert dirty.capacity.delta == clean.capacity.delta
    assert dirty.capacity.factor == clean.capacity.factor and dirty.capacity.q_hat == clean.capacity.q_hat
    assert dirty.capacity.skipped > 0 and clean.capacity.skipped == 0
    assert torch.equal(dirty.expert_bias, clean.expert_bias) and dirty.expert_bias.abs().sum() > 0
    assert torch.equal(dirty.gate.weight, clean.gate.weight)
