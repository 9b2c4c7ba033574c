"""benchmarks/trace_timeline.py on a hand-made Chrome trace: GPU idle gaps charged to the host phase and
backward node that ran meanwhile."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import trace_timeline  # noqa: E402


def _x(name, ts, dur, cat, tid):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid}


def test_idle_gaps_are_charged_to_the_host_phase_and_backward_node(tmp_path):
    events = [
        _x("gemm", 0, 10, "kernel", 7), _x("ncclDevKernel_AllGather", 20, 10, "kernel", 7),
        _x("gemm", 25, 3, "kernel", 8),  # overlaps the NCCL kernel: busy once
        _x("memset", 50, 10, "gpu_memset", 7),
        _x("phase:router", 0, 15, "user_annotation", 1), _x("phase:experts", 15, 25, "user_annotation", 1),
        _x("phase:backward", 40, 30, "user_annotation", 1),
        _x("autograd::engine::evaluate_function: FooBackward", 42, 13, "cpu_op", 2),
        _x("autograd::engine::evaluate_function: FooBackward", 62, 3, "cpu_op", 2),
        _x("cudaLaunchKernel", 43, 2, "cuda_runtime", 2), _x("cudaLaunchKernel", 5, 7, "cuda_runtime", 1),
        {"ph": "i", "name": "marker", "ts": 1},  # not a complete event: ignored
        # the GPU stream's copies of the phase ranges: not host phases (on the kernels' thread)
        _x("phase:router", 0, 60, "gpu_user_annotation", 7), _x("phase:experts", 0, 60, "gpu_user_annotation", 7),
        _x("phase:backward", 0, 60, "gpu_user_annotation", 7),
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    zipped = tmp_path / "t.json.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    assert trace_timeline.load_events(str(zipped)) == trace_timeline.load_events(str(path))
    s = trace_timeline.summarize(trace_timeline.load_events(str(path)), iters=1)
    assert s["span_ms"] == pytest.approx(0.060) and s["busy_ms"] == pytest.approx(0.030)
    assert s["nccl_ms"] == pytest.approx(0.010) and s["compute_ms"] == pytest.approx(0.023)
    assert s["idle_ms"] == pytest.approx(0.030) and s["kernels"] == 4
    assert s["idle_by_phase_ms"] == pytest.approx({"experts": 0.015, "router": 0.005,
                                                   "backward: FooBackward": 0.008, "backward: between nodes": 0.002})
    assert list(s["idle_by_phase_ms"])[0] == "experts"  # largest first
    # host time of the backward nodes, and the launches of the autograd thread only
    assert s["backward_nodes_host_ms"] == pytest.approx({"FooBackward": 0.016})
    assert s["backward_launch_ms"] == pytest.approx(0.002)
    assert s["launch_median_us"] == {"backward": 2, "forward": 7}
    assert "idle  0.015 ms  while the host ran experts" in trace_timeline.report("t", s, top=2)


def test_a_trace_without_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        trace_timeline.summarize([_x("phase:router", 0, 15, "user_annotation", 1)], iters=1)


def test_a_phase_nested_in_the_backward_takes_its_own_share():
    events = [
        _x("gemm", 0, 10, "kernel", 7), _x("gemm", 50, 10, "kernel", 7),
        _x("phase:backward", 5, 60, "user_annotation", 1), _x("phase:inner", 20, 10, "user_annotation", 1),
        _x("autograd::engine::evaluate_function: FooBackward", 15, 30, "cpu_op", 2),
    ]
    s = trace_timeline.summarize(events, iters=1)
    # the gap [10, 50): inner [20, 30), the rest under the backward node FooBackward [15, 45) or between nodes
    assert s["idle_by_phase_ms"] == pytest.approx({"backward: FooBackward": 0.020, "inner": 0.010,
                                                   "backward: between nodes": 0.010})
