"""The demo's closing table and plot."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (  # key, width, format, title
    ("system", 28, "", "system"),
    ("train_loss", 10, ".3f", "train loss"),
    ("val_loss", 9, ".3f", "val loss"),
    ("tokens_per_s", 9, ".0f", "tokens/s"),
    ("cross_node_share", 10, ".3f", "cross-node"),
    ("max_over_mean_load", 8, ".2f", "max/mean"),
    ("dropped_pairs", 8, "d", "dropped"),
    ("inter_node_mib", 14, ".2f", "inter-node MiB"),
)


def format_table(results: list[dict]) -> str:
    lines = [" ".join(f"{title:<{w}}" if key == "system" else f"{title:>{w}}" for key, w, _, title in COLUMNS)]
    for r in results:
        row = dict(r, inter_node_mib=r["inter_node_bytes_per_step"] / 2**20)
        lines.append(" ".join(f"{row[key]:<{w}{f}}" if key == "system" else f"{row[key]:>{w}{f}}"
                              for key, w, f, _ in COLUMNS))
    return "\n".join(lines)


def capacity_table(results: list[dict], args) -> str:
    """Tokens each expert processes (kept pairs per expert, per layer and step, last 20 % of steps) and,
    for LocMoE's capacity modes, the capacity factor and affinity threshold delta at the end; beside the
    buffer a capacity factor of 1.0 / 1.25 would give."""
    per_rank_pairs = args.micro_batch * args.seq_len * args.topk
    ideal = per_rank_pairs * args.world / args.num_experts  # balanced tokens per expert (all ranks)
    lines = [f"tokens per expert per layer and step (all ranks); balanced = {ideal:.0f}, capacity factor 1.0 / "
             f"1.25 buffers = {ideal:.0f} / {1.25 * ideal:.0f}",
             f"{'system':<28} {'mean':>8} {'max':>8} {'cap. factor':>12} {'delta':>8}"]
    for r in results:
        tpe = [t / args.num_layers for t in r["tokens_per_expert"]]
        cf = next((v for v in reversed(r["history"]["capacity_factor"]) if v is not None), None)
        delta = next((v for v in reversed(r["history"]["delta"]) if v is not None), None)
        lines.append(f"{r['system']:<28} {sum(tpe) / len(tpe):>8.1f} {max(tpe):>8.1f} "
                     f"{'-' if cf is None else f'{cf:.3f}':>12} {'-' if delta is None else f'{delta:.4f}':>8}")
    return "\n".join(lines)


def notes() -> str:
    return (
        "train loss, cross-node, max/mean: mean over the last 20 % of steps; val loss: held-out documents at "
        "the end; cross-node: share of routed (token, expert) pairs whose expert is on another node; "
        "max/mean: busiest expert's tokens over the mean, per layer and step; dropped: (token, expert) pairs "
        "dropped by capacity over the whole run; inter-node MiB: bytes sent to other nodes per training step "
        "(forward + backward, all ranks), counted at torch.distributed.all_to_all_single."
    )


def plot(results: list[dict], path: Path) -> Path | None:
    """Loss and cross-node share against step, and tokens per expert, as one PNG. None if matplotlib is
    not installed (the table is still printed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        h, v = r["history"], r["val_curve"]
        (line,) = ax[0].plot(h["step"], h["loss"], lw=1, alpha=0.8, label=f"{r['system']} train")
        ax[0].plot(v["step"], v["loss"], "o--", color=line.get_color(), ms=4, label=f"{r['system']} val")
        ax[1].plot(h["step"], h["cross_node_share"], color=line.get_color(), label=r["system"])
        tpe = r["tokens_per_expert"]
        ax[2].bar([e + i * width for e in range(len(tpe))], tpe, width=width, color=line.get_color(),
                  label=r["system"])
    ax[0].set(xlabel="step", ylabel="loss (nats / byte)", title="language-model loss")
    ax[1].set(xlabel="step", ylabel="share of routed pairs", title="routed pairs crossing nodes", ylim=(0, 1))
    ax[2].set(xlabel="expert", ylabel="tokens per step (all layers)", title="tokens per expert (last 20 % of steps)")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_results(paths) -> tuple[list[dict], dict | None]:
    """Results of finished demo runs: each path a ``results.json`` (``{"args", "results"}``), a
    ``partial.json`` (a list of results) or a folder holding one of them (``results.json`` first).
    Returns the results in order and the first run's arguments (None if only partial files were found)."""
    import json

    results, args = [], None
    for p in map(Path, paths):
        if p.is_dir():
            p = next((c for c in (p / "results.json", p / "partial.json") if c.exists()), p / "results.json")
        with open(p) as f:
            data = json.load(f)
        if isinstance(data, dict):
            results += data["results"]
            args = args or data.get("args")
        else:
            results += data
    return results, args


def main(argv=None) -> int:
    """``python -m locmoe_plugin.demo.report RUN [RUN ...] [--png FILE]``: one table (and capacity table,
    and PNG) from several demo runs, e.g. the per-system runs of ``benchmarks/quality/run_quality.sh``."""
    import argparse
    from types import SimpleNamespace

    p = argparse.ArgumentParser(prog="python -m locmoe_plugin.demo.report", description=main.__doc__)
    p.add_argument("runs", nargs="+", help="results.json / partial.json files or their folders")
    p.add_argument("--png", default=None, help="write the combined plot here")
    a = p.parse_args(argv)
    results, args = load_results(a.runs)
    print(format_table(results))
    print(notes())
    if args is not None:
        args = SimpleNamespace(**args)
        print(capacity_table(results, args))
    if a.png:
        png = plot(results, Path(a.png))
        print(f"plot: {png}" if png else "plot: skipped (install matplotlib for the PNG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
