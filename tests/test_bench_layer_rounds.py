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
    return types.SimpleNamespace(args=types.SimpleNamespace(rounds=rounds, warmup=3, iters=10, manual_gc=False), deferred={},
                                 current=None, log=lambda *a: None, last_host_ms=None)


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
        calls.append((name, warmup, iters))
        if iters == 1:  # the warm-up pass
            return 99.0
        return times[name][sum(1 for n, _, i in calls if n == name and i > 1) - 1]

    monkeypatch.setattr(bench, "time_it", fake_time_it)
    ctx = _ctx(3)
    ctx.deferred = {"locmoe_x": lambda: "locmoe_x", "mcore_alltoall": lambda: "mcore_alltoall"}
    results = {"locmoe_x": {}, "mcore_alltoall": {}}
    bench.time_rounds(ctx, results)
    # a warm-up pass (--warmup each, not recorded), then per round every system once, one warm-up each
    assert calls[:2] == [("locmoe_x", 3, 1), ("mcore_alltoall", 3, 1)]
    timed = calls[2:]
    assert len(timed) == 6 and all(w == 1 and i == 10 for _, w, i in timed)
    for r in range(3):
        assert sorted(n for n, _, _ in timed[2 * r : 2 * r + 2]) == ["locmoe_x", "mcore_alltoall"]
        assert [n for n, _, _ in timed[2 * r : 2 * r + 2]] == bench.round_order(["locmoe_x", "mcore_alltoall"], r)
    assert results["locmoe_x"]["ms"] == 11.0 and results["locmoe_x"]["ms_rounds"] == [11.0, 16.5, 11.0]
    assert results["locmoe_x"]["ratio_median"] == pytest.approx(1.1)
    assert ctx.deferred == {}
    out = {"meta": {"nodes": 1}, "systems": results}
    lines = bench.comparisons(out)
    assert any(line.startswith("compare: locmoe_x / mcore_alltoall = 1.100") for line in lines)
    assert not any(word in " ".join(lines) for word in ("target", "MISSED", "met", "issue"))
    # two rows with rounds compare by the median of their per-round ratios (0.9, 1.09, 1.09 -> 1.09)
    a = {"ms_rounds": [9.0, 12.0, 12.0], "ms": 12.0}
    b = {"ms_rounds": [10.0, 11.0, 11.0], "ms": 11.0}
    assert bench._median_ratio(a, b) == pytest.approx(12.0 / 11.0)


def test_round_order_is_a_seeded_shuffle(bench):
    names = [f"s{i}" for i in range(7)]
    orders = [bench.round_order(names, r) for r in range(25)]
    assert all(sorted(o) == names for o in orders)
    assert orders[3] == bench.round_order(names, 3)  # the same on every rank
    assert len({o[0] for o in orders}) > 1  # not always the same system first
    # who precedes s0 changes between rounds
    assert len({o[o.index("s0") - 1] for o in orders if o.index("s0") > 0}) > 1


def test_host_calls_split_the_step_into_its_forward_and_backward_calls(bench, monkeypatch):
    import layer_setup  # on the path once bench_layer is loaded (it imports it)

    clock = [100.0]
    monkeypatch.setattr(layer_setup.time, "perf_counter", lambda: clock[0])

    def forward():
        clock[0] += 0.004
        return "y"

    def backward(y):
        assert y == "y"
        clock[0] += 0.007

    ctx = types.SimpleNamespace(host_calls=[])
    step = bench.host_calls_of(ctx, forward, backward)
    step()
    step()
    assert ctx.host_calls == [pytest.approx((0.004, 0.007))] * 2


def test_rounds_keep_each_rounds_host_split_and_report_the_device_tail(bench, monkeypatch):
    def fake_time_it(ctx, step, warmup, iters):
        name = step()
        ctx.last_host_ms = {"a": (3.0, 5.0), "b": (2.0, 4.0)}[name]
        return {"a": 10.0, "b": 9.0}[name]

    monkeypatch.setattr(bench, "time_it", fake_time_it)
    ctx = _ctx(3)
    ctx.deferred = {"a": lambda: "a", "b": lambda: "b"}
    results = {"a": {}, "b": {}}
    bench.time_rounds(ctx, results)
    assert results["a"]["host_ms_rounds"] == [(3.0, 5.0)] * 3
    lines = bench.host_lines({"systems": results})
    row = next(line for line in lines if line.split()[1] == "a").split()
    assert [float(v) for v in row[2:]] == [10.0, 3.0, 5.0, 2.0]  # wall, forward, backward, tail
    row = next(line for line in lines if line.split()[1] == "b").split()
    assert [float(v) for v in row[2:]] == [9.0, 2.0, 4.0, 3.0]
    # a step that records no split (time_it leaves last_host_ms None) gets no host row
    monkeypatch.setattr(bench, "time_it", lambda ctx, step, warmup, iters: 5.0)
    ctx = _ctx(2)
    ctx.deferred = {"c": lambda: None}
    results = {"c": {}}
    bench.time_rounds(ctx, results)
    assert "host_ms_rounds" not in results["c"] and bench.host_lines({"systems": results}) == []
