"""Output of ``locmoe project``: the table, the JSON, and the PNG of speedup against nodes."""

from __future__ import annotations

from dataclasses import asdict

from .cost import BASELINE, LayerTime


def as_json(point: dict[str, LayerTime], sweep: dict[int, dict[str, LayerTime]], inputs: dict) -> dict:
    return {"inputs": inputs,
            "systems": {k: asdict(v) | {"speedup_vs_megatron_alltoall": point[BASELINE].step_ms / v.step_ms,
                                        "speedup_with_dp_vs_megatron_alltoall": point[BASELINE].step_dp_ms / v.step_dp_ms}
                        for k, v in point.items()},
            "sweep": {str(n): {k: {"layer_ms": v.layer_ms, "step_ms": v.step_ms, "step_dp_ms": v.step_dp_ms,
                                   "speedup_vs_megatron_alltoall": r[BASELINE].step_ms / v.step_ms,
                                   "speedup_with_dp_vs_megatron_alltoall": r[BASELINE].step_dp_ms / v.step_dp_ms}
                               for k, v in r.items()} for n, r in sweep.items()}}


def table(point: dict[str, LayerTime], header: str) -> str:
    base = point[BASELINE]
    lines = [header,
             f"{'system':<24} {'layer ms':>9} {'fixed':>7} {'gemm':>7} {'comm':>8} {'step ms':>9} "
             f"{'speedup':>8} {'+DP ms':>9} {'speedup':>8} {'inter MB/rank':>13} {'intra MB/rank':>13} {'pair share':>10}"]
    for v in point.values():
        lines.append(f"{v.system:<24} {v.layer_ms:>9.2f} {v.fixed_ms:>7.2f} {v.gemm_ms:>7.2f} {v.comm_ms:>8.2f} "
                     f"{v.step_ms:>9.1f} {base.step_ms / v.step_ms:>7.2f}x {v.step_dp_ms:>9.1f} "
                     f"{base.step_dp_ms / v.step_dp_ms:>7.2f}x {v.inter_bytes / 1e6:>13.1f} "
                     f"{v.intra_bytes / 1e6:>13.1f} {v.pair_share:>10.3f}")
    lines.append("bytes: what one rank sends per MoE layer, forward + backward (dispatch + combine); "
                 "speedup: step time of megatron_alltoall / this system's; +DP: the step with the dense "
                 f"gradients' all-reduce across nodes added whole ({base.dp_grad_ms:.1f} ms; the step lies between)")
    if "locmoe_hier_overlap" in point:
        lines.append("locmoe_hier_overlap: DeepSpeed's LocMoE layer with its overlap; the model credits the local rows' "
                     "work hidden behind the inter-node transfer, not the overlap's extra work per origin node "
                     "(docs/projection.md)")
    return "\n".join(lines)


def sweep_table(sweep: dict[int, dict[str, LayerTime]]) -> str:
    names = list(next(iter(sweep.values())))
    lines = []
    for title, key in (("", "step_ms"), (", the dense gradients' all-reduce added whole", "step_dp_ms")):
        lines += [f"projected step speedup vs megatron_alltoall, by nodes (EP nodes in brackets){title}:",
                  f"{'nodes':>10} " + " ".join(f"{n:>22}" for n in names)]
        for nodes, r in sweep.items():
            ep = next(iter(r.values())).ep_nodes
            lines.append(f"{f'{nodes} ({ep})':>10} " + " ".join(
                f"{getattr(r[BASELINE], key) / getattr(r[n], key):>21.2f}x" for n in names))
    return "\n".join(lines)


def plot(sweep: dict[int, dict[str, LayerTime]], path: str, title: str) -> str | None:
    """PNG of step speedup vs nodes (log2 axis); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    nodes = list(sweep)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in next(iter(sweep.values())):
        ax.plot(nodes, [sweep[n][BASELINE].step_ms / sweep[n][name].step_ms for n in nodes], marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(nodes, [str(n) for n in nodes])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("nodes")
    ax.set_ylabel("projected step speedup vs Megatron alltoall")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
