"""One bad batch never damages a run; bad input is refused where it enters (single process, CPU).

Each ``test_bad_case_*`` reproduces a failure of the earlier code (numbers in the names follow the list of
hostile inputs in docs/reliability.md)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from locmoe_plugin.capacity import CapacityController
from locmoe_plugin.config import ConfigError, LocMoEConfig
from locmoe_plugin.router import LocMoERouter

N, D = 8, 64


def _router(**kw) -> LocMoERouter:
    torch.manual_seed(0)
    cfg = dict(num_experts=N, hidden_size=D, topk=2, routing="hybrid", capacity="adaptive", adaptive_interval=1)
    cfg.update(kw)
    return LocMoERouter(LocMoEConfig(**cfg)).train()


def _batch(seed: int, s: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, D, generator=g) + torch.linspace(-1, 1, D)  # not isotropic: a real estimate


def _quiet(router, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return router(x, **kw)


# ------------------------------------------------------------------------------------------ bad cases 1-3
def test_bad_case_1_one_nan_batch_leaves_adaptive_capacity_as_a_clean_run():
    clean, dirty = _router(), _router()
    for step in range(6):
        if step == 3:
            out = _quiet(dirty, torch.full((64, D), float("nan")))
            assert out.stats.capacity_deferred.startswith("non-finite")
        a, b = clean(_batch(step)), _quiet(dirty, _batch(step))
    assert dirty.capacity.delta == clean.capacity.delta and math.isfinite(dirty.capacity.delta)
    assert dirty.capacity.factor == clean.capacity.factor < LocMoEConfig(
        num_experts=N, hidden_size=D, routing="hybrid").capacity_factor_max
    assert b.stats.capacity == a.stats.capacity
    assert int(b.stats.dropped_pairs) == int(a.stats.dropped_pairs)


@pytest.mark.parametrize("mode", ["bound", "adaptive"])
@pytest.mark.parametrize("bad", ["empty", "padding"])
def test_bad_cases_2_3_empty_or_padding_first_batch_defers_the_estimate(mode, bad):
    first = torch.zeros(0, D) if bad == "empty" else torch.zeros(64, D)
    clean, dirty = _router(capacity=mode), _router(capacity=mode)
    with pytest.warns(UserWarning, match="deferred"):
        out = dirty(first)
    assert out.stats.capacity_deferred in ("empty batch", "every token is padding (all-zero hidden states or masked)")
    assert dirty.capacity.delta is None and dirty.capacity.factor is None
    a, b = clean(_batch(1)), dirty(_batch(1))
    assert dirty.capacity.delta == clean.capacity.delta > 1e-3
    assert b.stats.capacity == a.stats.capacity and int(b.stats.dropped_pairs) == int(a.stats.dropped_pairs)
    assert b.stats.capacity_deferred is None and dirty.capacity.skipped == 1


def test_padding_tokens_are_left_out_of_the_estimate():
    x = _batch(2)
    padded = torch.cat([x, torch.zeros(32, D)])
    a, b = _router(), _router()
    a(x)
    b(padded)
    assert a.capacity.delta == pytest.approx(b.capacity.delta, rel=1e-6)
    c = _router()
    c(torch.cat([x, torch.randn(32, D)]), valid=torch.cat([torch.ones(64), torch.zeros(32)]).bool())
    assert c.capacity.delta == pytest.approx(a.capacity.delta, rel=1e-6)


def test_usable_for_estimation_marks_padding_and_broken_batches():
    from locmoe_plugin.capacity import usable_for_estimation

    aff = torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.3, -0.1]])
    assert usable_for_estimation(aff).tolist() == [True, False, True]
    assert usable_for_estimation(aff, torch.tensor([True, True, False])).tolist() == [True, False, False]
    aff[2, 0] = float("inf")
    assert not usable_for_estimation(aff).any()


# ------------------------------------------------------------------------------------------ bad case 4
def test_bad_case_4_wrong_hidden_size_is_refused():
    r = _router()
    with pytest.raises(ValueError, match="hidden_size=64"):
        r(torch.randn(16, 128))
    with pytest.raises(ValueError, match="hidden_size=64"):
        r(torch.randn(16, 48))  # not divisible: no raw reshape error either


def test_hash_ids_must_be_integers():
    r = LocMoERouter(LocMoEConfig(num_experts=N, hidden_size=D, routing="hash"))
    for ids in (torch.arange(4.0), torch.ones(4, dtype=torch.bool)):
        with pytest.raises(TypeError, match="integer token ids"):
            r(torch.randn(4, D), ids)


# ------------------------------------------------------------------------------------------ bad cases 9-10
def test_bad_case_9_non_finite_checkpoint_state_is_refused():
    r = _router()
    r(_batch(0))
    for key, value in [("delta", float("nan")), ("delta", 2.0), ("factor", -1.0), ("factor", "1.5"),
                       ("q_hat", float("inf")), ("steps", -3), ("steps", True)]:
        state = r.state_dict()
        extra = state["_extra_state"]
        extra = {"capacity": {**extra["capacity"], key: value}}
        state["_extra_state"] = extra
        with pytest.raises(ConfigError, match=f"{key}=.*capacity state from the checkpoint"):
            _router().load_state_dict(state)
    with pytest.raises(ConfigError, match="not a dict"):
        _router().set_extra_state(["delta", 0.1])


def test_bad_case_10_resume_with_changed_settings_the_new_config_wins():
    old = _router(routing="locmoe", capacity="factor", capacity_factor=1.25)
    old(_batch(0))
    state = old.state_dict()
    new = _router(routing="locmoe", capacity="factor", capacity_factor=2.0)
    with pytest.warns(UserWarning, match=r"new config wins \(capacity_factor: 1.25 -> 2.0"):
        new.load_state_dict(state)
    assert new.capacity.factor == 2.0
    assert new(_batch(1)).stats.capacity == math.ceil(2.0 * 64 * 2 / N)
    bound = _router(routing="locmoe", capacity="bound")
    with pytest.warns(UserWarning, match="capacity: 'factor' -> 'bound'"):
        bound.load_state_dict(state)
    bound(_batch(1))
    fresh = _router(routing="locmoe", capacity="bound")
    fresh(_batch(1))
    assert bound.capacity.delta == fresh.capacity.delta and bound.capacity.factor == fresh.capacity.factor


def test_resume_with_the_same_settings_keeps_the_measured_state_silently():
    a = _router()
    for i in range(3):
        a(_batch(i))
    b = _router()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_state_dict(a.state_dict())
    assert (b.capacity.delta, b.capacity.factor, b.capacity.steps) == (a.capacity.delta, a.capacity.factor, 3)


def test_older_checkpoint_without_settings_loads():
    c = CapacityController(LocMoEConfig(num_experts=N, hidden_size=D, routing="hybrid", capacity="adaptive"))
    c.load_state_dict({"delta": 0.05, "factor": 9.0, "q_hat": 0.2, "steps": 7})
    assert c.delta == 0.05 and c.factor == 4.0 and c.steps == 7  # clamped to capacity_factor_max


# ------------------------------------------------------------------------------------------ config input
@pytest.mark.parametrize("field,value", [
    ("capacity_factor", math.inf), ("capacity_factor", True), ("capacity_factor", "2"),
    ("capacity_factor_min", "0.5"), ("capacity_factor_max", math.nan), ("delta", "0.03"), ("delta", True),
])
def test_numeric_fields_refuse_wrong_types_and_non_finite(field, value):
    kw = dict(capacity="factor", capacity_factor=1.0) if field == "capacity_factor" else dict(capacity="bound")
    kw[field] = value
    with pytest.raises(ConfigError, match=field):
        LocMoEConfig(num_experts=N, hidden_size=D, **kw)


def test_delta_without_a_capacity_that_reads_it_is_refused():
    with pytest.raises(ConfigError, match="only used with capacity 'bound' or 'adaptive'"):
        LocMoEConfig(num_experts=N, hidden_size=D, delta=0.05)


def test_from_dict_needs_a_mapping_with_the_required_keys():
    with pytest.raises(ConfigError, match="mapping"):
        LocMoEConfig.from_dict([("num_experts", 8)])
    with pytest.raises(ConfigError, match="lack \\['hidden_size'\\]"):
        LocMoEConfig.from_dict({"num_experts": 8})


# ------------------------------------------------------------------------------------------ adapters
def test_megatron_flags_give_argparse_errors_and_flag_named_messages(capsys):
    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    p = add_arguments(argparse.ArgumentParser())
    for bad in (["--locmoe-locality-bias", "yes"], ["--locmoe-expert-bias-rate", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        err = capsys.readouterr().err
        assert "expected" in err and "Traceback" not in err
    args = p.parse_args(["--locmoe", "--locmoe-capacity", "factor", "--locmoe-capacity-factor", "inf"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    with pytest.raises(ConfigError, match="--locmoe-capacity-factor inf must be"):
        settings_from_args(args)


def test_deepspeed_config_must_be_a_mapping():
    pytest.importorskip("deepspeed")
    from locmoe_plugin.deepspeed.layer import locmoe_settings_from_ds_config

    with pytest.raises(ConfigError, match="JSON object"):
        locmoe_settings_from_ds_config([{"locmoe": {}}])
    with pytest.raises(ConfigError, match="must be an object"):
        locmoe_settings_from_ds_config({"locmoe": [1]})


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args, env=None):
    import os

    full = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "locmoe_plugin.cli", *args], capture_output=True, text=True,
                          timeout=120, env=full)


def test_cli_prints_valid_json_and_distinct_exit_codes(tmp_path):
    out = _cli("capacity", "--hidden-size", "5120", "--num-experts", "16", "--delta", "0.9", "--json")
    assert out.returncode == 0 and "Infinity" not in out.stdout
    assert json.loads(out.stdout)["ec_min_exact"] is None
    out = _cli("check-comm", "--nproc", "2", env={"LOCMOE_GPUS_PER_NODE": "abc"})
    assert out.returncode == 2 and "LOCMOE_GPUS_PER_NODE='abc'" in out.stderr and "Traceback" not in out.stderr
    out = _cli("check-comm", "--nproc", "2", "--gpus-per-node", "1", "--json", str(tmp_path / "no" / "r.json"))
    assert out.returncode == 3 and "No such file" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--systems", ""], "names no system"),
    (["--systems", ";;;"], "names no system"),
    (["--systems", "locmoe:foo=1"], "unknown LocMoE option"),
    (["--corpus", "/nonexistent/corpus"], "does not exist"),
])
def test_bad_case_5_demo_refuses_bad_input_before_spawning(args, message, tmp_path):
    out = _cli("demo", "--out", str(tmp_path / "out"), *args)
    assert out.returncode in (2, 3), out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_demo_refuses_an_unwritable_out_before_spawning(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 200)
    (tmp_path / "file").write_text("")
    out = _cli("demo", "--corpus", str(corpus), "--out", str(tmp_path / "file" / "out"), "--seq-len", "16")
    assert out.returncode == 3 and "Traceback" not in out.stderr
