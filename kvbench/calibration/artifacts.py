"""Calibration: statistics of K/V (and their Fisher information) on the calibration split, a
method's fit on them, and the artifact store that keeps the result.

Artifacts are ``<cache>/<method>/<key>.safetensors`` plus a ``<key>.json`` sidecar (never pickle).
``key`` hashes everything the result depends on: model and data by content
(:func:`kvbench.tracking.store.inputs`, not their paths), calibration settings, the method's config, the
``kv`` config and the method's ``version``. The sidecar records the key, the SHA-256 of the tensor
file, each tensor's shape and dtype, the bit width and the model's dims; loading checks all of them,
and the tensors against the shapes the configured method expects (:meth:`KVMethod.state_shapes`),
so a corrupt, mismatched or relabelled artifact is refused with one line. Concurrent
runs share artifacts safely: one computes under a file lock, the others wait and read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save

from kvbench.errors import UserError
from kvbench.calibration.stats import _plain, cached_collect, calibration_batches, without_sink
from kvbench.local import cache_root

def artifact_key(cfg, method) -> tuple[str, dict]:
    """The artifact's key (SHA-1 prefix) and the metadata it hashes (written to the sidecar)."""
    from kvbench.tracking.store import inputs

    meta = {
        "model": {k: v for k, v in _plain(cfg.model).items() if k != "path"},
        "data": {k: v for k, v in _plain(cfg.data).items() if k != "path"},
        "inputs": inputs(cfg),
        "calib": {k: v for k, v in _plain(cfg.calib).items() if k != "cache_dir"},
        "method": _plain(method.cfg),
        "kv": {k: v for k, v in _plain(cfg.kv).items() if k != "backend"},
        "method_version": method.version,
        "seed": cfg.seed,
    }
    return hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16], meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _dims(info) -> dict:
    return {"layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads, "head_dim": info.head_dim}


def _describe(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sorted(tensors.items())}


def load_artifact(path: Path, key: str, method=None) -> dict[str, torch.Tensor]:
    """Read an artifact, refusing a corrupt, mismatched or relabelled one with one line.

    Args:
        path: the ``.safetensors`` file (its sidecar is the ``.json`` beside it).
        key: the key the configuration expects (:func:`artifact_key`).
        method: the configured method: with it, the sidecar's bit width and model dims must match
            ``method.kv.bits`` / ``method.info``, and the tensors :meth:`KVMethod.state_shapes`.

    Returns:
        The tensors by name.
    """
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
        if meta.get("key") != key:
            raise UserError(f"calibration artifact {path} belongs to another configuration; delete it to recompute")
        if meta.get("sha256") != _sha256(path):
            raise UserError(f"calibration artifact {path} is corrupt (checksum mismatch); delete it to recompute")
        tensors = load_file(path)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"calibration artifact {path} is unreadable ({type(e).__name__}); delete it to recompute") from None
    check_artifact(path, meta, tensors, method)
    return tensors


def check_artifact(path: Path, meta: dict, tensors: dict[str, torch.Tensor], method=None) -> None:
    """The tensors against their sidecar record and (with ``method``) against the configuration."""
    def refuse(why: str):
        raise UserError(f"calibration artifact {path} {why}; delete it to recompute")

    if meta.get("tensors") != _describe(tensors):
        refuse("does not match its sidecar's tensor shapes and dtypes")
    if method is None:
        return
    if meta.get("bits") != method.kv.bits:
        refuse(f"was made at kv.bits={meta.get('bits')}, not {method.kv.bits}")
    if meta.get("model_dims") != _dims(method.info):
        refuse(f"was made for a model with dims {meta.get('model_dims')}, not {_dims(method.info)}")
    expected = method.state_shapes()
    if expected is None:
        return
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        refuse(f"has other tensors than {method.name} expects (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            refuse(f"holds {name} of shape {got}; {method.name} at kv.bits={method.kv.bits} expects {want}")


def save_artifact(path: Path, key: str, meta: dict, tensors: dict[str, torch.Tensor], method=None) -> None:
    """Write tensors (safetensors) and their sidecar (key, checksum, shapes, dtypes, bits, dims)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))  # save_file would make it 0600
    sidecar = {"key": key, "sha256": _sha256(tmp), "tensors": _describe(tensors), **meta}
    if method is not None:
        sidecar.update(bits=method.kv.bits, model_dims=_dims(method.info))
    side_tmp = tmp.with_suffix(".jsontmp")
    side_tmp.write_text(json.dumps(sidecar, indent=2, default=str))
    os.replace(tmp, path)
    os.replace(side_tmp, path.with_suffix(".json"))


def artifact_path(cfg, method) -> tuple[Path, str, dict]:
    key, meta = artifact_key(cfg, method)
    root = Path(cfg.calib.cache_dir).expanduser() if cfg.calib.cache_dir else cache_root() / "calib"
    return root / method.name / f"{key}.safetensors", key, meta


def prepare(cfg, model, tok, splits, method) -> Path:
    """Load the method's calibration artifact, computing and storing it first if needed."""
    path, key, meta = artifact_path(cfg, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            needs = set(method.calibration_needs())
            if not cfg.calib.fisher:
                needs.discard("fisher")
            batches = calibration_batches(tok, splits.joined("calib"), cfg.calib.num_samples, cfg.calib.seqlen, cfg.seed)
            stats = without_sink(cached_collect(cfg, model, batches, frozenset(needs)), method.cfg.sink_tokens)
            save_artifact(path, key, meta, method.calibrate(stats, device=next(model.parameters()).device), method)
        method.load_state(load_artifact(path, key, method))
    return path
