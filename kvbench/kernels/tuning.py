"""Launch tuning as data: which decode path and launch parameters to use, per GPU and shape.

The table is ``tuning.json`` beside this module (``{gpu: {"measured_on": ..., "rules": [...]}}``, ``gpu`` a
substring of the device name or ``"default"``). :func:`rules` lists the rules that match a shape, the GPU's
own first; the decode dispatcher takes the first whose path applies to the packed format. Adding a GPU is
adding its rules (measured with ``python benchmarks/decode_attention.py``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("tuning.json")


@lru_cache(maxsize=1)
def table() -> dict:
    return {k: v for k, v in json.loads(TABLE_PATH.read_text()).items() if not k.startswith("_")}


def dumps(tab: dict) -> str:
    """The table as ``tuning.json`` keeps it: one rule per line."""
    out = ["{"]
    for i, (key, entry) in enumerate(tab.items()):
        end = "," if i < len(tab) - 1 else ""
        if key.startswith("_"):
            out.append(f"  {json.dumps(key)}: {json.dumps(entry)}{end}")
            continue
        rules = ",\n".join(f"      {json.dumps(r)}" for r in entry["rules"])
        out.append(f"  {json.dumps(key)}: {{\n    \"measured_on\": {json.dumps(entry['measured_on'])},\n"
                   f"    \"rules\": [\n{rules}\n    ]\n  }}{end}")
    return "\n".join(out + ["}"]) + "\n"


def gpu_name(device) -> str:
    """The name tuning is keyed by: the CUDA device name, or ``"cpu"``."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matches(when: dict, group: int, key_bits: int, value_bits: int, head_dim: int, batch: int = 1) -> bool:
    """True when a rule's ``when`` holds for ``group`` query heads per KV head, the given code widths and
    ``batch`` (``max_batch``: the rule is for batches up to that size)."""
    if "max_batch" in when and batch > when["max_batch"]:
        return False
    if "group" in when and when["group"] != ("mha" if group == 1 else "gqa"):
        return False
    if "bits" in when and not (key_bits in when["bits"] and value_bits in when["bits"]):
        return False
    return "head_dim" not in when or head_dim in when["head_dim"]


def rules(gpu: str, group: int, key_bits: int, value_bits: int, head_dim: int, path: str = "auto",
          batch: int = 1) -> list[dict]:
    """``[{"path": ..., **tuning}]`` in order of preference: this GPU's matching rules, then the defaults.

    With a named ``path``, that path's matching rules, else its first rule of any shape (so a path can be
    forced where the table would not choose it)."""
    tab = table()
    own = [r for key, entry in tab.items() if key != "default" and key in gpu for r in entry["rules"]]
    every = own + tab["default"]["rules"]
    out = [r for r in every if matches(r["when"], group, key_bits, value_bits, head_dim, batch)
           and path in ("auto", r["path"])]
    if not out and path != "auto":
        out = [r for r in every if r["path"] == path][:1]
    return [{k: v for k, v in r.items() if k != "when"} for r in out]


def measured_on(gpu: str) -> str:
    """The GPU the rules used for ``gpu`` were measured on."""
    tab = table()
    own = [key for key in tab if key != "default" and key in gpu]
    return own[0] if own else tab["default"]["measured_on"]
