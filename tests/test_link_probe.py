"""The benchmarks' repeated link probe (benchmarks/link_probe.py): every sample is recorded, the median of
each figure is what the calibration and the validation read, and bench_layer samples around every timing
round."""

import importlib.util
import os
import sys
import types

import pytest

from locmoe_plugin.projection.calibration import duplex_of, inter_link, link_summary
from tests._dist import run_workers

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "..", "benchmarks")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_summary_is_the_median_of_every_sample_and_duplex_follows_the_medians():
    samples = [{"when": "a", "bandwidth_GBps": 1.0, "latency_us": 90.0, "one_way_GBps": 3.0},
               {"when": "b", "bandwidth_GBps": 4.0, "latency_us": 70.0, "one_way_GBps": 3.0},
               {"when": "c", "bandwidth_GBps": 2.0, "latency_us": 60.0, "one_way_GBps": 3.5}]
    s = link_summary(samples, probe_MiB_per_peer=32.0)
    assert (s["bandwidth_GBps"], s["latency_us"], s["one_way_GBps"]) == (2.0, 70.0, 3.0)
    assert s["duplex"] == "full" and s["samples"] == samples and s["probe_MiB_per_peer"] == 32.0
    assert duplex_of(3.1, 2.0) == "shared" and duplex_of(2.9, 2.0) == "full"
    assert link_summary(samples[:2])["bandwidth_GBps"] == 2.5  # even count: mean of the middle two
    with pytest.raises(ValueError):
        link_summary([])
    # the model reads the median of the samples, not a top-level figure written beside them
    meta = {"inter_node_bw_GBps": 9.0, "inter_node_link": {**s, "bandwidth_GBps": 9.0}}
    assert inter_link(meta) == {"bandwidth_GBps": 2.0, "latency_us": 70.0, "duplex": "full", "one_way_GBps": 3.0,
                                "probe_samples": 3}
    # old runs: one figure, one probe
    assert inter_link({"inter_node_bw_GBps": 2.5})["probe_samples"] == 1


def test_layer_probe_size_is_one_row_per_token():
    probe = _load("link_probe")
    assert probe.layer_probe_mib(8192, 2048, 2) == 32.0  # the default layer, bf16
    with pytest.raises(ValueError, match="MiB per peer"):
        probe.LinkProbe(types.SimpleNamespace(), 0.0)


def test_rounds_are_bracketed_by_link_samples(monkeypatch):
    bench = _load("bench_layer")
    monkeypatch.setattr(bench, "time_it", lambda ctx, step, warmup, iters: 1.0)
    taken = []
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(rounds=3, warmup=1, iters=2, manual_gc=False),
                                deferred={"a": lambda: None}, current=None, log=lambda *a: None,
                                link_probe=types.SimpleNamespace(take=taken.append), last_host_ms=None)
    bench.time_rounds(ctx, {"a": {}})
    assert taken == ["before round 1", "after round 1", "after round 2", "after round 3"]
    # the LocMoE floors built at the first sample's rate are restated at the final median rate
    res = {"locmoe_x": {"floor_ms": 10.0, "floor_inter_ms": 4.0}, "mcore_alltoall": {"ms": 3.0}}
    bench.rescale_floors(res, 2e9, 1e9)
    assert res["locmoe_x"] == {"floor_ms": 14.0, "floor_inter_ms": 8.0} and res["mcore_alltoall"] == {"ms": 3.0}


def _probe_worker(rank, world):
    import torch

    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    from link_probe import LinkProbe, ProbeGroups, take_sample

    out = {}
    for gpn in (2, 4):  # 2 nodes x 2, then one node x 4
        groups = ProbeGroups(dev=torch.device("cpu"), sync=lambda: None, gpn=gpn)
        run = types.SimpleNamespace(link_probe=LinkProbe(groups, mib=0.0625, iters=2))
        for when in ("before timing", "after round 1", "after round 2"):
            take_sample(run, when)
        out[gpn] = (run.link_probe.summary("inter_node"), run.link_probe.summary("intra_node"),
                    run.link_probe.inter_bandwidth_Bps())
    return out


def test_repeated_probe_on_gloo_records_every_sample_and_uses_the_median():
    res = run_workers(_probe_worker, 4, timeout=120)
    inter, intra, bw = res[0][2]
    assert [s["when"] for s in inter["samples"]] == ["before timing", "after round 1", "after round 2"]
    assert inter["probe_MiB_per_peer"] == 0.0625 and len(intra["samples"]) == 3
    for link in (inter, intra):
        for key in ("bandwidth_GBps",) + (("latency_us", "one_way_GBps", "collective_GBps", "flat_GBps")
                                            if link is inter else ()):
            vals = sorted(s[key] for s in link["samples"])
            assert all(v > 0 for v in vals) and link[key] == vals[1]
    assert inter["duplex"] == duplex_of(inter["one_way_GBps"], inter["bandwidth_GBps"])
    assert bw == pytest.approx(inter["bandwidth_GBps"] * 1e9)
    # every rank holds the same figures (each is the max over ranks)
    assert all(r[2][0]["bandwidth_GBps"] == inter["bandwidth_GBps"] for r in res)
    one_inter, one_intra, one_bw = res[0][4]
    assert one_inter is None and one_bw == 0.0 and len(one_intra["samples"]) == 3


def test_validation_reads_the_median_and_counts_repeated_probes_apart(tmp_path):
    import json
    import shutil

    val = _load("validate_projection")
    src = os.path.join(HERE, "..", "benchmarks", "results", "2026-11-26_h200x2_overlap_layer")
    run = tmp_path / "new_run"
    shutil.copytree(src, run)
    samples = [{"when": w, "bandwidth_GBps": bw, "latency_us": 70.0, "one_way_GBps": 4.5}
               for w, bw in (("before timing", 3.0), ("after round 1", 9.0), ("after round 2", 3.3))]
    path = run / "layer" / "layer_2nodes_2gpu.json"
    res = json.loads(path.read_text())
    res["meta"]["inter_node_link"] = link_summary(samples, probe_MiB_per_peer=32.0)
    path.write_text(json.dumps(res))
    dpath = run / "overlap" / "overlap_2x1_socket.json"
    dres = json.loads(dpath.read_text())
    dres["meta"]["inter_node_link"] = link_summary(samples, probe_MiB_per_peer=32.0)
    dpath.write_text(json.dumps(dres))
    old = val.validate([src])
    new = val.validate([str(run)])
    rows = new + old
    assert new and all(r["probe"] == "repeated" and r["link_GBps"] == 3.3 for r in new)
    assert all(r["probe"] == "one-shot" for r in old)
    lines = val.by_probe([r for r in rows if r["variant"] == "model"], "layer")
    assert lines[0].startswith("  layer, runs with a repeated probe:") and "(1 run(s))" in lines[0]
    assert lines[1].startswith("  layer, one-shot probe:") and "(1 run(s))" in lines[1]
    assert val.by_probe(old, "layer")[0] == "  layer, runs with a repeated probe: no run"
    drows = [r for r in val.validate_dispatch([str(run)]) if r["setting"] == "socket"]
    assert drows and all(r["probe"] == "repeated" and r["link_GBps"] == 3.3 and r["latency_us"] == 70.0
                         for r in drows)


def test_probe_kind_names_the_runs_whose_probe_measured_every_pattern():
    val = _load("validate_projection")
    both = {"probe_samples": 9, "collective_GBps": 2.0, "flat_GBps": 2.5}
    assert val.probe_kind(both, 2) == "per-pattern"
    assert val.probe_kind({"probe_samples": 9, "collective_GBps": 2.0}, 2) == "repeated"
    assert val.probe_kind({"probe_samples": 9, "collective_GBps": 2.0}, 1) == "per-pattern"  # one GPU per node: flat = rail
    assert val.probe_kind(both) == "repeated"  # dispatch rows: the model reads the rail rate only
    assert val.probe_kind({**both, "probe_samples": 1}, 2) == "one-shot"


def test_a_calls_own_two_stage_measurement_is_preferred(tmp_path):
    import json
    import shutil

    val = _load("validate_projection")
    src = os.path.join(HERE, "..", "benchmarks", "results", "2026-11-26_h200x4_c6ae4c6", "slow")
    run = tmp_path / "call"
    shutil.copytree(src, run)
    before = {r["system"]: r for r in val.validate([str(run)]) if r["variant"] == "model"}
    assert before["locmoe_dense"]["two_stage_source"] == "other runs"
    # the same call's one-node dispatch run: the forced two-stage plan 5 ms slower than the pairs plan at top-4
    rows = [{"topk": 4, "systems": {"hierarchical": {"ms": 7.0}, "hier_tree": {"ms": 12.0}}},
            {"topk": 2, "systems": {"hierarchical": {"ms": 7.0}, "hier_tree": {"ms": 99.0}}}]
    (run / "dispatch_1node_4gpu.json").write_text(json.dumps({"meta": {"nodes": 1}, "rows": rows}))
    after = {r["system"]: r for r in val.validate([str(run)]) if r["variant"] == "model"}
    loc_b, loc_a = before["locmoe_dense"], after["locmoe_dense"]
    assert loc_a["two_stage_ms"] == 5.0 and loc_a["two_stage_source"] == "own call"
    assert loc_a["predicted_ms"] == pytest.approx(loc_b["predicted_ms"] + 5.0 - loc_b["two_stage_ms"])
    # the baselines run no two-stage plan: unchanged
    assert after["mcore_alltoall"]["predicted_ms"] == before["mcore_alltoall"]["predicted_ms"]
