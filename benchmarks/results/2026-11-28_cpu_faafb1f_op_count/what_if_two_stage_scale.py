"""What-if over the per-pattern layer validation: the two-stage plan's one-node host figure scaled by the op
counts here (156 / 98 extra kernels across 2 nodes against forced on one node). Run from the repository root:

    PYTHONPATH=$PWD python3 benchmarks/results/2026-11-28_cpu_faafb1f_op_count/what_if_two_stage_scale.py
"""
import statistics as st
import sys

sys.path.insert(0, "benchmarks")
import validate_projection as vp  # noqa: E402

orig_under = vp.two_stage_under
for scale in (1.0, 156 / 98):
    vp.two_stage_under = lambda roots, topk, _s=scale: (lambda v: None if v is None else v * _s)(orig_under(roots, topk))
    rows = [r for r in vp.validate("benchmarks/results") if r["variant"] == "model" and r["probe"] == "per-pattern"]
    loc = [r for r in rows if r["system"].startswith("locmoe")]
    print(f"scale {scale:.2f}: {sum(abs(r['error']) <= 0.15 for r in rows)} of {len(rows)} within 15 %; "
          f"LocMoE rows mean error {st.mean(r['error'] for r in loc) * 100:+.1f} %")
