"""Table and PNG of the end-to-end benchmark's JSON files (``bench_e2e.py``), one row per system and layout.

  python3 benchmarks/e2e_report.py OUT [--png OUT/e2e.png] [--calibration DIR [--two-stage-ms MS]]

``--calibration DIR`` also writes ``DIR/calibration_<layout>.json`` per layout, the calibration of
``locmoe project --calibration`` (:mod:`locmoe_plugin.projection.e2e_calibration`: the expert GEMM rate and
each system's fixed per-layer cost from the profiling step, the links from the run's bandwidth check).

One row per variant: the system, suffixed ``+bf16grad`` where its gradients were reduced in bf16
(``bench_e2e.py --grad-reduce``), ``+distopt`` where Megatron's distributed optimizer stepped it
(``--optimizer``), ``+mb<M>`` where each step ran as M micro-batches (``--microbatches``) and ``+1f1b`` under
Megatron's 1F1B all-to-all overlap (``--ep-overlap``). Columns: median tokens/s of the measured steps with their min-max; "x a2a" =
the ratio to mcore_alltoall's median on the same layout with the same gradient reduction and optimizer; "scaling" = the
ratio to the same variant's median on one node
(layout ``1x<ranks>``; scaling efficiency); validation loss after the same tokens; cross-node share of
routed pairs; inter-node MiB per step and rank; "rows u" = the busiest rank's routed rows over the mean rank's
(mean over layers and measured steps), "x u" = the busiest rank's inter-node bytes over the mean rank's; "gc" =
Python's garbage-collection passes of generations 0/1/2 during the measured steps, summed over the ranks
(suffix "m": ``--manual-gc``, automatic collection off); peak memory; the share of the profiling step spent waiting
on the inter-node link; the profiling step's forward + backward milliseconds per phase (attention A,
router R, dispatch D, experts E, combine C), grad sync G and optimizer O; "a2a GB/s" = the inter-node bytes per
rank and step over the profiling step's time in the all-to-alls that cross nodes, waits for the slowest rank
included (a lower bound on the transfers' rate, to read beside the link's probe on the "link" line).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

PHASES = (("A", "attention"), ("R", "router"), ("D", "dispatch"), ("E", "experts"), ("C", "combine"))
SYSTEM_ORDER = ("mcore_alltoall", "mcore_grouplimited", "deepspeed_moe", "locmoe_topk", "locmoe", "locmoe_flat",
                "locmoe_fp8", "locmoe_allgather", "locmoe_plus")


def variant(r: dict) -> str:
    """The system's name, suffixed where its gradient reduction, optimizer, micro-batches or all-to-all overlap
    differ from the default (older results carry no variant)."""
    return r.get("variant", r["system"])


def load(folder: str) -> list[dict]:
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, "e2e_*.json")))]
    order = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    return sorted(rows, key=lambda r: (r["nodes"], r["layout"], variant(r).removeprefix(r["system"]),
                                       order.get(r["system"], 99)))


def phase_ms(r: dict, phase: str) -> float:
    b = r["breakdown_ms"]
    return b["forward"].get(phase, 0.0) + b["backward"].get(phase, 0.0)


def _ratio(r: dict, key: str) -> str:
    """A busiest-rank-over-mean figure, "-" where the run did not record it (older results, one node's bytes)."""
    v = r.get(key)
    return "-" if v is None else f"{v:.2f}"


def _gc(r: dict) -> str:
    """The measured steps' collection passes per generation, summed over steps and ranks ("-": not recorded)."""
    steps = r.get("gc_collections_steps")
    if steps is None:
        return "-"
    total = "/".join(str(sum(step[g] for step in steps)) for g in range(3))
    return total + ("m" if r.get("manual_gc") else "")


def _a2a_rate(r: dict) -> str:
    """GB/s per rank of the inter-node all-to-alls: the measured steps' mean inter-node bytes per rank over
    rank 0's time in the profiling step's all-to-alls that cross nodes ("-" on one node). That time starts
    after a local device sync, not a barrier, so it includes waiting for the slowest rank to reach each
    all-to-all: a lower bound on the transfers' own rate."""
    ms = r["breakdown_ms"].get("inter_node_all_to_all", 0.0)
    if r["nodes"] < 2 or not ms > 0:
        return "-"
    return f"{r['inter_node_bytes_per_step'] / r['world'] / (ms * 1e6):.2f}"


def table(rows: list[dict]) -> str:
    by = {(r["layout"], variant(r)): r for r in rows}
    one_node = {variant(r): r for r in rows if r["nodes"] == 1}
    w = max([22, *(len(variant(r)) for r in rows)])  # the system column fits its longest variant name
    head = (f"{'layout':<10} {'system':<{w}} {'k tok/s':>8} {'min-max':>11} {'x a2a':>6} {'scaling':>7} {'val':>6} "
            f"{'cross':>6} {'inter MiB':>9} {'rows u':>6} {'x u':>5} {'gc':>9} {'peak GiB':>8} {'link':>5}  "
            + " ".join(f"{k:>6}" for k, _ in PHASES) + f" {'G':>6} {'O':>6} {'step':>7} {'a2a GB/s':>8}")
    lines = [head]
    for r in rows:
        t = r["tokens_per_s"]
        base = by.get((r["layout"], "mcore_alltoall" + variant(r).removeprefix(r["system"])))
        ratio = f"{t['median'] / base['tokens_per_s']['median']:.2f}" if base else "-"
        own = one_node.get(variant(r))
        scaling = f"{t['median'] / own['tokens_per_s']['median'] * 100:.0f} %" if own and r["nodes"] > 1 else "-"
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        b = r["breakdown_ms"]
        lines.append(
            f"{r['layout']:<10} {variant(r):<{w}} {t['median'] / 1e3:8.1f} {t['min'] / 1e3:5.1f}-{t['max'] / 1e3:<5.1f} "
            f"{ratio:>6} {scaling:>7} {r['val_loss']:6.3f} {r['cross_node_share']:6.3f} "
            f"{r['inter_node_bytes_per_step'] / r['world'] / 2**20:9.1f} {_ratio(r, 'rank_load_max_over_mean'):>6} "
            f"{_ratio(r, 'inter_node_bytes_rank_max_over_mean'):>5} {_gc(r):>9} {peak:>8} "
            f"{b['inter_node_wait_share'] * 100:4.0f}%  "
            + " ".join(f"{phase_ms(r, p):6.1f}" for _, p in PHASES)
            + f" {b['grad_sync']:6.1f} {b['optimizer']:6.1f} {b['total']:7.1f} {_a2a_rate(r):>8}")
    links = sorted({(r["layout"], r["bandwidth"]["inter_node_gbps"], r["bandwidth"]["intra_node_gbps"],
                     r["bandwidth"].get("inter_node_all_peers_gbps"))  # absent in results before it was measured
                    for r in rows if r["nodes"] > 1}, key=str)
    def gbps(value):  # None: no such link in the layout (e.g. one rank per node has no intra-node peer)
        return "-" if value is None else f"{value:.2f} GB/s"

    for layout, inter, intra, all_peers in links:
        peers = "" if all_peers is None else f" ({gbps(all_peers)} with every remote rank a peer)"
        lines.append(f"link {layout}: all-to-all inter-node {gbps(inter)}{peers}, intra-node {gbps(intra)} per rank")
    if rows:
        r = rows[0]
        lines.append(f"commit {r.get('commit')}, {r.get('device')}, {r.get('date')}; {r['measured_steps']} measured "
                     f"steps of {r['steps']}, {r['tokens_per_step']} tokens per step; phases: forward + backward ms of "
                     f"one synchronised profiling step")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
    """Tokens/s per layout and system (error bars: min-max of the measured steps) beside the profiling
    step's breakdown; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    systems = list(dict.fromkeys(variant(r) for r in rows))
    by = {(r["layout"], variant(r)): r for r in rows}
    fig, ax = plt.subplots(1, 2, figsize=(15, 4.8))
    width = 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for j, lay in enumerate(layouts):
            r = by.get((lay, s))
            if r:
                t = r["tokens_per_s"]
                xs.append(j + i * width)
                ys.append(t["median"] / 1e3)
                lo.append((t["median"] - t["min"]) / 1e3)
                hi.append((t["max"] - t["median"]) / 1e3)
        ax[0].bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=s)
    ax[0].set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(layouts))], layouts)
    ax[0].set_ylabel("k tokens/s (median of measured steps)")
    ax[0].legend(fontsize=7)
    labels, bottoms = [], []
    parts = [p for _, p in PHASES] + ["grad_sync", "optimizer", "other"]
    for r in rows:
        labels.append(f"{r['layout']}\n{variant(r)}")
        b = r["breakdown_ms"]
        vals = [phase_ms(r, p) for _, p in PHASES] + [b["grad_sync"], b["optimizer"]]
        vals.append(max(0.0, b["total"] - sum(vals)))
        bottoms.append(vals)
    x = range(len(rows))
    acc = [0.0] * len(rows)
    for k, name in enumerate(parts):
        v = [b[k] for b in bottoms]
        ax[1].bar(x, v, bottom=acc, label=name)
        acc = [a + b for a, b in zip(acc, v)]
    ax[1].set_xticks(list(x), labels, fontsize=6, rotation=90)
    ax[1].set_ylabel("profiling step, ms")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_calibrations(rows: list[dict], folder: str, two_stage_ms: float | None = None) -> list[str]:
    """``folder/calibration_<layout>.json`` for every layout with a plain run of a calibrated system."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    from locmoe_plugin.projection.e2e_calibration import calibrated_rows, calibration_from_e2e_results

    os.makedirs(folder, exist_ok=True)
    paths = []
    usable = calibrated_rows(rows)
    for layout in dict.fromkeys(r["layout"] for r in usable):
        cal = calibration_from_e2e_results([r for r in usable if r["layout"] == layout], two_stage_ms=two_stage_ms)
        path = os.path.join(folder, f"calibration_{layout}.json")
        with open(path, "w") as f:
            json.dump(cal.to_dict(), f, indent=2)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--png", default=None, help="default: FOLDER/e2e.png")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="write DIR/calibration_<layout>.json per layout for locmoe project --calibration")
    p.add_argument("--two-stage-ms", type=float, default=None,
                   help="with --calibration: the two-stage plan's extra ms per layer on one node (bench_dispatch.py's "
                        "hier_tree rows), added to the one-node file's LocMoE cost for layouts across nodes")
    a = p.parse_args(argv)
    if a.two_stage_ms is not None and not a.calibration:
        p.error("--two-stage-ms goes with --calibration DIR (it sets the calibration's LocMoE cost across nodes)")
    rows = load(a.folder)
    if not rows:
        print(f"e2e_report: no e2e_*.json in {a.folder}")
        return 1
    if a.calibration:
        for path in write_calibrations(rows, a.calibration, a.two_stage_ms):
            print(f"calibration: {path}")
    png = plot(rows, a.png or os.path.join(a.folder, "e2e.png"))
    print(f"plot: {png}" if png else "plot: skipped (install matplotlib for the PNG)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
