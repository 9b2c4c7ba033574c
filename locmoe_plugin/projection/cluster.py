"""The cluster: nodes of GPUs joined by a fast intra-node fabric (NVLink / HCCS) and one NIC per GPU.

Bandwidths are per GPU and per direction (what one rank can push into its links while every rank does
the same), in GB/s (1e9 bytes/s); latencies in microseconds, paid once per all-to-all stage. Preset
figures are vendor peak figures (sources in ``docs/projection.md``); achieved all-to-all bandwidth is
lower, so a calibration file (:mod:`.calibration`) replaces them with measured values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ConfigError


DUPLEX = ("full", "shared")
_FLAG = {"intra_bw_GBps": "intra-bw", "inter_bw_GBps": "inter-bw", "peak_tflops": "peak-tflops"}


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Args:
        nodes: nodes in the job.
        gpus_per_node: GPUs (NPUs) per node, all in the expert-parallel group.
        intra_bw_GBps / intra_latency_us: per-GPU, per-direction bandwidth and per-stage latency inside a node.
        inter_bw_GBps / inter_latency_us: the same across nodes (one NIC per GPU, rail-aligned).
        peak_tflops: dense bf16 peak of one GPU; GEMMs run at ``gemm_efficiency`` of it unless calibrated.
        gemm_efficiency: achieved share of ``peak_tflops`` for the expert and attention GEMMs.
        inter_duplex: ``"full"``: a rank's NIC sends and receives at ``inter_bw_GBps`` each at once (IB /
            RoCE), so the busiest sender decides; ``"shared"``: one budget for both directions (a TCP
            socket link, where every byte sent or received is a host copy; the emulated nodes of
            ``launch/emulate_nodes.sh``), so a rank's time is (bytes sent + bytes received) / (2 x bw).
            ``inter_bw_GBps`` is in both cases what a balanced exchange reaches per direction.
        inter_one_way_bw_GBps: the rate one direction reaches while the other is idle, between
            ``inter_bw_GBps`` (full duplex) and twice it (one budget for both directions); it sets how much a
            rank that sends more than it receives pays (:func:`~.cost.inter_scale`). None: from
            ``inter_duplex``. A calibration's probe sets it (``one_way_GBps``); a socket link measures in
            between (``docs/projection.md``).
        inter_collective_bw_GBps: the inter-node rate of an all-gather / reduce-scatter over the EP group,
            as (N - 1) s rows of inter-node bytes per rank per second (Megatron's ``allgather`` layer);
            None: ``inter_bw_GBps``. A calibration's probe sets it (``collective_GBps``).
        inter_flat_bw_GBps: the cross-node rate per rank of an all-to-all in which every rank of the other
            nodes is a peer (the pairs all-to-alls); None: ``inter_bw_GBps``, which then stands for every
            inter-node transfer (a NIC per GPU caps a rank whatever its peers). A calibration's probe sets
            it (``flat_GBps``); on emulated socket links the number of peers changes the rate.
    """

    nodes: int
    gpus_per_node: int
    intra_bw_GBps: float
    intra_latency_us: float
    inter_bw_GBps: float
    inter_latency_us: float
    peak_tflops: float
    gemm_efficiency: float = 0.6
    inter_duplex: str = "full"
    inter_collective_bw_GBps: float | None = None
    inter_flat_bw_GBps: float | None = None
    inter_one_way_bw_GBps: float | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("nodes", "gpus_per_node"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{f}={v!r}: must be an integer >= 1 (--{f.replace('_', '-')})")
        for f in ("intra_bw_GBps", "inter_bw_GBps", "peak_tflops"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"{f}={getattr(self, f)!r}: must be > 0; give the measured or spec figure "
                                  f"(--{_FLAG[f]}), a --preset, or a --calibration file")
        for f in ("intra_latency_us", "inter_latency_us"):
            if not getattr(self, f) >= 0:
                raise ConfigError(f"{f}={getattr(self, f)!r}: must be >= 0 microseconds")
        for f, key in (("inter_collective_bw_GBps", "collective_GBps"), ("inter_flat_bw_GBps", "flat_GBps"),
                       ("inter_one_way_bw_GBps", "one_way_GBps")):
            if getattr(self, f) is not None and not getattr(self, f) > 0:
                raise ConfigError(f"{f}={getattr(self, f)!r}: must be > 0 or None (a calibration's "
                                  f"inter_node.{key})")
        if self.inter_duplex not in DUPLEX:
            raise ConfigError(f"inter_duplex={self.inter_duplex!r}: use one of {DUPLEX} (--inter-duplex)")
        if not 0 < self.gemm_efficiency <= 1:
            raise ConfigError(f"gemm_efficiency={self.gemm_efficiency!r}: must be in (0, 1]")

    @property
    def inter_one_way_ratio(self) -> float:
        """One direction's rate alone over a balanced exchange's per-direction rate, in [1, 2]: 1 for a
        full-duplex link, 2 for one budget shared by both directions."""
        if self.inter_one_way_bw_GBps is None:
            return 1.0 if self.inter_duplex == "full" else 2.0
        return min(2.0, max(1.0, self.inter_one_way_bw_GBps / self.inter_bw_GBps))

    @property
    def gemm_tflops(self) -> float:
        return self.peak_tflops * self.gemm_efficiency

    def with_nodes(self, nodes: int) -> "ClusterSpec":
        return replace(self, nodes=nodes)


# Per-GPU, per-direction figures. NVLink 4: 900 GB/s bidirectional per GPU -> 450 GB/s each way;
# ConnectX-7 400 Gb/s -> 50 GB/s each way; Atlas 800T A2: 8 x 200GE RoCE per server (one port per NPU) ->
# 25 GB/s, HCCS full mesh of 8 NPUs, 7 links of 56 GB/s (vendor-reported) -> 392 GB/s. Latencies are typical
# orders of magnitude for one all-to-all stage (NCCL / HCCL launch and handshake), not vendor figures.
PRESETS: dict[str, dict] = {
    "h100": dict(gpus_per_node=8, intra_bw_GBps=450.0, intra_latency_us=10.0, inter_bw_GBps=50.0,
                 inter_latency_us=25.0, peak_tflops=989.0),
    "h200": dict(gpus_per_node=8, intra_bw_GBps=450.0, intra_latency_us=10.0, inter_bw_GBps=50.0,
                 inter_latency_us=25.0, peak_tflops=989.0),
    "ascend910b": dict(gpus_per_node=8, intra_bw_GBps=392.0, intra_latency_us=15.0, inter_bw_GBps=25.0,
                       inter_latency_us=30.0, peak_tflops=313.0),
}


def preset(name: str, nodes: int, **overrides) -> ClusterSpec:
    """A preset cluster of ``nodes`` nodes; ``overrides`` (not None) replace its figures."""
    if name not in PRESETS:
        raise ConfigError(f"unknown cluster preset {name!r}: use one of {sorted(PRESETS)} or give the figures")
    fig = dict(PRESETS[name])
    fig.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(nodes=nodes, name=name, **fig)
