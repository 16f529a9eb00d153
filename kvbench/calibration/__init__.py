"""Calibration: statistics of K/V on the calibration split (:mod:`.stats`) and the artifact store of each
method's fit (:mod:`.artifacts`: safetensors + a JSON sidecar, validated by content)."""

from kvbench.calibration.artifacts import (
    artifact_key,
    artifact_path,
    check_artifact,
    load_artifact,
    prepare,
    save_artifact,
)
from kvbench.calibration.stats import NEEDS, cached_collect, calibration_batches, collect, without_sink

__all__ = ["NEEDS", "artifact_key", "artifact_path", "cached_collect", "calibration_batches", "check_artifact", "collect",
           "load_artifact", "prepare", "save_artifact", "without_sink"]
