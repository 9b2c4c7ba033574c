"""Table and PNG of the cross-node budget curve from ``run_budget_curve.py``'s job files.

    python benchmarks/quality/budget_report.py OUT

Reads ``OUT/jobs/*.json`` (one ``bench_layer.py --json`` per budget and seed) and writes ``OUT/table.txt``,
``OUT/curve.json`` and ``OUT/curve.png`` (the PNG needs matplotlib). One row per budget, mechanism,
warm-up of the budget's target (``w300``: over the first 300 training steps; jobs from before warm-ups were
recorded had none), fixed locality-loss coefficient beside the budget (``mu0.01``), expert-bias rate
(``eb0.001``) and dispatch format of the LocMoE layer (``fp8``, ``int8``; none written for native rows), over seeds:
  * dval %: the paired validation-loss difference, (LocMoE - baseline) / baseline of the same job (same
    seed, data and held-out windows), mean, sample std and worst seed;
  * cross: the LocMoE model's cross-node share of routed pairs on the held-out windows (the budget's
    target quantity), and of the timed layer;
  * inter-node bytes: the timed LocMoE layer's over Megatron alltoall's, and the cut 1 - ratio;
  * time x a2a: the LocMoE layer's fwd+bwd time over Megatron alltoall's in the same run (median of the
    per-round ratios with --rounds), median over seeds;
  * lam: the controller's multiplier at the end of training (locality-loss coefficient or selection margin).
The baseline's spread: per seed the mean of its validation loss over the jobs, then (max - min) / mean
over seeds; and the largest difference of one seed's baseline between jobs (run-to-run reproducibility).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load_jobs(out: Path) -> list[dict]:
    jobs = []
    for path in sorted((out / "jobs").glob("*.json")):
        if path.name.endswith(".tmp.json"):
            continue
        with open(path) as f:
            data = json.load(f)
        train = {t["gate"]: t for t in data["training"]}
        systems = data["systems"]
        gates = [g for g in train if g != "topk"]  # the LocMoE router's gate (dense by default, or grap)
        if "topk" not in train or len(gates) != 1:
            continue
        gate = gates[0]
        loc, a2a = systems.get(f"locmoe_{gate}", {}), systems.get("mcore_alltoall", {})
        ratio = loc.get("ratio_median", loc["ms"] / a2a["ms"] if "ms" in loc and "ms" in a2a else None)
        jobs.append({
            "job": path.stem, "seed": data["meta"].get("seed"), "budget": data["meta"].get("budget"),
            # jobs from before the mechanism was recorded ran the selection margin, the only one then
            "mechanism": (None if data["meta"].get("budget") is None
                          else data["meta"].get("budget_mechanism") or "selection")
                         if gate == "dense" else f"{data['meta'].get('budget_mechanism') or 'off'} {gate}",
            "warmup": data["meta"].get("budget_warmup") or 0,
            # the fixed locality loss and the expert bias beside the budget (0 = off; jobs from before these
            # were options ran neither)
            "mu": float((data["meta"].get("mu") or {}).get(gate) or 0.0),
            "expert_bias": float(data["meta"].get("expert_bias_rate") or 0.0),
            "dispatch_format": data["meta"].get("dispatch_format") or "native",
            "base_val": train["topk"]["val_lm_loss"], "loc_val": train[gate]["val_lm_loss"],
            "val_cross": train[gate]["val_cross_node_share"],
            "train_cross": train[gate]["cross_node_share_last10"],
            "base_val_cross": train["topk"]["val_cross_node_share"],
            "layer_cross": loc.get("cross_node_share"), "time_ratio": ratio,
            "bytes_ratio": (loc["inter_node_MiB"] / a2a["inter_node_MiB"]
                            if a2a.get("inter_node_MiB") and "inter_node_MiB" in loc else None),
            "lam": train[gate].get("budget_strength"), "meta": data["meta"],
        })
    return jobs


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(jobs: list[dict]) -> dict:
    by_budget: dict = {}  # (budget, mechanism, warm-up, mu, expert bias, dispatch format) -> jobs
    for j in jobs:
        key = (j["budget"], j["mechanism"], j["warmup"], j.get("mu", 0.0), j.get("expert_bias", 0.0),
               j.get("dispatch_format", "native"))
        by_budget.setdefault(key, []).append(j)
    rows = []
    for key in sorted(by_budget, key=lambda k: (k[0] is not None, -(k[0] or 0), k[1] or "", *k[2:])):
        budget, mechanism, warmup, mu, expert_bias, dispatch_format = key
        js = sorted(by_budget[key], key=lambda j: j["seed"])
        d = [100.0 * (j["loc_val"] - j["base_val"]) / j["base_val"] for j in js]
        ratios = [j["time_ratio"] for j in js if j["time_ratio"] is not None]
        rows.append({
            "budget": budget, "mechanism": mechanism, "warmup": warmup, "mu": mu, "expert_bias": expert_bias,
            "dispatch_format": dispatch_format,
            "seeds": [j["seed"] for j in js], "dval_pct": d, "dval_mean": statistics.fmean(d),
            "dval_std": statistics.stdev(d) if len(d) > 1 else 0.0, "dval_worst": max(d),
            "val_cross": _mean(j["val_cross"] for j in js), "train_cross": _mean(j["train_cross"] for j in js),
            "layer_cross": _mean(j["layer_cross"] for j in js), "bytes_ratio": _mean(j["bytes_ratio"] for j in js),
            "time_ratio": statistics.median(ratios) if ratios else None, "lam": _mean(j["lam"] for j in js),
        })
    per_seed: dict = {}
    for j in jobs:
        per_seed.setdefault(j["seed"], []).append(j["base_val"])
    means = [statistics.fmean(v) for v in per_seed.values()]
    spread = (max(means) - min(means)) / statistics.fmean(means) * 100 if len(means) > 1 else None
    repeat = max(((max(v) - min(v)) / statistics.fmean(v) * 100 for v in per_seed.values()), default=None)
    meta = jobs[0]["meta"] if jobs else {}
    return {"rows": rows, "baseline_val_by_seed": {str(s): statistics.fmean(v) for s, v in per_seed.items()},
            "baseline_spread_pct": spread, "baseline_repeat_pct": repeat,
            "meta": {k: meta.get(k) for k in ("device", "date", "commit", "ranks", "nodes", "gpus_per_node", "hidden",
                                              "ffn", "experts", "topk", "train_steps", "eval_batches", "eval_seed",
                                              "lr_schedule", "megatron_core", "torch")}}


def row_label(row: dict) -> str:
    """``off``, or the budget and its mechanism, then its options if any: ``0.1 loss``, ``0.1 selection w300``,
    ``0.1 selection mu0.01 eb0.001``, ``0.2 selection fp8`` (warm-up steps, fixed locality-loss coefficient,
    expert-bias rate, dispatch format)."""
    options = "".join(f" {tag}{row[key]:g}" for key, tag in (("warmup", "w"), ("mu", "mu"), ("expert_bias", "eb"))
                      if row.get(key))
    if row.get("dispatch_format", "native") != "native":
        options += " " + row["dispatch_format"]
    if row["budget"] is None:
        return "off" + options
    return f"{row['budget']:g} {row.get('mechanism') or ''}".strip() + options


def _fmt(v, f):
    return "-" if v is None else format(v, f)


def format_table(summary: dict) -> str:
    m = summary["meta"]
    lines = [f"cross-node budget curve: {m.get('ranks')} ranks as {m.get('nodes')} nodes x {m.get('gpus_per_node')}, "
             f"{m.get('device')}, d {m.get('hidden')}, ffn {m.get('ffn')}, E {m.get('experts')} top-{m.get('topk')}, "
             f"{m.get('train_steps')} steps, {m.get('eval_batches')} eval batches "
             f"({'one set of held-out windows for every seed' if m.get('eval_seed') is not None else 'held-out windows drawn per seed'}), "
             f"{m.get('date')}, commit {m.get('commit')}",
             f"{'budget':>30} {'seeds':>5} {'dval % mean':>11} {'std':>5} {'worst':>6} {'cross val':>9} {'cross layer':>11} "
             f"{'bytes cut':>9} {'time x a2a':>10} {'lam':>6}"]
    for r in summary["rows"]:
        b = row_label(r)
        cut = None if r["bytes_ratio"] is None else 1 - r["bytes_ratio"]
        lines.append(f"{b:>30} {len(r['seeds']):>5} {r['dval_mean']:>+11.2f} {r['dval_std']:>5.2f} {r['dval_worst']:>+6.2f} "
                     f"{_fmt(r['val_cross'], '.3f'):>9} {_fmt(r['layer_cross'], '.3f'):>11} {_fmt(cut, '.1%'):>9} "
                     f"{_fmt(r['time_ratio'], '.3f'):>10} {_fmt(r['lam'], '.3f'):>6}")
    lines.append("baseline (TopKRouter + aux loss) val loss by seed: "
                 + ", ".join(f"{s}: {v:.4f}" for s, v in summary["baseline_val_by_seed"].items())
                 + f"; seed-to-seed spread (max-min)/mean {_fmt(summary['baseline_spread_pct'], '.2f')} %; "
                 f"same seed across jobs {_fmt(summary['baseline_repeat_pct'], '.2f')} %")
    lines.append("dval %: paired (same job) (LocMoE - baseline) / baseline validation loss; cross val: LocMoE's "
                 "held-out cross-node share; bytes cut: 1 - inter-node bytes of the LocMoE layer / Megatron "
                 "alltoall's; time x a2a: layer fwd+bwd time / Megatron alltoall's, median over seeds"
                 + ("; wS: the budget's target fell from the unconstrained share (N-1)/N of N nodes to the budget over "
                    "the first S training steps"
                    if any(r.get("warmup") for r in summary["rows"]) else "")
                 + ("; muC: a fixed locality loss of coefficient C with its learned locality bias beside the budget"
                    if any(r.get("mu") for r in summary["rows"]) else "")
                 + ("; ebR: loss-free balancing (expert bias) at rate R"
                    if any(r.get("expert_bias") for r in summary["rows"]) else "")
                 + ("; fp8 / int8: the LocMoE layer sent token rows and output gradients as one byte per feature "
                    "and an fp32 scale per 128 (dispatch_format), in training and timing"
                    if any(r.get("dispatch_format", "native") != "native" for r in summary["rows"]) else ""))
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "val_cross", "cross-node share of routed pairs (held-out)"),
                           (axes[1], "time_ratio", "layer fwd+bwd time / Megatron alltoall")):
        for r in summary["rows"]:
            x = r[key]
            if x is None:
                continue
            name = row_label(r)
            ax.errorbar([x], [r["dval_mean"]], yerr=[r["dval_std"]], fmt="o", capsize=4, color="C0")
            ax.scatter([x] * len(r["dval_pct"]), r["dval_pct"], s=10, color="C1", alpha=0.6)
            ax.annotate(name, (x, r["dval_mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0, color="k", lw=0.6)
        ax.axhspan(-1, 1, color="C2", alpha=0.08)
        ax.set_xlabel(label)
    axes[0].set_ylabel("paired val-loss difference vs TopKRouter (%)\nmean +- std over seeds; dots: seeds")
    fig.suptitle("LocMoE cross-node budget: quality vs traffic and layer time (labels: budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    out = Path(p.parse_args(argv).out)
    jobs = load_jobs(out)
    if not jobs:
        print(f"budget report: no finished job in {out / 'jobs'}")
        return 1
    summary = summarize(jobs)
    with open(out / "curve.json", "w") as f:
        json.dump(summary, f, indent=1)
    text = format_table(summary)
    (out / "table.txt").write_text(text + "\n")
    png = plot(summary, out / "curve.png")
    print(text)
    print(f"plot: {png}" if png else "plot: skipped (install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
