"""bench_layer's interleaved timing (--rounds): systems are timed round-robin and judged by the median of
their per-round ratios, so drift of the machine during a run cannot decide a target."""

import importlib.util
import os
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layer", os.path.join(HERE, "..", "benchmarks", "bench_layer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ctx(rounds):
    return types.SimpleNamespace(args=types.SimpleNamespace(rounds=rounds, warmup=3, iters=10), deferred={},
                                 current=None, log=lambda *a: None)


def test_time_system_defers_only_with_rounds(bench, monkeypatch):
    monkeypatch.setattr(bench, "time_it", lambda ctx, step, warmup, iters: 7.0)
    ctx = _ctx(1)
    ctx.current = "a"
    assert bench.time_system(ctx, lambda: None) == 7.0 and ctx.deferred == {}
    ctx = _ctx(3)
    ctx.current = "a"
    step = lambda: None  # noqa: E731
    assert bench.time_system(ctx, step) != bench.time_system(ctx, step)  # NaN placeholder
    assert ctx.deferred == {"a": step}


def test_rounds_interleave_and_take_the_median_of_per_round_ratios(bench, monkeypatch):
    # the machine drifts: round 2 is 1.5x slower for everyone; system x is 1.1x mcore in every round
    times = {"mcore_alltoall": [10.0, 15.0, 10.0], "locmoe_x": [11.0, 16.5, 11.0]}
    calls = []

    def fake_time_it(ctx, step, warmup, iters):
        name = step()
        calls.append((name, warmup))
        return times[name][sum(1 for n, _ in calls if n == name) - 1]

    monkeypatch.setattr(bench, "time_it", fake_time_it)
    ctx = _ctx(3)
    ctx.deferred = {"locmoe_x": lambda: "locmoe_x", "mcore_alltoall": lambda: "mcore_alltoall"}
    results = {"locmoe_x": {}, "mcore_alltoall": {}}
    bench.time_rounds(ctx, results)
    # round-robin order, full warm-up only in the first round
    assert [n for n, _ in calls] == ["locmoe_x", "mcore_alltoall"] * 3
    assert [w for _, w in calls] == [3, 3, 1, 1, 1, 1]
    assert results["locmoe_x"]["ms"] == 11.0 and results["locmoe_x"]["ms_rounds"] == [11.0, 16.5, 11.0]
    assert results["locmoe_x"]["ratio_median"] == pytest.approx(1.1)
    assert ctx.deferred == {}
    out = {"meta": {"nodes": 1}, "systems": results}
    assert any("= 1.100 (target <= 1.0): MISSED" in line for line in bench.targets(out))
    # two rows with rounds compare by the median of their per-round ratios (0.9, 1.09, 1.09 -> 1.09)
    a = {"ms_rounds": [9.0, 12.0, 12.0], "ms": 12.0}
    b = {"ms_rounds": [10.0, 11.0, 11.0], "ms": 11.0}
    assert bench._median_ratio(a, b) == pytest.approx(12.0 / 11.0)
