"""Flags, settings, enable()/disable() idempotence, the spec rewrite, the wrapper, and Ascend (mocked)."""

import argparse
import sys
import types

import pytest

pytest.importorskip("megatron.core")

from locmoe_plugin.comm.settings import DispatcherSettings  # noqa: E402
from locmoe_plugin.config import ConfigError  # noqa: E402
from locmoe_plugin.megatron import (  # noqa: E402
    add_arguments,
    count_locmoe_layers,
    disable,
    enable,
    locmoe_spec,
    settings_from_args,
    status,
)


@pytest.fixture(autouse=True)
def _clean():
    disable()
    yield
    disable()


def _args(*argv, **megatron):
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(list(argv))
    base = dict(num_experts=8, hidden_size=64, moe_router_topk=2, expert_model_parallel_size=4,
                moe_expert_capacity_factor=None)
    base.update(megatron)
    for k, v in base.items():
        setattr(ns, k, v)
    return ns


def test_flags_parse_and_reach_the_settings():
    from locmoe_plugin.comm.settings import DispatcherSettings

    ns = _args("--locmoe", "--locmoe-routing", "hybrid", "--locmoe-locality-loss-coeff", "0.05",
               "--locmoe-capacity", "bound", "--locmoe-gpus-per-node", "2", "--locmoe-dispatcher", "flat")
    overrides, dispatcher = settings_from_args(ns)
    assert dispatcher == DispatcherSettings(mode="flat", overlap=False)  # overlap off by default
    assert settings_from_args(_args("--locmoe", "--locmoe-overlap", "on"))[1].overlap
    # equal token counts: the framework decides by default (None), or the flag promises / withdraws it
    assert dispatcher.equal_tokens is None
    for flag, value in (("on", True), ("off", False), ("auto", None)):
        assert settings_from_args(_args("--locmoe", "--locmoe-equal-tokens", flag))[1].equal_tokens is value
    # Megatron's 1F1B overlap with ours off: accepted here (the layer then runs the unsplit plan)
    assert settings_from_args(_args("--locmoe", "--locmoe-overlap", "off", overlap_moe_expert_parallel_comm=True))
    assert overrides == {"routing": "hybrid", "locality_loss_coeff": 0.05, "capacity": "bound", "gpus_per_node": 2}
    assert dispatcher.mode == "flat"
    ns = _args("--locmoe", "--locmoe-routing", "hybrid", "--locmoe-capacity-factor-min", "1.0",
               "--locmoe-renormalize-kept", "--locmoe-drop-policy", "choice")
    assert settings_from_args(ns)[0] == {"routing": "hybrid", "capacity_factor_min": 1.0, "renormalize_kept": True,
                                         "drop_policy": "choice"}
    # defaults come from the core config
    ns = _args("--locmoe")
    assert settings_from_args(ns) == ({}, DispatcherSettings())
    assert ns.locmoe_gate is None and ns.locmoe_min_capacity == 4  # None: LocMoEConfig picks it per routing
    help_text = argparse.ArgumentParser()
    add_arguments(help_text)
    assert "LocMoE+ token/expert choice" in help_text.format_help()


def test_locmoe_plus_flags_keep_the_config_defaults_and_override_them():
    """--locmoe-routing hybrid alone leaves gate, budget and threshold to LocMoEConfig (dense, 0.2, 0.9);
    the old GrAP / locality-loss LocMoE+ is three flags away, and the help names the defaults and the off."""
    from locmoe_plugin.config import LocMoEConfig

    overrides, _ = settings_from_args(_args("--locmoe", "--locmoe-routing", "hybrid"))
    assert overrides == {"routing": "hybrid"}
    cfg = LocMoEConfig(num_experts=8, hidden_size=64, **overrides)
    assert (cfg.gate, cfg.cross_node_budget, cfg.resonance_mass) == ("dense", 0.2, 0.9)
    overrides, _ = settings_from_args(_args("--locmoe", "--locmoe-routing", "hybrid", "--locmoe-gate", "grap",
                                            "--locmoe-locality-loss-coeff", "0.01", "--locmoe-resonance-mass", "0"))
    assert overrides == {"routing": "hybrid", "gate": "grap", "locality_loss_coeff": 0.01, "resonance_mass": 0.0}
    old = LocMoEConfig(num_experts=8, hidden_size=64, **overrides)
    assert (old.cross_node_budget, old.locality_bias, old.resonance_mass) == (None, True, 0.0)
    with pytest.raises(ConfigError, match=r"--locmoe-resonance-mass 1.5 must be in \(0, 1\].*0 \(off\)"):
        settings_from_args(_args("--locmoe", "--locmoe-routing", "hybrid", "--locmoe-resonance-mass", "1.5"))
    with pytest.raises(ConfigError, match=r"--locmoe-resonance-mass 0.9 is LocMoE\+'s expert-choice threshold"):
        settings_from_args(_args("--locmoe", "--locmoe-resonance-mass", "0.9"))
    p = argparse.ArgumentParser()
    add_arguments(p)
    help_text = "".join(p.format_help().split())  # argparse wraps lines, at hyphens too
    for said in ("Default: 0.9 for hybrid", "0 = off", "default for --locmoe-routing topk/locmoe/hybrid",
                 "Default: 0.2 on 2 nodes, scaled with the EP group's N nodes by 2 (N-1)/N (0.3 on 4), "
                 "for --locmoe-routing locmoe/hybrid"):
        assert "".join(said.split()) in help_text


@pytest.mark.parametrize(
    "argv, megatron, message",
    [
        (("--locmoe",), {"num_experts": None}, r"--locmoe needs an MoE model: add --num-experts"),
        (("--locmoe", "--locmoe-gpus-per-node", "3"), {}, r"ranks per node 3 does not divide|different numbers"),
        (("--locmoe", "--locmoe-gate", "grap"), {"hidden_size": 100},
         r"--hidden-size 100 is not divisible by --num-experts 8: GrAP"),
        (("--locmoe",), {"expert_model_parallel_size": 3}, r"--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
        (("--locmoe", "--locmoe-overlap-chunks", "2"), {}, r"is removed: use --locmoe-overlap on"),
        (("--locmoe", "--locmoe-overlap", "on"), {"overlap_moe_expert_parallel_comm": True},
         r"pass --locmoe-overlap off"),
        (("--locmoe", "--locmoe-routing", "hybrid", "--locmoe-capacity", "none"), {}, r"needs a capacity"),
    ],
)
def test_invalid_combinations_fail_with_one_message(argv, megatron, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_args(_args(*argv, **megatron))


def test_spec_rewrite_and_enable_disable_are_idempotent():
    from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer

    original = moe_module_specs.get_moe_module_spec_for_backend
    plain = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    assert plain.submodules.mlp.module is MoELayer and count_locmoe_layers(plain) == 0
    assert count_locmoe_layers(locmoe_spec(plain, {"routing": "hybrid"})) == 1

    applied = enable(settings={"routing": "locmoe"}, dispatcher="flat")
    assert "megatron-moe-spec" in applied and status()["megatron-moe-spec"]
    assert enable(settings={"routing": "locmoe"}) == []  # idempotent
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    assert count_locmoe_layers(spec) == 1
    router = spec.submodules.mlp.submodules.router
    assert router.keywords == {"locmoe": {"routing": "locmoe"}, "dispatcher": DispatcherSettings(), "with_locmoe_dispatcher": True}
    # dense (non-MoE) specs are untouched
    assert count_locmoe_layers(gpt_layer_specs.get_gpt_layer_local_spec()) == 0

    assert "megatron-moe-spec" in disable()
    assert disable() == []
    assert moe_module_specs.get_moe_module_spec_for_backend is original
    assert gpt_layer_specs.get_moe_module_spec_for_backend is original
    assert count_locmoe_layers(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)) == 0


def test_args_patch_registers_flags_in_megatron_parser(monkeypatch):
    """megatron.training is not in the CPU wheel of megatron-core 0.16: a stand-in module with
    Megatron-LM's ``add_megatron_arguments`` shows the flags land in Megatron's own parser."""
    training = types.ModuleType("megatron.training")
    training.__path__ = []
    arguments = types.ModuleType("megatron.training.arguments")

    def add_megatron_arguments(parser):
        parser.add_argument("--num-experts", type=int)
        return parser

    def parse_args(argv):
        return arguments.add_megatron_arguments(argparse.ArgumentParser()).parse_args(argv)

    arguments.add_megatron_arguments = add_megatron_arguments
    arguments.parse_args = parse_args
    training.arguments = arguments
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", arguments)

    assert "megatron-args" in enable()
    ns = arguments.parse_args(["--num-experts", "8", "--locmoe", "--locmoe-routing", "hybrid"])
    assert ns.locmoe and ns.locmoe_routing == "hybrid" and ns.num_experts == 8
    assert enable() == []
    disable()
    assert arguments.add_megatron_arguments is add_megatron_arguments
    with pytest.raises(SystemExit):
        arguments.parse_args(["--locmoe"])


def test_enable_on_ascend_applies_transfer_to_npu(fake_npu, monkeypatch):
    from locmoe_plugin import device as dev

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    dev.reset_accelerator_cache()
    try:
        _, torch_npu = fake_npu
        assert dev.get_accelerator().backend == "hccl"
        enable(settings={})
        assert torch_npu.transfer_applied == 1
        enable(settings={})
        assert torch_npu.transfer_applied == 1
    finally:
        dev.reset_accelerator_cache()


def test_wrapper_runs_a_script_with_locmoe_enabled(tmp_path, capsys):
    from locmoe_plugin.megatron.launcher import main

    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "try:\n    from megatron.training import pretrain  # what makes it a Megatron-LM script\n"
        "except ImportError:\n    pass\n"
        "from locmoe_plugin.megatron import status\n"
        "print('ARGS', sys.argv[1:], 'PATCHED', status()['megatron-moe-spec'])\n"
    )
    assert main([str(script), "--num-experts", "8", "--locmoe"]) == 0
    out = capsys.readouterr().out
    assert "ARGS ['--num-experts', '8', '--locmoe'] PATCHED True" in out
    assert main([str(tmp_path / "missing.py")]) == 2


def test_megatron_lm_patch_applies_and_reverts(tmp_path):
    import pathlib
    import shutil
    import subprocess

    patch_bin = shutil.which("patch")
    if patch_bin is None:
        pytest.skip("GNU patch is not installed")
    target = tmp_path / "pretrain_gpt.py"
    original = '# Copyright\n"""Pretrain GPT."""\nimport torch\n'
    target.write_text(original)
    patch_file = pathlib.Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-pretrain_gpt.patch"
    subprocess.run([patch_bin, "-p1", "-i", str(patch_file)], cwd=tmp_path, check=True, capture_output=True)
    patched = target.read_text()
    assert patched.splitlines()[0].startswith("import locmoe_plugin.megatron.auto")
    assert patched.endswith(original)
    compile(patched, "pretrain_gpt.py", "exec")
    subprocess.run([patch_bin, "-p1", "-R", "-i", str(patch_file)], cwd=tmp_path, check=True, capture_output=True)
    assert target.read_text() == original


def test_spec_rewrite_handles_the_partial_form_of_megatron_019():
    """megatron-core 0.19 builds the MoE layer spec as functools.partial(MoELayer, submodules=...)."""
    import dataclasses
    import functools

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    plain = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    partial_mlp = functools.partial(MoELayer, submodules=MoESubmodules())
    layer = dataclasses.replace(plain, submodules=dataclasses.replace(plain.submodules, mlp=partial_mlp))
    assert count_locmoe_layers(layer) == 0
    out = locmoe_spec(layer, {"routing": "locmoe"})
    mlp = out.submodules.mlp
    assert isinstance(mlp, functools.partial) and mlp.func.__name__ == "LocMoELayer"
    assert mlp.keywords["submodules"].router.keywords["locmoe"] == {"routing": "locmoe"}
    assert count_locmoe_layers(out) == 1
    other = functools.partial(dict, a=1)  # any other partial is kept as is
    assert locmoe_spec(other) is other


def test_metrics_patch_adds_locmoe_names_only_when_locmoe_is_on():
    from locmoe_plugin.megatron.enable import LOCMOE_METRICS, _wrap_track_names

    seen = []

    def report(tracker, loss_scale, iteration, track_names=None, num_layers=None):
        seen.append(track_names)

    wrapped = _wrap_track_names(report)
    wrapped(None, 1.0, 3, track_names=["load_balancing_loss"])
    assert seen[-1] == ["load_balancing_loss"]  # LocMoE off: untouched
    enable(settings={"routing": "locmoe"})
    wrapped(None, 1.0, 3, track_names="load_balancing_loss")
    assert seen[-1] == ["load_balancing_loss", *LOCMOE_METRICS]
    wrapped(None, 1.0, 3)  # no explicit names: Megatron reports everything tracked
    assert seen[-1] is None


def test_metrics_report_flushes_the_routers_pending_telemetry(monkeypatch):
    from locmoe_plugin.megatron import metrics as router_mod
    from locmoe_plugin.megatron.enable import _wrap_track_names

    class Router:  # stands in for LocMoEMegatronRouter (only flush_telemetry is called)
        flushed = 0

        def flush_telemetry(self):
            Router.flushed += 1

    r = Router()
    router_mod._accumulating.add(r)
    order = []
    monkeypatch.setattr(Router, "flush_telemetry", lambda self: order.append("flush"))
    _wrap_track_names(lambda tracker, loss_scale, iteration, track_names=None: order.append("report"))(None, 1.0, 1)
    assert order == ["flush", "report"]
    router_mod._accumulating.discard(r)


def test_gpt_token_ids_patch_attaches_only_for_hash_routing():
    import types as _types

    import torch

    from locmoe_plugin.megatron.enable import _wrap_gpt_init

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tp_group = None
            self.config = _types.SimpleNamespace(sequence_parallel=False)

    init = _wrap_gpt_init(Model.__init__)
    enable(settings={"routing": "locmoe"})
    m = Model.__new__(Model)
    init(m)
    assert getattr(m, "_locmoe_ids", None) is None and not m._forward_pre_hooks
    disable()
    enable(settings={"routing": "hash"})
    m = Model.__new__(Model)
    init(m)
    assert m._locmoe_ids is not None and len(m._forward_pre_hooks) == 1
    m._locmoe_ids.remove()
    assert not m._forward_pre_hooks


def test_enable_metrics_report_alone_turns_on_deferred_loss_records():
    from locmoe_plugin.megatron import disable, enable_metrics_report, status
    from locmoe_plugin.megatron.metrics import report_flushes as _report_flushes

    disable()
    assert not _report_flushes()
    names = enable_metrics_report()
    try:
        assert names and all(n.startswith("megatron-moe-metrics") for n in names)
        assert enable_metrics_report() == []  # idempotent
        assert _report_flushes()
        assert not status()["megatron-moe-spec"] and not status()["megatron-args"]  # only the report
    finally:
        disable()
    assert not _report_flushes()
