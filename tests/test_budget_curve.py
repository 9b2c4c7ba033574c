"""The budget-curve runner (resumable pieces, one port and host-id prefix per parallel slot) and its report
(paired differences, spread, ratios) on hand-made job files."""

import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
QUALITY = os.path.join(HERE, "..", "benchmarks", "quality")


def _load(name):
    sys.path.insert(0, QUALITY)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(QUALITY, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(QUALITY)


def _job(base, loc, cross, ms_loc, ms_a2a, budget, seed, mib_loc=10.0, mib_a2a=100.0, lam=0.5, mechanism=None,
         warmup=None, mu=None, expert_bias=None, dispatch_format=None):
    meta = {"seed": seed, "budget": budget, "device": "test", "ranks": 4, "nodes": 2, "gpus_per_node": 2}
    if dispatch_format is not None:
        meta["dispatch_format"] = dispatch_format
    if mu is not None:
        meta["mu"] = {"dense": mu}
    if expert_bias is not None:
        meta["expert_bias_rate"] = expert_bias
    if mechanism:
        meta["budget_mechanism"] = mechanism
    if warmup is not None:
        meta["budget_warmup"] = warmup
    return {"meta": meta,
            "training": [{"gate": "dense", "val_lm_loss": loc, "val_cross_node_share": cross,
                          "cross_node_share_last10": cross, "budget_strength": lam},
                         {"gate": "topk", "val_lm_loss": base, "val_cross_node_share": 0.5,
                          "cross_node_share_last10": 0.5}],
            "systems": {"locmoe_dense": {"ms": ms_loc, "cross_node_share": cross, "inter_node_MiB": mib_loc},
                        "mcore_alltoall": {"ms": ms_a2a, "cross_node_share": 0.5, "inter_node_MiB": mib_a2a}}}


def test_dry_run_lists_pending_jobs_with_own_ports(tmp_path, capsys):
    run = _load("run_budget_curve")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "budget-off_seed-1.json").write_text("{}")  # finished: skipped
    assert run.parse([str(tmp_path)]).mechanism == run.DEFAULT_BUDGET_MECHANISM
    assert run.main([str(tmp_path), "--budgets", "off,0.2,0", "--seeds", "1,2", "--parallel", "2", "--dry-run",
                     "--mechanism", "loss", "--", "--iters", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("budget curve: 5 job(s) pending of 6")
    cmds = dict(line.split(": ", 1) for line in lines[1:])
    assert sorted(cmds) == ["budget-0-loss_seed-1", "budget-0-loss_seed-2", "budget-0.2-loss_seed-1",
                            "budget-0.2-loss_seed-2", "budget-off_seed-2"]
    assert "--budget 0.2 --budget-mechanism loss " in cmds["budget-0.2-loss_seed-1"]
    assert "--budget" not in cmds["budget-off_seed-2"]
    assert "--seed 2 " in cmds["budget-off_seed-2"] and cmds["budget-0-loss_seed-2"].endswith("--iters 3")
    ports = {c.split("--master-port ")[1].split()[0] for c in cmds.values()}
    prefixes = {c.split("--hostid-prefix ")[1].split()[0] for c in cmds.values()}
    assert len(ports) == 2 and len(prefixes) == 2  # one per parallel slot
    with pytest.raises(SystemExit):
        run.main([str(tmp_path), "--budgets", "1.5", "--dry-run"])


def test_points_with_a_warmup(tmp_path, capsys):
    run = _load("run_budget_curve")
    assert run.parse_point("0.1") == (0.1, 0, 0, 0, None, "native")
    assert run.parse_point(" off ") == (None, 0, 0, 0, None, "native")
    assert run.parse_point("0.1:warmup=300") == (0.1, 300, 0, 0, None, "native")
    assert run.parse_point("0:warmup=0") == (0.0, 0, 0, 0, None, "native")
    for bad in ("0.1:warmup=-3", "0.1:warmup=1.5", "0.1:ramp=300", "0.1:warmup", "off:warmup=300", "2:warmup=3",
                "0.1:mu=-1", "0.1:mu=nan", "0.1:expert_bias=x", "0.1:mu"):
        with pytest.raises(SystemExit):
            run.parse_point(bad)
    (tmp_path / "jobs").mkdir()
    # a finished job of an earlier curve, named before warm-ups existed: still found, so not run again
    (tmp_path / "jobs" / "budget-0.1-selection_seed-1.json").write_text("{}")
    assert run.main([str(tmp_path), "--budgets", "0.1,0.1:warmup=300,0.1:warmup=450,0.1:warmup=0", "--seeds", "1",
                     "--parallel", "3", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("budget curve: 2 job(s) pending of 3")  # 0.1 and 0.1:warmup=0: one point
    cmds = dict(line.split(": ", 1) for line in lines[1:])
    assert sorted(cmds) == ["budget-0.1-selection-warmup-300_seed-1", "budget-0.1-selection-warmup-450_seed-1"]
    assert "--budget 0.1 --budget-mechanism selection --budget-warmup 300" in cmds["budget-0.1-selection-warmup-300_seed-1"]


def test_points_with_a_locality_loss_and_the_expert_bias(tmp_path, capsys):
    run = _load("run_budget_curve")
    assert run.split_points("off, 0.1:mu=0.01,expert_bias=0.001,0.2,0.1:warmup=3") == [
        "off", "0.1:mu=0.01,expert_bias=0.001", "0.2", "0.1:warmup=3"]
    assert run.parse_point("0.1:mu=0.01,expert_bias=0.001") == run.Point(0.1, mu=0.01, expert_bias=0.001)
    assert run.parse_point("off:mu=0.01") == run.Point(None, mu=0.01)
    assert run.main([str(tmp_path), "--budgets", "0.1,0.1:mu=0.01,0.1:mu=0.01,expert_bias=0.001,off:mu=0.01",
                     "--seeds", "1", "--parallel", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("budget curve: 4 job(s) pending of 4")
    cmds = dict(line.split(": ", 1) for line in lines[1:])
    assert sorted(cmds) == ["budget-0.1-selection-mu-0.01-eb-0.001_seed-1", "budget-0.1-selection-mu-0.01_seed-1",
                            "budget-0.1-selection_seed-1", "budget-off-mu-0.01_seed-1"]
    assert "--mu 0 " in cmds["budget-0.1-selection_seed-1"] and "--expert-bias-rate" not in cmds["budget-0.1-selection_seed-1"]
    both = cmds["budget-0.1-selection-mu-0.01-eb-0.001_seed-1"]
    assert "--mu 0.01 " in both and "--expert-bias-rate 0.001" in both and "--budget 0.1 " in both
    assert "--mu 0.01 " in cmds["budget-off-mu-0.01_seed-1"] and "--budget " not in cmds["budget-off-mu-0.01_seed-1"]


def test_points_with_their_own_mechanism(tmp_path, capsys):
    run = _load("run_budget_curve")
    assert run.parse_point("0.3:mechanism=node,expert_bias=0.001") == run.Point(0.3, expert_bias=0.001,
                                                                               mechanism="node")
    for bad in ("0.3:mechanism=price", "off:mechanism=node"):
        with pytest.raises(SystemExit):
            run.parse_point(bad)
    # one command mixes mechanisms; a point naming the default mechanism is the same job as one without
    assert run.main([str(tmp_path), "--budgets", "0.2,0.2:mechanism=selection,0.3:mechanism=node,expert_bias=0.001",
                     "--seeds", "1", "--parallel", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("budget curve: 2 job(s) pending of 2")
    cmds = dict(line.split(": ", 1) for line in lines[1:])
    assert sorted(cmds) == ["budget-0.2-selection_seed-1", "budget-0.3-node-eb-0.001_seed-1"]
    assert "--budget-mechanism node " in cmds["budget-0.3-node-eb-0.001_seed-1"]
    assert cmds["budget-0.2-selection_seed-1"].endswith("--budget-mechanism selection")


def test_report_rows_for_the_locality_loss_and_the_expert_bias(tmp_path):
    rep = _load("budget_report")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    files = {"budget-0.1-selection_seed-1": _job(2.00, 2.04, 0.1, 2.0, 10.0, 0.1, 1, mu=0.0),
             "budget-0.1-selection-mu-0.01_seed-1": _job(2.00, 2.02, 0.1, 2.0, 10.0, 0.1, 1, mu=0.01),
             "budget-0.1-selection-mu-0.01-eb-0.001_seed-1": _job(2.00, 2.01, 0.1, 2.0, 10.0, 0.1, 1, mu=0.01,
                                                                   expert_bias=0.001)}
    for name, data in files.items():
        (jobs / f"{name}.json").write_text(json.dumps(data))
    assert rep.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "curve.json").read_text())
    labels = {rep.row_label(r): r["dval_pct"] for r in s["rows"]}
    assert labels == {"0.1 selection": pytest.approx([2.0]), "0.1 selection mu0.01": pytest.approx([1.0]),
                      "0.1 selection mu0.01 eb0.001": pytest.approx([0.5])}
    table = (tmp_path / "table.txt").read_text()
    assert "0.1 selection mu0.01 eb0.001" in table and "ebR: loss-free balancing" in table


def test_points_with_a_dispatch_format(tmp_path, capsys):
    run, rep = _load("run_budget_curve"), _load("budget_report")
    assert run.parse_point("0.2:format=fp8") == run.Point(0.2, dispatch_format="fp8")
    assert run.parse_point("0.2:format=native") == run.Point(0.2)
    with pytest.raises(SystemExit):
        run.parse_point("0.2:format=fp4")
    assert run.main([str(tmp_path), "--budgets", "0.2,0.2:format=fp8,0.2:format=int8", "--seeds", "1",
                     "--parallel", "3", "--dry-run"]) == 0
    cmds = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert sorted(cmds) == ["budget-0.2-selection-fmt-fp8_seed-1", "budget-0.2-selection-fmt-int8_seed-1",
                            "budget-0.2-selection_seed-1"]
    assert "--dispatch-format fp8" in cmds["budget-0.2-selection-fmt-fp8_seed-1"]
    assert "--dispatch-format" not in cmds["budget-0.2-selection_seed-1"]
    jobs = tmp_path / "jobs"  # made by the dry run
    for name, loc, fmt in (("budget-0.2-selection_seed-1", 2.02, None),  # a job from before formats: native
                           ("budget-0.2-selection-fmt-fp8_seed-1", 2.03, "fp8")):
        (jobs / f"{name}.json").write_text(json.dumps(_job(2.00, loc, 0.2, 2.0, 10.0, 0.2, 1, dispatch_format=fmt)))
    assert rep.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "curve.json").read_text())
    assert {rep.row_label(r): r["dval_pct"] for r in s["rows"]} == {"0.2 selection": pytest.approx([1.0]),
                                                                   "0.2 selection fp8": pytest.approx([1.5])}
    assert "fp8 / int8: the LocMoE layer sent token rows" in (tmp_path / "table.txt").read_text()


def test_report_pairs_by_job_and_reports_the_spread(tmp_path):
    rep = _load("budget_report")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    # baseline 2.00 / 2.02 (seed 1 twice: 2.00 and 2.00), LocMoE +1 % and +3 % at budget 0.1; off: +0 %
    files = {"budget-0.1_seed-1": _job(2.00, 2.02, 0.1, 2.0, 10.0, 0.1, 1),
             "budget-0.1_seed-2": _job(2.02, 2.0806, 0.12, 3.0, 10.0, 0.1, 2),
             "budget-off_seed-1": _job(2.00, 2.00, 0.5, 8.0, 10.0, None, 1, mib_loc=80.0, lam=None),
             # the other mechanism at the same budget: a row of its own
             "budget-0.1-loss_seed-1": _job(2.00, 2.01, 0.08, 2.0, 10.0, 0.1, 1, mechanism="loss"),
             # a warm-up: a row of its own; warm-up 0 recorded joins the jobs from before it was recorded
             "budget-0.1-selection-warmup-300_seed-1": _job(2.00, 2.004, 0.1, 2.0, 10.0, 0.1, 1, warmup=300),
             "budget-0.1-selection-warmup-300_seed-2": _job(2.02, 2.0402, 0.1, 2.0, 10.0, 0.1, 2, warmup=300),
             "budget-0.1-selection_seed-3": _job(2.00, 2.04, 0.1, 2.5, 10.0, 0.1, 3, warmup=0)}
    for name, data in files.items():
        (jobs / f"{name}.json").write_text(json.dumps(data))
    (jobs / "budget-0_seed-1.tmp.json").write_text("not json: an unfinished job is ignored")
    assert rep.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "curve.json").read_text())
    off, b01_loss, b01, b01_w300 = s["rows"]
    assert off["budget"] is None and off["dval_mean"] == pytest.approx(0.0)
    assert b01_loss["mechanism"] == "loss" and b01_loss["dval_pct"] == pytest.approx([0.5])
    assert b01["mechanism"] == "selection" and b01["warmup"] == 0  # jobs without the entries: selection, none
    assert b01["dval_pct"] == pytest.approx([1.0, 3.0, 2.0])
    assert b01["dval_mean"] == pytest.approx(2.0) and b01["dval_std"] == pytest.approx(1.0)
    assert b01["dval_worst"] == pytest.approx(3.0)
    assert b01["time_ratio"] == pytest.approx(0.25) and b01["bytes_ratio"] == pytest.approx(0.1)
    assert b01["val_cross"] == pytest.approx(0.32 / 3)
    assert b01_w300["warmup"] == 300 and b01_w300["dval_pct"] == pytest.approx([0.2, 1.0])
    assert s["baseline_spread_pct"] == pytest.approx(100 * 0.02 / ((2.00 + 2.02 + 2.00) / 3))  # per-seed means
    assert s["baseline_repeat_pct"] == pytest.approx(0.0)
    table = (tmp_path / "table.txt").read_text()
    assert "0.1 selection     3       +2.00" in table and "90.0%" in table and "0.1 loss     1" in table
    assert "0.1 selection w300     2       +0.60" in table and "wS: the budget's target fell" in table
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curve.png").stat().st_size > 1000
