"""DispatcherSettings: one frozen, validated object for the dispatcher's mode and overlap, taken by both
adapters; the public entry points keep accepting a plain mode string."""

import dataclasses

import pytest

from locmoe_plugin.comm.settings import DispatcherSettings
from locmoe_plugin.config import ConfigError


def test_defaults_strings_and_validation():
    assert DispatcherSettings() == DispatcherSettings(mode="hierarchical", overlap=False)
    assert DispatcherSettings.of("flat") == DispatcherSettings(mode="flat", overlap=False)
    assert DispatcherSettings.of(None) == DispatcherSettings()
    off = DispatcherSettings(mode="hierarchical", overlap=False)
    assert DispatcherSettings.of(off) is off
    assert DispatcherSettings.of("flat", overlap=False) == DispatcherSettings(mode="flat", overlap=False)
    assert off.agreement() == {"dispatcher": "hierarchical", "overlap": False, "equal_tokens": None,
                               "dispatch_format": "native"}
    equal = DispatcherSettings(mode="allgather", equal_tokens=True)
    assert DispatcherSettings.of(equal, overlap=True) == DispatcherSettings(mode="allgather", overlap=True, equal_tokens=True)
    with pytest.raises(ConfigError, match=r"equal_tokens='yes' must be True, False or None"):
        DispatcherSettings(equal_tokens="yes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        off.overlap = True
    with pytest.raises(TypeError):
        DispatcherSettings("flat")  # keyword-only
    with pytest.raises(ConfigError, match=r"dispatcher='ring' is not one of 'hierarchical', 'flat', 'allgather': pick one"):
        DispatcherSettings.of("ring")
    with pytest.raises(ConfigError, match=r"overlap='on' must be True or False"):
        DispatcherSettings(overlap="on")
    with pytest.raises(ConfigError, match=r"neither a mode .* nor DispatcherSettings"):
        DispatcherSettings.of(3)


def test_megatron_entry_points_take_strings_and_settings():
    pytest.importorskip("megatron.core")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from locmoe_plugin.megatron import locmoe_spec

    spec = get_gpt_layer_local_spec(num_experts=4)
    routers = []
    for dispatcher in ("flat", DispatcherSettings(mode="flat", overlap=False)):
        moe = locmoe_spec(spec, {}, dispatcher).submodules.mlp
        routers.append(moe.submodules.router.keywords["dispatcher"])
    assert routers == [DispatcherSettings(mode="flat"), DispatcherSettings(mode="flat", overlap=False)]
    with pytest.raises(ConfigError, match="dispatcher='ring'"):
        locmoe_spec(spec, {}, "ring")
