"""The end-to-end benchmark (benchmarks/bench_e2e.py) at toy size on CPU: 4 gloo ranks as 2 emulated nodes
x 2 through launch/emulate_nodes.sh --link fast, a few steps per system; its JSON, resume and report."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--num-layers", "2", "--hidden-size", "64", "--num-heads", "4", "--num-experts", "8", "--topk", "2",
       "--ffn-hidden-size", "64", "--seq-len", "32", "--micro-batch", "2", "--dtype", "fp32", "--steps", "5",
       "--measure", "2", "--eval-batches", "1", "--bandwidth-mib", "0.125"]


def _run(out, systems, link="fast", extra=()):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    cmd = ["bash", "launch/emulate_nodes.sh", "--nodes", "2", "--nproc-per-node", "4", "--link", link, "--",
           "benchmarks/bench_e2e.py", "--out", str(out), "--systems", systems,
           "--corpus", os.path.join(ROOT, "README.md"), *TOY, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check(r, system, manual_gc=False, variant=None):
    assert r["system"] == system and r["layout"] == "2x2_fast" and r["link"] == "fast"
    assert r["bandwidth"]["env"]["NCCL_NSOCKS_PERTHREAD"] == "8"
    assert r["bandwidth"]["inter_node_gbps"] > 0 and r["bandwidth"]["intra_node_gbps"] > 0
    assert r["bandwidth"]["inter_node_all_peers_gbps"] > 0
    t = r["tokens_per_s"]
    assert 0 < t["min"] <= t["median"] <= t["max"] and len(r["step_ms"]) == 2
    assert r["tokens_per_step"] == 4 * 2 * 32 and r["trained_tokens"] == 5 * 256
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(256) + 0.5
    assert 0 <= r["cross_node_share"] <= 1 and r["inter_node_bytes_per_step"] > 0
    b = r["breakdown_ms"]
    phases = sum(b["forward"][p] + b["backward"][p] for p in ("attention", "router", "dispatch", "experts", "combine"))
    assert 0 < phases <= b["total"] and b["optimizer"] > 0
    assert b["forward"]["attention"] > 0 and b["forward"]["experts"] > 0 and b["backward"]["experts"] > 0
    assert 0 < b["inter_node_wait_share"] < 1
    assert r["released"] is True  # freed before the next system, so it is not in that one's peak memory
    # busiest over mean: at least 1, at most every row / byte on one of the 4 ranks
    assert 1.0 <= r["rank_load_max_over_mean"] <= 4.0 and r["expert_load_max_over_mean"] >= 1.0
    assert 1.0 - 1e-9 <= r["inter_node_bytes_rank_max_over_mean"] <= 4.0
    assert len(r["cross_node_share_steps"]) == 2 and r["allocator_calls_measured"] is None  # no device allocator
    assert r["lr_warmup_steps"] == 1  # --steps 5 // 10, at least 1
    assert r["grouped_experts"] is False  # the default: SequentialMLP in every system
    assert sum(r["cross_node_share_steps"]) / 2 == pytest.approx(r["cross_node_share"])
    # Python's collection passes per measured step and generation, summed over the 4 ranks
    gcs = r["gc_collections_steps"]
    assert r["manual_gc"] is manual_gc and len(gcs) == 2 and all(len(g) == 3 and min(g) >= 0 for g in gcs)
    if manual_gc:  # automatic collection off: no pass inside a measured step
        assert gcs == [[0, 0, 0], [0, 0, 0]]
    if system == "deepspeed_moe":
        assert r["grad_reduce"] == "deepspeed" and r["grad_buffer_dtypes"] is None
    else:  # the default reduction: fp32 buffers as DDP allocated them
        assert r["variant"] == (variant or system) and r["grad_reduce"] == "fp32"
        assert r["grad_buffer_dtypes"] == ["float32"]
        assert r["optimizer"] == "replicated"  # the default: Megatron's optimizer unsharded
        assert r["locmoe_budget"] is None  # LocMoEConfig's own budget where the system routes with one


@pytest.mark.multiproc
def test_bench_e2e_megatron_systems_resume_and_report(tmp_path):
    systems = ["mcore_alltoall", "mcore_grouplimited", "locmoe_topk", "locmoe", "locmoe_flat", "locmoe_fp8",
               "locmoe_plus"]
    out = _run(tmp_path, ",".join(systems))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {s: json.loads((tmp_path / f"e2e_2x2_fast_{s}.json").read_text()) for s in systems}
    for s, r in results.items():
        _check(r, s)
    # Megatron's alltoall sends every remote (token, expert) pair in the dispatch and the combine, forward and
    # backward: the bytes counted at the collective match the routing the monitor saw (fp32, hidden 64)
    base = results["mcore_alltoall"]
    pairs = 4 * 2 * 32 * 2 * 2  # ranks x micro-batch x seq x top-2 x layers
    assert base["inter_node_bytes_per_step"] == pytest.approx(base["cross_node_share"] * pairs * 64 * 4 * 4, rel=0.05)
    # LocMoE's flat and hierarchical dispatchers sum in the same order (bitwise equal in fp32): the same training;
    # the flat one sends each remote (token, expert) pair, the hierarchical one each token once per remote node
    flat, hier = results["locmoe_flat"], results["locmoe"]
    assert flat["val_loss"] == hier["val_loss"] and flat["cross_node_share"] == hier["cross_node_share"]
    assert flat["inter_node_bytes_per_step"] >= hier["inter_node_bytes_per_step"] > 0
    # the same routing with rows in the dispatch direction as fp8: fewer bytes on the link (hidden 64 in fp32:
    # 68-byte rows for 256 in two of the four transfers), a nearby loss, and the format recorded
    fp8 = results["locmoe_fp8"]
    assert fp8["dispatch_format"] == "fp8" and hier["dispatch_format"] == "native"
    assert results["mcore_alltoall"]["dispatch_format"] is None
    assert 0 < fp8["inter_node_bytes_per_step"] < 0.8 * hier["inter_node_bytes_per_step"]
    assert fp8["val_loss"] == pytest.approx(hier["val_loss"], rel=0.02) and fp8["val_loss"] != hier["val_loss"]
    # resumable: present results are skipped before any process group (rank 0 of the same layout, alone)
    env = {**os.environ, "PYTHONPATH": ROOT, "RANK": "0", "WORLD_SIZE": "4", "LOCMOE_GPUS_PER_NODE": "2",
           "LOCMOE_LINK": "fast"}
    again = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems",
                            "mcore_alltoall,locmoe", *TOY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 2, again.stdout + again.stderr
    # a kept result of another budget is not taken for this one: refused, naming the fix
    other = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems", "locmoe",
                            "--locmoe-budget", "0.1", *TOY], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 1 and "--locmoe-budget None" in other.stderr and "give another --out" in other.stderr
    rep = subprocess.run([sys.executable, "benchmarks/e2e_report.py", str(tmp_path),
                          "--calibration", str(tmp_path / "cal")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    from locmoe_plugin.projection.calibration import load_calibration

    cal = load_calibration(str(tmp_path / "cal" / "calibration_2x2_fast.json"))  # what locmoe project reads
    assert cal.inter_node["bandwidth_GBps"] > 0 and cal.inter_node["flat_GBps"] > 0 and cal.fixed_ms_multi_node
    for s in systems:
        assert f"2x2_fast   {s} " in rep.stdout
    assert "link 2x2_fast: all-to-all inter-node" in rep.stdout and "with every remote rank a peer" in rep.stdout
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiproc
def test_bench_e2e_locmoe_budget_override(tmp_path):
    """--locmoe-budget sets the cross-node budget of LocMoE's routing and is recorded; TopK routing ignores it."""
    out = _run(tmp_path, "locmoe,locmoe_topk", extra=["--locmoe-budget", "0.05"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "e2e_2x2_fast_locmoe.json").read_text())
    topk = json.loads((tmp_path / "e2e_2x2_fast_locmoe_topk.json").read_text())
    assert r["locmoe_budget"] == 0.05 and topk["locmoe_budget"] is None
    # at the default budget (0.2) this toy run crosses at about 0.2; TopK routing, blind to placement, at about 0.5
    assert r["cross_node_share"] <= 0.1 < topk["cross_node_share"]


@pytest.mark.multiproc
def test_bench_e2e_microbatches(tmp_path):
    """--microbatches 2: the step's two sequences per rank as two micro-batches through megatron-core's schedule
    (gradients accumulated, reduced after the last): the same training as one batch of both (equal halves, so the
    same mean gradient up to the aux loss's per-micro-batch terms), under its own variant name."""
    systems = ("mcore_alltoall", "locmoe_topk")  # routings that do not adapt per forward (no budget controller)
    for extra in (["--microbatches", "2"], []):
        out = _run(tmp_path, ",".join(systems), extra=extra)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for system in systems:
        two = json.loads((tmp_path / f"e2e_2x2_fast_{system}+mb2.json").read_text())
        one = json.loads((tmp_path / f"e2e_2x2_fast_{system}.json").read_text())
        _check(one, system)
        _check(two, system, variant=f"{system}+mb2")
        assert (two["microbatches"], two["micro_batch_size"], one["microbatches"], one["micro_batch_size"]) == (2, 1, 1, 2)
        assert two["ep_overlap"] == one["ep_overlap"] == "off" and two["tokens_per_step"] == one["tokens_per_step"]
        assert two["train_loss_measured"] == pytest.approx(one["train_loss_measured"], rel=2e-3), system
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-3), system


@pytest.mark.multiproc
def test_bench_e2e_deepspeed(tmp_path):
    out = _run(tmp_path, "deepspeed_moe", extra=["--manual-gc"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check(json.loads((tmp_path / "e2e_2x2_fast_deepspeed_moe.json").read_text()), "deepspeed_moe", manual_gc=True)


def test_bench_e2e_rejects_mixed_launch_and_bad_measure():
    for extra in (["--systems", "mcore_alltoall,deepspeed_moe"], ["--steps", "4", "--measure", "4"],
                  ["--systems", "megatron"], ["--grad-reduce", "bf16", "--dtype", "fp32"], ["--grad-reduce", "fp16"],
                  ["--grad-reduce", "fp32,fp32"], ["--steps", "10", "--measure", "4", "--warmup", "7"],
                  ["--warmup", "0"], ["--optimizer", "zero1"], ["--optimizer", "distributed,distributed"],
                  ["--optimizer", ","], ["--locmoe-budget", "1.5"], ["--locmoe-budget", "-0.1"],
                  ["--systems", "mcore_alltoall,locmoe_topk", "--locmoe-budget", "0.1"],
                  ["--ep-overlap", "1f1b"], ["--ep-overlap", "1f1b", "--microbatches", "2", "--dtype", "fp32"],
                  ["--ep-overlap", "on"], ["--microbatches", "3"], ["--microbatches", "0"],
                  ["--systems", "deepspeed_moe", "--microbatches", "2"]):
        r = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", "/nonexistent", *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 2 and "error:" in r.stderr


@pytest.mark.multiproc
def test_bench_e2e_allgather_system_on_one_node_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems", "locmoe,locmoe_allgather",
           "--corpus", os.path.join(ROOT, "README.md"), "--grouped-experts", "locmoe", *TOY]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = {s: json.loads((tmp_path / f"e2e_1x4_{s}.json").read_text()) for s in ("locmoe", "locmoe_allgather")}
    for r in res.values():
        assert r["layout"] == "1x4" and math.isfinite(r["val_loss"]) and r["inter_node_bytes_per_step"] == 0
        assert r["grouped_experts"] is True  # LocMoEGroupedMLP experts
    # the same model, routing and batches: the dispatchers differ only in the sums' order
    assert res["locmoe_allgather"]["val_loss"] == pytest.approx(res["locmoe"]["val_loss"], rel=1e-3)
    # across nodes it is refused before any process group, naming the fix
    env.update(RANK="0", WORLD_SIZE="4", LOCMOE_GPUS_PER_NODE="2", LOCMOE_LINK="fast")
    r = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems",
                        "locmoe_allgather", *TOY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "locmoe_allgather needs an EP group inside one node (2x2_fast spans 2)" in r.stderr


def test_bench_e2e_refuses_the_distributed_optimizer_on_cpu(tmp_path):
    """megatron-core's distributed optimizer takes CUDA parameters: refused on CPU before any process group."""
    env = {**os.environ, "PYTHONPATH": ROOT, "RANK": "0", "WORLD_SIZE": "1", "LOCMOE_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--out", str(tmp_path), "--systems", "locmoe",
                        "--optimizer", "replicated,distributed", *TOY], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "on CPU use --optimizer replicated" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, not even the replicated variant


def _row(system, grad, layout, k_tokens):
    """A result as bench_e2e.py writes it, with only what the report reads."""
    nodes = 1 if layout == "1x4" else 2
    phases = {p: 1.0 for p in ("attention", "router", "dispatch", "experts", "combine")}
    return {"system": system, "variant": system + ("+bf16grad" if grad == "bf16" else ""), "grad_reduce": grad,
            "layout": layout, "nodes": nodes, "world": 4, "tokens_per_s": {"median": k_tokens * 1e3,
            "min": k_tokens * 1e3, "max": k_tokens * 1e3}, "val_loss": 3.0, "cross_node_share": 0.2,
            "inter_node_bytes_per_step": 0.0, "peak_memory_gib": None, "measured_steps": 2, "steps": 5,
            "tokens_per_step": 256, "bandwidth": {"inter_node_gbps": 1.0, "intra_node_gbps": 2.0},
            "breakdown_ms": {"forward": phases, "backward": phases, "grad_sync": 0.0, "optimizer": 0.0,
                             "total": 10.0, "inter_node_wait_share": 0.5}}


def test_e2e_report_compares_like_gradient_reductions(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import e2e_report

    rows = [_row("mcore_alltoall", "fp32", "1x4", 100), _row("locmoe", "fp32", "1x4", 120),
            _row("mcore_alltoall", "bf16", "1x4", 110), _row("locmoe", "bf16", "1x4", 150),
            _row("mcore_alltoall", "fp32", "2x2_fast", 20), _row("locmoe", "fp32", "2x2_fast", 48),
            _row("mcore_alltoall", "bf16", "2x2_fast", 25), _row("locmoe", "bf16", "2x2_fast", 75)]
    lines = {tuple(line.split()[:2]): line.split() for line in e2e_report.table(rows).splitlines()}
    # x a2a against the alltoall run with the same reduction; scaling against the same variant's one node
    assert lines[("2x2_fast", "locmoe")][4:6] == ["2.40", "40"]
    assert lines[("2x2_fast", "locmoe+bf16grad")][4:6] == ["3.00", "50"]
    assert lines[("1x4", "locmoe+bf16grad")][4] == "1.36"
    # load() orders a layout's default-reduction rows (DeepSpeed's own included) before the bf16 ones
    ds = {**_row("deepspeed_moe", "fp32", "1x4", 90), "variant": "deepspeed_moe", "grad_reduce": "deepspeed"}
    for i, r in enumerate([*reversed(rows), ds]):
        (tmp_path / f"e2e_{i}.json").write_text(json.dumps(r))
    assert [(r["layout"], e2e_report.variant(r)) for r in e2e_report.load(str(tmp_path))][:5] == [
        ("1x4", "mcore_alltoall"), ("1x4", "deepspeed_moe"), ("1x4", "locmoe"), ("1x4", "mcore_alltoall+bf16grad"),
        ("1x4", "locmoe+bf16grad")]
    # older results without a variant read as the default reduction
    old = {k: v for k, v in _row("locmoe", "fp32", "1x4", 120).items() if k not in ("variant", "grad_reduce")}
    assert e2e_report.variant(old) == "locmoe"
    # the link line: the rail's rate, and the all-peers rate where the run measured it
    peers = {**rows[5], "bandwidth": {**rows[5]["bandwidth"], "inter_node_all_peers_gbps": 1.6}}
    assert ("link 2x2_fast: all-to-all inter-node 1.00 GB/s (1.60 GB/s with every remote rank a peer), "
            "intra-node 2.00 GB/s per rank") in e2e_report.table([peers])
    assert "link 2x2_fast: all-to-all inter-node 1.00 GB/s, intra-node" in e2e_report.table(rows)
    # the rate the step's cross-node all-to-alls reached: bytes per rank and step over their time in the profile
    moved = {**rows[5], "inter_node_bytes_per_step": 4 * 3e9,
             "breakdown_ms": {**rows[5]["breakdown_ms"], "inter_node_all_to_all": 1500.0}}
    assert e2e_report.table([moved]).splitlines()[1].split()[-1] == "2.00"
    assert lines[("1x4", "locmoe")][-1] == "-" and lines[("2x2_fast", "locmoe")][-1] == "-"  # one node; not timed


def test_manual_collection_is_restored_after_an_error_and_the_report_sums_passes():
    import gc

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import e2e_report
    from manual_gc import automatic_collection

    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="step failed"):
        with automatic_collection(off=True):
            assert not gc.isenabled()
            raise RuntimeError("step failed")
    assert gc.isenabled()  # restored: the next system's steps collect automatically again
    with automatic_collection(off=False):
        assert gc.isenabled()
    row = {**_row("locmoe", "fp32", "1x4", 100), "gc_collections_steps": [[4, 0, 0], [0, 4, 1]]}
    assert e2e_report._gc(row) == "4/4/1"
    assert e2e_report._gc({**row, "manual_gc": True}) == "4/4/1m"
    assert e2e_report._gc(_row("locmoe", "fp32", "1x4", 100)) == "-"  # older results: not recorded
