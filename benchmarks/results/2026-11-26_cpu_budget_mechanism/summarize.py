"""Table of this folder's demo runs: per system, the validation loss paired by seed with the baseline of the
same seed (same data, same initialisation), and the cross-node share.

    python benchmarks/results/2026-11-26_cpu_budget_mechanism/summarize.py

Folders: seedS = baseline + both budget mechanisms; mu_seedS = the fixed locality loss (mu 0.01, 0.1);
two_sided_seedS = the "loss" mechanism with lam clipped to [-0.5, 0.5] instead of [0, 0.5] (a variant
tried on a local patch, not part of the plugin). "share tail": mean over the last 30 of 150 steps (the
demo's column); "share 31-150": mean over steps 31-150.
"""

import json
import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    runs: dict = {}
    for path in sorted(HERE.glob("*seed*/results.json")):
        seed = int(re.search(r"seed(\d+)", path.parent.name).group(1))
        prefix = "two-sided " if path.parent.name.startswith("two_sided") else ""
        for r in json.loads(path.read_text())["results"]:
            h = r["history"]["cross_node_share"]
            runs.setdefault(prefix + r["system"], {})[seed] = (r["val_loss"], r["cross_node_share"],
                                                               statistics.fmean(h[30:]))
    base = runs.pop("baseline")
    print(f"{'system':<72} {'seeds':>5} {'val loss':>8} {'dval % mean':>11} {'std':>5} {'worst':>6} "
          f"{'share tail':>10} {'share 31-150':>12}")
    print(f"{'baseline':<72} {len(base):>5} {statistics.fmean(v[0] for v in base.values()):>8.4f} "
          f"{'-':>11} {'-':>5} {'-':>6} {statistics.fmean(v[1] for v in base.values()):>10.3f} "
          f"{statistics.fmean(v[2] for v in base.values()):>12.3f}")
    for name, by in runs.items():
        seeds = sorted(s for s in by if s in base)
        d = [100 * (by[s][0] - base[s][0]) / base[s][0] for s in seeds]
        print(f"{name:<72} {len(seeds):>5} {statistics.fmean(by[s][0] for s in seeds):>8.4f} "
              f"{statistics.fmean(d):>+11.2f} {statistics.stdev(d) if len(d) > 1 else 0.0:>5.2f} {max(d):>+6.2f} "
              f"{statistics.fmean(by[s][1] for s in seeds):>10.3f} {statistics.fmean(by[s][2] for s in seeds):>12.3f}")
        print("    by seed (val loss, dval %, share tail): "
              + "; ".join(f"{s}: {by[s][0]:.3f} {d[i]:+.1f} {by[s][1]:.3f}" for i, s in enumerate(seeds)))
    print("baseline val loss by seed: " + ", ".join(f"{s}: {v[0]:.4f}" for s, v in sorted(base.items())))


if __name__ == "__main__":
    main()
