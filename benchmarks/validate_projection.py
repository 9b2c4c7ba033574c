"""Check ``locmoe project`` against measured runs, leave-one-out.

Layer runs (``bench_layer.py``): each run across emulated nodes (``layer_2nodes_<G>gpu.json``: 2 x 2 from 4
GPUs, 2 x 1 from 2; ``layer_4nodes_<G>gpu.json``: 4 x 1 from 4) is predicted from the same call's one-node run on the same G GPUs (``layer_1node_<G>gpu.json``;
calibration: expert GEMM rate, NVLink bandwidth, fixed per-layer costs) plus that call's measured
inter-node link (the probe's bandwidth, latency and duplex: the median over its samples where the run
probed the link repeatedly during its timing, ``meta.inter_node_link.samples``; else its one probe). Nothing else measured on the layout
across nodes enters, except the routing the run produced (cross-node share, the busiest rank's expert rows and its
cross-node bytes over the mean). Where the call also timed the 2-node plan on its one node's links
(``layer_plan2nodes_<G>gpu.json``, ``run_gpu_layer.sh`` ``LAYOUTS=plan2nodes``), LocMoE's cost across 2 nodes
comes from that run instead of the one-node run plus the two-stage plan's host figure.

Dispatch runs (``bench_dispatch.py``, ``overlap_2x<R>_socket*.json``): each 2-node row is predicted from the
one-node run's time of the same system (``overlap_1x<G>.json``), the two-stage plan's host cost, and the
run's own link probe where it has one (``bench_dispatch.py --probe-link``: median bandwidth and latency
over its samples), else the link figure of ``locmoe bandwidth`` at that link setting
(``bandwidth_slow.txt`` for ``_socket``, ``bandwidth_fast.txt`` for ``_socket8``) with the layer probe's
latency. Systems with a dispatch format (``hierarchical_fp8``, ...) are priced with that format from the
one-node row of the same system; the encoding's time is in that row only where the one-node dispatcher
encoded (commit ``b5f15df``; later the format is a no-op on one node and the encoding goes unpriced).

The summary counts runs with a repeated probe apart from those with a one-shot probe: a one-shot probe
can be off from what the timed layers saw (every baseline of such a call misses in the same direction).

Each prediction also shows the held-out run's own spread over its timing rounds (``ms_rounds``, half the
interquartile range over the median, where recorded): an error inside it is inside the measurement's
round-to-round noise. Usage, from the repo root (any number of result folders, each searched
recursively; default ``benchmarks/results``):

    python benchmarks/validate_projection.py [FOLDER ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from locmoe_plugin.projection import ClusterSpec, ModelSpec, RoutingSpec, predict_layer  # noqa: E402
from locmoe_plugin.projection.cost import dense_grad_reduce_ms  # noqa: E402
from locmoe_plugin.projection.calibration import (calibration_from_layer_results, inter_link,  # noqa: E402
                                                   two_stage_extra_ms)
from bench_dispatch import split_format  # noqa: E402  (bench_dispatch's system names with a format suffix)
from bench_e2e import DISPATCH_FORMAT, GRAD_REDUCE, OPTIMIZER  # noqa: E402  (the end-to-end results' variant suffixes)

# The emulated nodes' link (launch/emulate_nodes.sh: NCCL's socket transport over loopback) where a run
# did not measure its duplex: every byte sent or received is a copy by the same host, one budget for both
# directions.
EMULATED_DUPLEX = "shared"

SYSTEMS = {"mcore_alltoall": "megatron_alltoall", "mcore_allgather": "megatron_allgather",
           "mcore_grouplimited": "megatron_group_limited", "deepspeed_moe": "deepspeed_moe",
           "locmoe_grap": "locmoe_hier", "locmoe_dense": "locmoe_hier",
           # our DeepSpeed layer without its overlap: LocMoE's dispatcher at the router's own share (no budget)
           "locmoe_ds_no_overlap": "locmoe_hier",
           # the same with the split-by-origin overlap (runs that record "overlap": true; earlier ones timed
           # a chunked overlap that is gone), and LocMoELayer with it inside Megatron's six phases
           "locmoe_ds": "locmoe_hier_overlap", "locmoe_overlap": "locmoe_hier_overlap_phases"}
# bench_dispatch system -> model system, and whether it runs the two-stage plan across nodes; a system with a
# format suffix (bench_dispatch's ``hierarchical_fp8``) is its base system with ModelSpec.dispatch_format set
DISPATCH_SYSTEMS = {"hierarchical": ("locmoe_hier", True), "overlap": ("locmoe_hier", True),
                    "overlap_phases": ("locmoe_hier", True), "flat": ("locmoe_flat", False)}
# overlap run name suffix -> `locmoe bandwidth` file of the same link setting (run_gpu_overlap.sh)
LINK_FILES = {"socket": "bandwidth_slow.txt", "socket8": "bandwidth_fast.txt"}


def dispatch_system(name: str) -> tuple[str | None, bool, str]:
    """bench_dispatch system name -> (model system or None, two-stage plan, dispatch format)."""
    base, fmt = split_format(name)
    system, two_stage = DISPATCH_SYSTEMS.get(base, (None, False))
    return system, two_stage, fmt


def two_node_results(run_dir: str, one_node: dict, gpus: int) -> dict | None:
    """The run's 2-node result dict: its JSON, or (old 4-GPU runs) the per-system JSON lines and the link
    line of its log."""
    path = os.path.join(run_dir, f"layer_2nodes_{gpus}gpu.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log = os.path.join(run_dir, "layer_2nodes.log")
    if gpus != 4:
        return None
    if not os.path.exists(log):
        return None
    systems, bw = {}, None
    for line in open(log):
        m = re.match(r"\s+(\w+): (\{.*\})\s*$", line)
        if m:
            systems[m.group(1)] = json.loads(m.group(2))
        m = re.search(r"inter-node bw ([\d.]+) GB/s per rank", line)
        if m:
            bw = float(m.group(1))
    if not systems or bw is None:
        return None
    meta = dict(one_node["meta"], nodes=2, gpus_per_node=2, inter_node_bw_GBps=bw)
    return {"meta": meta, "systems": systems}


def busiest_inter_ratio(v: dict, bw_GBps: float, ranks: int) -> float:
    """The busiest rank's cross-node bytes sent over the mean rank's: from the per-rank counts
    (``inter_bytes_per_rank["dispatch"]``: what each rank sends in dispatch) where recorded, else from the
    recorded floor (floor_inter_ms = 2 x (max dispatch + max combine bytes) / bw); 1 where neither is
    recorded or nothing crosses."""
    per = v.get("inter_bytes_per_rank")
    if per:
        sent = per["dispatch"]
        mean = sum(sent) / len(sent)
        return max(1.0, max(sent) / mean) if mean > 0 else 1.0
    mean = v.get("inter_node_MiB", 0.0) * 2**20 / ranks
    if "floor_inter_ms" not in v or mean <= 0:
        return 1.0
    busiest = v["floor_inter_ms"] / 1e3 * bw_GBps * 1e9 / 2
    return max(1.0, busiest / mean)


def measured_pairs_per_copy(v: dict, model: ModelSpec, topk: int, ranks: int) -> float | None:
    """A LocMoE row's cross-node pairs per inter-node row of the hierarchical plan (``RoutingSpec.pairs_per_copy``):
    the share's pairs per rank (share x top-k x tokens) over the mean rank's rail rows (its dispatch bytes over
    hidden x element size). The mean dispatch bytes come from the per-rank counts where recorded, else from the
    run's total (``inter_node_MiB``: every rank's dispatch + combine cross-node bytes of one forward; combine
    returns the dispatched rows, so half of it is dispatch); None where neither is recorded or nothing crossed.
    On 2 nodes a token's remote pairs all lie on the one other node, so this gives the rail rows exactly."""
    per = v.get("inter_bytes_per_rank")
    share = v.get("cross_node_share", 0.0)
    if share <= 0:
        return None
    if per:
        sent = sum(per["dispatch"]) / len(per["dispatch"])
    elif v.get("inter_node_MiB", 0.0) > 0:
        sent = v["inter_node_MiB"] * 2**20 / ranks / 2
    else:
        return None
    rows = sent / (model.hidden * model.elt)
    return max(1.0, share * topk * model.tokens_per_rank / rows)


DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def as_roots(roots) -> list[str]:
    """One result folder or a list of them, as a list without repeats (order kept)."""
    roots = [roots] if isinstance(roots, str) else list(roots)
    return list(dict.fromkeys(os.path.normpath(r) for r in roots))


def find(roots, pattern: str) -> list[tuple[str, str]]:
    """``(root, path)`` of every file named ``pattern`` under each root (recursively), each path once."""
    seen, out = set(), []
    for root in as_roots(roots):
        for path in sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True)):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                out.append((root, path))
    return out


def run_name(root: str, path: str) -> str:
    """``path`` relative to the folder it was found under; a folder given as the run itself is named by its
    own name."""
    rel = os.path.relpath(path, root)
    return os.path.basename(os.path.abspath(root)) if rel == "." else rel


def round_spread(v: dict) -> float | None:
    """Half the interquartile range of a system's timing rounds (``ms_rounds``) over their median: the
    run's own round-to-round noise; None where fewer than 3 rounds are recorded."""
    rounds = sorted(v.get("ms_rounds") or [])
    if len(rounds) < 3:
        return None
    med = _quantile(rounds, 0.5)
    return (_quantile(rounds, 0.75) - _quantile(rounds, 0.25)) / 2 / med if med > 0 else None


def _quantile(xs: list[float], f: float) -> float:
    """Linear-interpolation quantile of sorted ``xs`` (numpy's default)."""
    pos = f * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def two_stage_under(roots, topk: int) -> float | None:
    """:func:`two_stage_extra_ms` over every one-node ``bench_dispatch.py`` JSON (``dispatch_1node_*.json``)
    under ``roots`` (each searched recursively), each distinct file once (a call's one-node files are copied
    beside each of its 2-node runs); None where none has ``hier_tree`` rows at ``topk``."""
    res, seen = [], set()
    for _, path in find(roots, "dispatch_1node_*.json"):
        with open(path, "rb") as f:
            raw = f.read()
        if raw not in seen:
            seen.add(raw)
            res.append(json.loads(raw))
    return two_stage_extra_ms(res, topk)


def dispatch_two_stage_ms(roots, topk: int) -> float | None:
    """The two-stage plan's extra host time on one node from the one-node dispatch runs under ``roots``
    (:func:`two_stage_under`); where none has them, from those under the repository's
    ``benchmarks/results`` (one-node runs only: no held-out layout enters)."""
    got = two_stage_under(roots, topk)
    return got if got is not None else two_stage_under(DEFAULT_ROOT, topk)


def plan2nodes_results(run_dir: str, gpus: int) -> dict | None:
    """The call's run of the 2-node plan on one node's links (``run_gpu_layer.sh`` ``LAYOUTS=plan2nodes``:
    ``layer_plan2nodes_<G>gpu.json``), or None."""
    path = os.path.join(run_dir, f"layer_plan2nodes_{gpus}gpu.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def plan2nodes_fixed_ms(plan2: dict, name: str) -> float | None:
    """LocMoE's fixed cost per layer across 2 nodes from the 2-node plan timed on one node's links: the row
    ``name`` (or the first LocMoE row, as :func:`calibration_from_layer_results` picks it) less the model's GEMM
    and payload terms at that run's own links; None where that run has no LocMoE row."""
    got = calibration_from_layer_results(plan2, fixed_from=name).fixed_ms_multi_node.get("locmoe")
    return None if got is None else float(got)


def row_calibration(one: dict, name: str, bw: float, two_stage: float | None):
    """The one-node calibration with ``name``'s own row setting its fixed cost (the GrAP and dense rows share
    the "locmoe" key and differ in router cost)."""
    return calibration_from_layer_results(one, inter_bw_GBps=bw, two_stage_ms=two_stage, fixed_from=name)


def validate(roots) -> list[dict]:
    """Layer predictions for every one-node / two-node pair under ``roots`` (a folder or a list)."""
    rows = []
    for root, one_path in find(roots, "layer_1node_*gpu.json"):
        run_dir = os.path.dirname(one_path)
        gpus = int(re.search(r"layer_1node_(\d+)gpu\.json$", one_path).group(1))
        with open(one_path) as f:
            one = json.load(f)
        for two in multi_node_results(run_dir, one, gpus):
            rows += predict_run(roots, root, run_dir, one, two)
    return rows


def multi_node_results(run_dir: str, one_node: dict, gpus: int) -> list[dict]:
    """Every run of the same call across emulated nodes on the same G GPUs: 2 nodes
    (:func:`two_node_results`), then 4 nodes x G/4 (``layer_4nodes_<G>gpu.json``, ``LAYOUTS=4nodes``)."""
    runs = [r for r in (two_node_results(run_dir, one_node, gpus),) if r is not None]
    path = os.path.join(run_dir, f"layer_4nodes_{gpus}gpu.json")
    if os.path.exists(path):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def predict_run(roots, root: str, run_dir: str, one: dict, two: dict) -> list[dict]:
    """The layer predictions of one held-out run across nodes (``two``) from its call's one-node run."""
    rows = []
    m, m2 = one["meta"], two["meta"]
    link = inter_link(m2)
    if link is None:
        return rows
    bw = link["bandwidth_GBps"]
    duplex = link.get("duplex")
    # the call's own figure where it measured one (run_gpu_layer.sh TWO_STAGE=1, beside its layer_1node JSON):
    # the host's speed differs between machines, so it is preferred to the median over other runs
    own_two_stage = two_stage_under(run_dir, m["topk"])
    two_stage = own_two_stage if own_two_stage is not None else dispatch_two_stage_ms(roots, m["topk"])
    model = ModelSpec(hidden=m["hidden"], ffn=m["ffn"], experts=m["experts"], topk=m["topk"],
                      tokens_per_rank=m["tokens_per_rank"], dtype=m["dtype"], swiglu=False)
    plan2 = plan2nodes_results(run_dir, m2["ranks"]) if m2["nodes"] == 2 else None
    if plan2 is not None and plan2["meta"].get("gpus_per_node") != m2["gpus_per_node"]:
        plan2 = None  # another split of the GPUs: not this layout's plan
    for name, system in SYSTEMS.items():
        v = two["systems"].get(name)
        if v is None or "ms" not in v or "ms" not in one["systems"].get(name, {}):
            continue
        if name == "locmoe_ds" and v.get("overlap") is not True:
            continue
        cal = row_calibration(one, name, bw, two_stage)
        source, extra = ("own call" if own_two_stage is not None else "other runs"), two_stage
        multi = plan2nodes_fixed_ms(plan2, name) if plan2 is not None and name.startswith("locmoe") else None
        if multi is not None:  # LocMoE across 2 nodes: its plan's own cost on this call's one-node links
            cal = replace(cal, fixed_ms_multi_node={**cal.fixed_ms_multi_node, "locmoe": multi})
            source, extra = "2-node plan on one node", multi - cal.fixed_ms.get("locmoe", 0.0)
        u_x = busiest_inter_ratio(v, bw, m2["ranks"])
        # rows: only where both layouts record them (old one-node runs fold the busiest rank's rows into
        # the calibrated GEMM rate)
        u = max(1.0, v.get("rank_max_over_mean_rows", 1.0)) if "rank_max_over_mean_rows" in one["systems"][name] else 1.0
        variants = [("model", duplex or EMULATED_DUPLEX)]
        if duplex is None and u_x > 1.05:
            variants.append(("full duplex", "full"))
        for label, dup in variants:
            cluster = ClusterSpec(nodes=m2["nodes"], gpus_per_node=m2["gpus_per_node"], intra_bw_GBps=200.0,
                                  intra_latency_us=0.0, inter_bw_GBps=bw, inter_latency_us=0.0,
                                  peak_tflops=1000.0, inter_duplex=dup)
            cal_v = replace(cal, inter_node={**link, "duplex": dup})
            mu = (measured_pairs_per_copy(v, model, m["topk"], m2["ranks"]) if system.startswith("locmoe_hier")
                  else None)
            routing = RoutingSpec(cross_node_share=min(1.0, v["cross_node_share"]), pairs_per_copy=mu,
                                  imbalance=u, inter_imbalance=u_x)
            t = predict_layer(system, cluster, model, routing, cal_v)
            rows.append({"run": run_name(root, run_dir), "spread": round_spread(v), "commit": m2.get("commit") or m.get("commit"),
                         "probe": probe_kind(link, m2["gpus_per_node"]),
                         "layout": f"{m2['nodes']}x{m2['gpus_per_node']}", "latency_us": link["latency_us"],
                         "system": name, "share": v["cross_node_share"], "imbalance": u, "inter_imbalance": u_x,
                         "duplex": dup, "variant": label, "link_GBps": bw,
                         "two_stage_ms": extra if name.startswith("locmoe") else 0.0,
                         "two_stage_source": source,
                         "one_node_ms": one["systems"][name]["ms"], "measured_ms": v["ms"],
                         "predicted_ms": t.layer_ms, "error": t.layer_ms / v["ms"] - 1})
    return rows


def probe_kind(link: dict, gpus_per_node: int | None = None) -> str:
    """"per-pattern" where the layer run's repeated probe also measured the rates the model gives the
    all-gather / reduce-scatter (``collective_GBps``) and, with more than one GPU per node, the all-peers
    all-to-all (``flat_GBps``; with one GPU per node that is the rail); "repeated" where the link figures
    are the median of several probes; else "one-shot". ``gpus_per_node`` None (dispatch rows, whose model
    reads the rail rate only): never "per-pattern"."""
    if link.get("probe_samples", 1) <= 1:
        return "one-shot"
    if gpus_per_node is not None and "collective_GBps" in link and ("flat_GBps" in link or gpus_per_node == 1):
        return "per-pattern"
    return "repeated"


PROBE_LABELS = {"per-pattern": "runs with the per-pattern probe", "repeated": "runs with a repeated probe",
                "one-shot": "one-shot probe"}


def link_figure(path: str) -> float | None:
    """The per-rank inter-node rate a ``locmoe bandwidth`` output file reports (GB/s), or None."""
    if not os.path.exists(path):
        return None
    m = re.search(r"inter-node ([\d.]+) GB/s per rank", open(path).read())
    return float(m.group(1)) if m else None


def probe_latency_us(run_dir: str) -> float:
    """The inter-node latency the same device call's layer probe measured (4 KiB exchange), else 0."""
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "layer_2nodes_*gpu.json"), recursive=True)):
        with open(path) as f:
            link = inter_link(json.load(f)["meta"])
        if link:
            return float(link.get("latency_us", 0.0))
    return 0.0


def validate_dispatch(roots) -> list[dict]:
    """Predict every 2-node ``bench_dispatch.py`` row (per system, cross share and link setting) from the
    one-node run of the same call: ``one-node ms + two-stage host cost (two-stage systems) + 4 x (latency +
    the model's cross-node bytes per rank / link rate)``. bench_dispatch's experts are light and run on both
    layouts, so they sit inside the one-node time; the overlap rows get no overlap credit (the model's
    chunked term pipelines expert GEMMs, which this benchmark barely has)."""
    out = []
    for root, one_path in find(roots, "overlap_1x*.json"):
        odir = os.path.dirname(one_path)
        run_dir = os.path.dirname(odir)
        with open(one_path) as f:
            one = json.load(f)
        if one["meta"].get("nodes", 1) != 1 or not one.get("rows"):
            continue
        one_sys = one["rows"][0]["systems"]
        lat = probe_latency_us(run_dir)
        for two_path in sorted(glob.glob(os.path.join(odir, "overlap_2x*_*.json"))):
            setting = re.search(r"overlap_2x\d+_(\w+)\.json$", two_path).group(1)
            with open(two_path) as f:
                two = json.load(f)
            mt = two["meta"]
            own = inter_link(mt) if mt.get("inter_node_link") else None  # the run's own probe
            if own:
                bw, lat_row, probe = own["bandwidth_GBps"], own["latency_us"], probe_kind(own)
            else:
                bw, lat_row, probe = link_figure(os.path.join(run_dir, LINK_FILES.get(setting, ""))), lat, "one-shot"
            if bw is None:
                continue
            ranks_per_node = mt["ranks"] // mt["nodes"]
            for row in two["rows"]:
                k = row["topk"]
                two_stage = dispatch_two_stage_ms(roots, k) or 0.0
                model = ModelSpec(hidden=mt["hidden"], ffn=1, experts=row["experts"], topk=k,
                                  tokens_per_rank=mt["tokens_per_rank"], dtype=mt["dtype"], swiglu=False)
                cluster = ClusterSpec(nodes=mt["nodes"], gpus_per_node=ranks_per_node, intra_bw_GBps=200.0,
                                      intra_latency_us=0.0, inter_bw_GBps=bw, inter_latency_us=lat_row,
                                      peak_tflops=1000.0, inter_duplex="full")
                routing = RoutingSpec(cross_node_share=min(1.0, row["cross_node_pair_share"]))
                for name, v in row["systems"].items():
                    system, two_stage_plan, fmt = dispatch_system(name)
                    if system is None or "ms" not in v or "ms" not in one_sys.get(name, {}):
                        continue
                    t = predict_layer(system, cluster, replace(model, dispatch_format=fmt), routing)
                    extra = two_stage if two_stage_plan else 0.0
                    pred = one_sys[name]["ms"] + extra + t.comm_ms
                    out.append({"run": run_name(root, two_path), "spread": round_spread(v), "setting": setting, "system": name,
                                "probe": probe, "share": row["cross_node_pair_share"], "link_GBps": bw, "latency_us": lat_row,
                                "two_stage_ms": extra, "one_node_ms": one_sys[name]["ms"],
                                "measured_ms": v["ms"], "predicted_ms": pred, "error": pred / v["ms"] - 1})
    return out


def _summary(rows: list[dict], what: str) -> str:
    errs = [abs(r["error"]) for r in rows]
    out = (f"{what}: mean |error| {100 * sum(errs) / len(errs):.1f} %, max {100 * max(errs):.1f} % over "
           f"{len(errs)} predictions, {sum(e <= 0.15 for e in errs)} within 15 %")
    miss = [r for r in rows if abs(r["error"]) > 0.15]
    noisy = [r for r in miss if r.get("spread") is not None]
    if noisy:
        out += (f"; of the {len(miss)} others, {len(noisy)} have recorded rounds, with a round spread of "
                f"{100 * min(r['spread'] for r in noisy):.0f}-{100 * max(r['spread'] for r in noisy):.0f} %")
    return out


def speedup_lean(rows: list[dict], system: str = "locmoe_dense", baseline: str = "mcore_alltoall") -> list[dict]:
    """Per run holding both rows: the projected speedup of ``system`` over ``baseline`` (predicted baseline /
    predicted system time) against the measured one, and their ratio (> 1: the projection overstates
    the gain). ``rows``: :func:`validate` rows of one variant."""
    runs: dict[str, dict] = {}
    for r in rows:
        runs.setdefault(r["run"], {})[r["system"]] = r
    out = []
    for run, got in sorted(runs.items()):
        a, b = got.get(baseline), got.get(system)
        if a and b:
            pred, meas = a["predicted_ms"] / b["predicted_ms"], a["measured_ms"] / b["measured_ms"]
            out.append({"run": run, "layout": b["layout"], "probe": b["probe"], "link_GBps": b["link_GBps"],
                        "measured": meas, "predicted": pred, "ratio": pred / meas})
    return out


def by_probe(rows: list[dict], what: str) -> list[str]:
    """The summary of each probe kind's runs (:func:`probe_kind`: per-pattern, repeated, one-shot), with the
    runs it covers; the per-pattern line only where a run has that probe."""
    out = []
    for kind, text in PROBE_LABELS.items():
        got = [r for r in rows if r.get("probe", "one-shot") == kind]
        label = f"{what}, {text}"
        if got:
            runs = sorted({r["run"] for r in got})
            out.append(f"  {_summary(got, label)} ({len(runs)} run(s))")
        elif kind != "per-pattern":
            out.append(f"  {label}: no run")
    return out


def _spread(r: dict) -> str:
    return f"{100 * r['spread']:>5.1f}%" if r.get("spread") is not None else f"{'-':>6}"


#: result-name suffix of an end-to-end variant -> the ModelSpec field it changes (bench_e2e.py --grad-reduce,
#: --optimizer); a result without the suffix in the same folder is its pair
DENSE_VARIANTS = {GRAD_REDUCE["bf16"]: ("grad_dtype", "fp32", "bf16"),
                  OPTIMIZER["distributed"]: ("optimizer", "replicated", "distributed")}


def _dense_settings(path: str) -> dict:
    """The ModelSpec fields a result's name sets (its variant suffixes)."""
    name = os.path.basename(path)
    return {field: (changed if suffix in name else default) for suffix, (field, default, changed) in DENSE_VARIANTS.items()}


def _step_ms(r: dict) -> float:
    """An end-to-end result's step time from its median tokens/s, in ms."""
    return r["tokens_per_step"] / r["tokens_per_s"]["median"] * 1e3


def e2e_pairs(roots, pattern: str, base_of):
    """``(root, path, base path, base result, variant result)`` for every end-to-end result matching ``pattern``
    whose pair ``base_of(path)`` exists beside it, of more than one node."""
    for root, path in find(roots, pattern):
        base_path = base_of(path)
        if not os.path.exists(base_path):
            continue
        with open(path) as f:
            var = json.load(f)
        with open(base_path) as f:
            base = json.load(f)
        if base["nodes"] >= 2:
            yield root, path, base_path, base, var


def pair_specs(base: dict, var: dict, **model_fields) -> tuple[float, ClusterSpec, ModelSpec]:
    """``(link GB/s, cluster, model)`` of a pair of end-to-end results: the mean of their measured inter-node
    all-to-all rates, their layout, and the model the base trained (``model_fields``: further ModelSpec fields)."""
    m = base["model"]
    rate = (base["bandwidth"]["inter_node_gbps"] + var["bandwidth"]["inter_node_gbps"]) / 2
    cluster = ClusterSpec(nodes=base["nodes"], gpus_per_node=base["gpus_per_node"], intra_bw_GBps=200.0,
                          intra_latency_us=0.0, inter_bw_GBps=rate, inter_latency_us=0.0, peak_tflops=1000.0)
    model = ModelSpec(hidden=m["hidden_size"], ffn=m["ffn_hidden_size"], experts=m["num_experts"], topk=m["topk"],
                      tokens_per_rank=m["seq_len"] * m["micro_batch"], layers=m["num_layers"],
                      dtype=m.get("dtype", "bf16"), **model_fields)
    return rate, cluster, model


def validate_dense_grads(roots) -> list[dict]:
    """The dense-gradient term against pairs of end-to-end results of one system, layout and folder that differ
    in one dense synchronisation setting: fp32 and bf16 gradient reduction (``bench_e2e.py --grad-reduce
    fp32,bf16``), or the replicated and the distributed optimizer (``--optimizer replicated,distributed``);
    one launch writes both unless a resumed run wrote them apart. The measured step difference (from the median
    tokens/s) against the predicted one, ``dense_grad_reduce_ms`` of the first minus that of the second, at the
    mean of the two results' measured inter-node all-to-all rates. Pairs of more than one node only."""
    rows = []
    for suffix, (field, default, changed) in DENSE_VARIANTS.items():
        base_of = lambda path: os.path.join(os.path.dirname(path), os.path.basename(path).replace(suffix, ""))  # noqa: E731
        for root, path, base_path, base, var in e2e_pairs(roots, f"e2e_*{suffix}*.json", base_of):
            rate, cluster, model = pair_specs(base, var, **_dense_settings(base_path))
            predicted = dense_grad_reduce_ms(cluster, model) - dense_grad_reduce_ms(cluster, replace(model, **{field: changed}))
            rows.append({"run": run_name(root, os.path.dirname(path)), "layout": base["layout"],
                         "system": base.get("variant", base["system"]), "pair": f"{default} - {changed}",
                         "link_GBps": rate, "measured_ms": _step_ms(base) - _step_ms(var), "predicted_ms": predicted,
                         "step_first_ms": _step_ms(base)})
    return rows


def validate_dispatch_format(roots) -> list[dict]:
    """The dispatch-format term against pairs of end-to-end results of one layout and folder: LocMoE with native
    rows (``e2e_<layout>_locmoe.json``) and the same with a codec (``bench_e2e.py`` systems of
    ``DISPATCH_FORMAT``, e.g. ``locmoe_fp8``). The measured step difference (from the median tokens/s) against the
    predicted one, ``locmoe_hier``'s step time native minus with the format, at the native run's cross-node share
    and the mean of the two runs' measured inter-node all-to-all rates. The encoding's own time is not priced
    (a cost the prediction leaves out). Pairs of more than one node only."""
    rows = []
    for system, fmt in DISPATCH_FORMAT.items():
        base_of = lambda path: path[: -len(f"_{system}.json")] + "_locmoe.json"  # noqa: E731
        for root, path, _, base, var in e2e_pairs(roots, f"e2e_*_{system}.json", base_of):
            rate, cluster, model = pair_specs(base, var)
            routing = RoutingSpec(cross_node_share=base["cross_node_share"])
            predicted = (predict_layer("locmoe_hier", cluster, model, routing).step_ms
                         - predict_layer("locmoe_hier", cluster, replace(model, dispatch_format=fmt), routing).step_ms)
            rows.append({"run": run_name(root, os.path.dirname(path)), "layout": base["layout"], "format": fmt,
                         "link_GBps": rate, "share": base["cross_node_share"], "step_native_ms": _step_ms(base),
                         "measured_ms": _step_ms(base) - _step_ms(var), "predicted_ms": predicted})
    return rows


def _ratio_line(what: str, ratios: list[float]) -> str:
    """One summary line of sorted measured / predicted ratios of pairs of runs."""
    return (f"  {what} measured / predicted, median {_quantile(ratios, 0.5):.2f}, quartiles "
            f"{_quantile(ratios, 0.25):.2f}-{_quantile(ratios, 0.75):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f} "
            f"over {len(ratios)} pairs of runs")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="*", default=[DEFAULT_ROOT], metavar="FOLDER",
                   help="result folders, each searched recursively (default: benchmarks/results)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    missing = [r for r in a.roots if not os.path.isdir(r)]
    if missing:
        print(f"not a folder: {missing}; pass folders holding layer_1node_<G>gpu.json and a 2-node run",
              file=sys.stderr)
        return 2
    rows = validate(a.roots)
    if not rows:
        print(f"no run under {a.roots} has both layer_1node_<G>gpu.json and a 2-node result", file=sys.stderr)
        return 1
    print(f"{'run':<46} {'system':<14} {'share':>5} {'x-imb':>5} {'duplex':>6} {'link':>5} {'2-stg':>5} "
          f"{'1-node':>6} {'measured':>8} {'predicted':>9} {'error':>7} {'spread':>6}")
    for r in rows:
        print(f"{r['run']:<46} {r['system']:<14} {r['share']:>5.3f} {r['inter_imbalance']:>5.2f} {r['duplex']:>6} "
              f"{r['link_GBps']:>5.2f} {r['two_stage_ms'] or 0:>5.2f} {r['one_node_ms']:>6.2f} {r['measured_ms']:>8.2f} "
              f"{r['predicted_ms']:>9.2f} {100 * r['error']:>+6.1f}% {_spread(r)}")
    main_rows = [r for r in rows if r["variant"] == "model"]
    print(_summary(main_rows, "layer") + " (first row of each system; the others: the same with a full-duplex link)")
    for layout in sorted({r["layout"] for r in main_rows}):
        print("  " + _summary([r for r in main_rows if r["layout"] == layout], "{} nodes x {}".format(*layout.split("x"))))
    for line in by_probe(main_rows, "layer"):
        print(line)
    lean = [x for x in speedup_lean(main_rows) if x["probe"] == "per-pattern"]
    if lean:
        ratios = [x["ratio"] for x in lean]
        print(f"  LocMoE's speedup over Megatron alltoall, projected / measured, runs with the per-pattern probe: "
              f"{min(ratios):.2f}-{max(ratios):.2f} x over {len(lean)} run(s) ("
              + ", ".join(f"{x['layout']} {x['link_GBps']:.2f} GB/s {x['ratio']:.2f}" for x in lean) + ")")
    drows = validate_dispatch(a.roots)
    if drows:
        print(f"\n{'dispatch run':<52} {'system':<18} {'share':>5} {'link':>5} {'lat us':>6} {'2-stg':>5} "
              f"{'1-node':>6} {'measured':>8} {'predicted':>9} {'error':>7} {'spread':>6}")
        for r in drows:
            print(f"{r['run']:<52} {r['system']:<18} {r['share']:>5.3f} {r['link_GBps']:>5.2f} {r['latency_us']:>6.1f} "
                  f"{r['two_stage_ms']:>5.2f} {r['one_node_ms']:>6.2f} {r['measured_ms']:>8.2f} "
                  f"{r['predicted_ms']:>9.2f} {100 * r['error']:>+6.1f}% {_spread(r)}")
        for name in sorted({r["system"] for r in drows}):
            print("  " + _summary([r for r in drows if r["system"] == name], f"dispatch {name}"))
        for line in by_probe(drows, "dispatch"):
            print(line)
    grows = validate_dense_grads(a.roots)
    if grows:
        print(f"\n{'dense gradients: end-to-end run':<46} {'layout':<9} {'system':<36} {'pair':<24} {'link':>5} "
              f"{'step ms':>8} {'measured':>9} {'predicted':>9}")
        for r in grows:
            print(f"{r['run']:<46} {r['layout']:<9} {r['system']:<36} {r['pair']:<24} {r['link_GBps']:>5.2f} "
                  f"{r['step_first_ms']:>8.1f} {r['measured_ms']:>9.1f} {r['predicted_ms']:>9.1f}")
        for pair in dict.fromkeys(r["pair"] for r in grows):
            # a pair the model prices alike (e.g. bf16 gradients under both optimizers: 4 bytes per parameter
            # either way) has no ratio
            ratios = sorted(r["measured_ms"] / r["predicted_ms"] for r in grows if r["pair"] == pair and r["predicted_ms"])
            if not ratios:
                print(f"  dense gradients: the {pair} pairs are predicted alike (no step difference)")
                continue
            print(_ratio_line(f"dense gradients: the {pair} step difference", ratios))
    frows = validate_dispatch_format(a.roots)
    if frows:
        print(f"\n{'dispatch format: end-to-end run':<52} {'layout':<9} {'format':<6} {'share':>5} {'link':>5} "
              f"{'step ms':>8} {'measured':>9} {'predicted':>9}")
        for r in frows:
            print(f"{r['run']:<52} {r['layout']:<9} {r['format']:<6} {r['share']:>5.3f} {r['link_GBps']:>5.2f} "
                  f"{r['step_native_ms']:>8.1f} {r['measured_ms']:>9.1f} {r['predicted_ms']:>9.1f}")
        ratios = sorted(r["measured_ms"] / r["predicted_ms"] for r in frows if r["predicted_ms"])
        if ratios:
            print(_ratio_line("dispatch format: the native - coded step difference", ratios)
                  + " (the encoding's time is not predicted)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layer": rows, "dispatch": drows, "speedup_lean": speedup_lean(main_rows), "dense_grads": grows,
                       "dispatch_format": frows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
