"""``locmoe project``: a two-level cost model of one MoE layer and a training step, for a cluster the
user describes (or a preset), calibrated on measured runs. CPU only, no torch needed.

Files: :mod:`.cluster` (cluster and presets), :mod:`.workload` (model and routing), :mod:`.traffic`
(rows per rank and link, counted as the dispatcher's traffic counter counts them), :mod:`.cost` (time
terms and systems), :mod:`.calibration` (the JSON the benchmarks write), :mod:`.report` (table, JSON,
PNG), :mod:`.command` (the CLI). See ``docs/projection.md``.
"""

from .calibration import Calibration, calibration_from_layer_results, load_calibration, write_calibration
from .cluster import PRESETS, ClusterSpec
from .cost import SYSTEMS, predict, predict_layer
from .traffic import count_rows, expected_rows
from .workload import ModelSpec, RoutingSpec

__all__ = [
    "Calibration", "ClusterSpec", "ModelSpec", "PRESETS", "RoutingSpec", "SYSTEMS",
    "calibration_from_layer_results", "count_rows", "expected_rows", "load_calibration", "predict",
    "predict_layer", "write_calibration",
]
