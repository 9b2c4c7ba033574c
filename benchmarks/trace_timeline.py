"""Where the GPU waits for the host in a layer's profiled steps: the idle gaps between kernels of a
``torch.profiler`` Chrome trace, each charged to what the host was doing meanwhile.

  python3 benchmarks/trace_timeline.py TRACE.json[.gz] [...] [--iters 5] [--top 12]

For the traces ``benchmarks/profile_layer.py --profile-dir D`` writes (rank 0, ``--iters`` profiled
forward + backward steps; its phase ranges label the router, the six dispatcher phases, the experts and
the backward). Per trace, per iteration (totals divided by ``--iters``):

* span: first kernel start to last kernel end;
* busy: the union of kernel intervals, split into NCCL kernels (which also hold the time a rank waits for
  its peers) and the rest (compute, copies, memsets);
* idle: span minus busy, the time the GPU had nothing queued. Each idle stretch is split over the host
  phases it overlaps: the innermost ``phase:`` range of the thread that runs the forward; inside
  ``phase:backward`` the autograd thread's ``autograd::engine::evaluate_function: NAME`` range (the
  backward node whose host work the GPU waited for), else "backward, between nodes"; outside every range
  "outside phases";
* the host time of each backward node on the autograd thread (its ``evaluate_function`` ranges), and the
  ``cudaLaunchKernel`` time of that thread: the same node costing more host time in one layer than in
  another points at the launch path, not at the node's own code.

The profiler adds host time per op, so idle here is larger than without it; compare layers traced in the
same call.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics

EVALUATE = "autograd::engine::evaluate_function: "
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: str) -> list[dict]:
    """The complete ("X") events of a Chrome trace, plain or gzipped (``.gz``)."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged ``(start, end)`` intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def total(intervals) -> float:
    return sum(b - a for a, b in intervals)


def gaps(busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The idle stretches between merged busy intervals."""
    return [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] > busy[i][1]]


def _ranges(events: list[dict], tid, prefix: str) -> list[tuple[float, float, str]]:
    return [(e["ts"], e["ts"] + e["dur"], e["name"][len(prefix):]) for e in events
            if e.get("tid") == tid and e["name"].startswith(prefix) and e.get("cat") != "gpu_user_annotation"]


def innermost(gap: tuple[float, float], ranges: list[tuple[float, float, str]]):
    """``gap`` cut where ``ranges`` start or end: ``[((lo, hi), label)]``, each piece labelled by the
    innermost range containing it (the shortest; where ranges nest) or None."""
    a, b = gap
    cuts = sorted({a, b, *(x for r in ranges for x in r[:2] if a < x < b)})
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        inside = [r for r in ranges if r[0] <= mid < r[1]]
        pieces.append(((lo, hi), min(inside, key=lambda r: r[1] - r[0])[2] if inside else None))
    return pieces


def charge(gap: tuple[float, float], ranges: list[tuple[float, float, str]]) -> dict[str, float]:
    """Split ``gap`` over ``ranges`` (innermost range wins where they nest); the rest under None."""
    out: dict = collections.Counter()
    for (lo, hi), label in innermost(gap, ranges):
        out[label] += hi - lo
    return out


def summarize(events: list[dict], iters: int) -> dict:
    """The span, busy and idle times per iteration (ms) and idle time per host phase (ms per iteration)."""
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not device:
        raise ValueError("no GPU kernels in the trace: profile on a GPU with ProfilerActivity.CUDA")
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in device if "nccl" in e["name"].lower()]
    rest = [(e["ts"], e["ts"] + e["dur"]) for e in device if "nccl" not in e["name"].lower()]
    busy = union(nccl + rest)
    span = busy[-1][1] - busy[0][0]
    # the host's phase ranges (the GPU stream carries copies of them as gpu_user_annotation events)
    phase_events = [e for e in events if e["name"].startswith("phase:") and e.get("cat") != "gpu_user_annotation"]
    main_tid = collections.Counter(e.get("tid") for e in phase_events).most_common(1)[0][0] if phase_events else None
    phases = _ranges(events, main_tid, "phase:")
    bwd_tids = collections.Counter(e.get("tid") for e in events if e["name"].startswith(EVALUATE))
    nodes = [r for tid in bwd_tids for r in _ranges(events, tid, EVALUATE)]
    idle: dict = collections.Counter()
    for gap in gaps(busy):
        for (lo, hi), label in innermost(gap, phases):
            if label == "backward":  # which backward node the GPU waited for
                for node, us in charge((lo, hi), nodes).items():
                    idle["backward: " + (node or "between nodes")] += us
            else:
                idle[label or "outside phases"] += hi - lo
    nodes_host: dict = collections.Counter()
    for start, end, node in nodes:
        nodes_host[node] += end - start
    launches = {thread: [e["dur"] for e in events if e.get("cat") == "cuda_runtime" and e.get("tid") in tids
                         and e["name"].startswith("cudaLaunchKernel")]
                for thread, tids in (("backward", set(bwd_tids)), ("forward", {main_tid}))}
    per = 1e3 * iters
    return {
        "span_ms": span / per, "busy_ms": total(busy) / per, "nccl_ms": total(union(nccl)) / per,
        "compute_ms": total(union(rest)) / per, "idle_ms": (span - total(busy)) / per,
        "kernels": len(device) / iters,
        "idle_by_phase_ms": {k: v / per for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
        "backward_nodes_host_ms": {k: v / per for k, v in sorted(nodes_host.items(), key=lambda kv: -kv[1])},
        "backward_launch_ms": sum(launches["backward"]) / per,
        # median cudaLaunchKernel time (us) on the autograd thread and on the thread running the forward
        "launch_median_us": {k: statistics.median(v) if v else None for k, v in launches.items()},
    }


def report(name: str, s: dict, top: int) -> str:
    lines = [f"{name}: span {s['span_ms']:.2f} ms, busy {s['busy_ms']:.2f} (compute {s['compute_ms']:.2f}, NCCL "
             f"{s['nccl_ms']:.2f}), GPU idle {s['idle_ms']:.2f} ms per iteration, {s['kernels']:.0f} kernels"]
    for label, ms in list(s["idle_by_phase_ms"].items())[:top]:
        lines.append(f"    idle {ms:6.3f} ms  while the host ran {label}")
    med = {k: "-" if v is None else f"{v:.2f}" for k, v in s["launch_median_us"].items()}
    lines.append(f"  backward nodes' host time {sum(s['backward_nodes_host_ms'].values()):.2f} ms per iteration "
                 f"(cudaLaunchKernel on that thread {s['backward_launch_ms']:.2f} ms, median {med['backward']} us per "
                 f"launch; forward thread {med['forward']} us):")
    for node, ms in list(s["backward_nodes_host_ms"].items())[:top]:
        lines.append(f"    host {ms:6.3f} ms  {node}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--iters", type=int, default=5, help="profiled iterations in each trace")
    p.add_argument("--top", type=int, default=12, help="host phases listed per trace")
    a = p.parse_args(argv)
    for path in a.traces:
        name = os.path.basename(path).removesuffix(".gz").removesuffix(".json")
        print(report(name, summarize(load_events(path), a.iters), a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
