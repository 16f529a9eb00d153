"""Structured config schemas, stored in Hydra's ConfigStore.

The YAML files in ``conf/`` extend these dataclasses, so an override with a typo
(``kv.bitz=4``) is an error that names the valid keys instead of a silent new key.
Method schemas live beside their method in ``methods/<name>.py`` and are registered
by :mod:`kvbench.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SUPPORTED_BITS = (2, 3, 4, 8, 16)


class Backend(StrEnum):
    """``kv.backend``: quantize-dequantize in PyTorch, or a packed cache read by kernels."""

    simulated = "simulated"
    kernel = "kernel"


class KernelImpl(StrEnum):
    """``kv.kernel.impl``: ``auto`` is Triton on CUDA, else the PyTorch reference twins."""

    auto = "auto"
    triton = "triton"
    reference = "reference"


class Prefill(StrEnum):
    """``kv.prefill``: what the prompt's own attention reads while it is processed.

    ``quantized``: every prompt token attends to the quantized K/V of the earlier prompt tokens (how
    perplexity and log-likelihoods are scored). ``full``: the prompt attends in full precision and
    the cache is quantized after the prefill (KIVI's deployment setting); decode steps read the
    quantized cache in both settings.
    """

    quantized = "quantized"
    full = "full"


class RulerHaystack(StrEnum):
    """``eval.ruler_haystack``: the filler of RULER's essay tasks (``niah_single_2`` ...)."""

    wiki = "wiki"  # the embedded Wikipedia evaluation text (offline)
    essay = "essay"  # lm-eval's own: Paul Graham's essays from the hub


class DataSource(StrEnum):
    embedded = "embedded"
    text = "text"
    hf = "hf"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Which model to load and how.

    Exactly one source is used, in this order: ``path`` (local folder), ``embedded``
    (a model shipped inside a PyPI package, see :mod:`kvbench.model`), ``hf_id``.
    """

    name: str = MISSING
    hf_id: Optional[str] = None
    path: Optional[str] = None
    embedded: Optional[str] = None
    dtype: str = "float32"
    device_map: Optional[str] = None
    max_context: Optional[int] = None
    trust_remote_code: bool = False
    chat_template: bool = False  # lm-eval prompts through the tokenizer's chat template (eval.chat_template=null)
    # random weights of the named architecture (timing and memory anywhere; no download): see
    # kvbench.model.loading.build_random_model. ``architecture`` holds the transformers config fields
    # (conf/model/<name>.yaml); ``init_seed`` seeds the device-independent weights
    random_init: bool = False
    init_seed: int = 0
    architecture: dict[str, Any] = field(default_factory=dict)


@dataclass
class KernelConfig:
    """Which kernels ``kv.backend=kernel`` runs (see docs/kernels.md).

    ``impl``: ``auto`` (Triton on CUDA, else the PyTorch reference twins) | ``triton`` | ``reference``.
    ``path``: Triton decode path, ``auto`` (the tuning table in kvbench/kernels/tuning.json) |
    ``split_k`` | ``cuda_core`` | ``tensor_core``.
    """

    impl: KernelImpl = KernelImpl.auto
    path: str = "auto"


@dataclass
class KVConfig:
    """KV-cache storage: bit width, quantization group and backend.

    ``group_size`` is the number of channels of a head that share one scale for
    per-token quantization (``None``: the whole head_dim); it must divide head_dim.
    ``prefill``: ``quantized`` | ``full`` (see :class:`Prefill`).
    """

    bits: int = 4
    group_size: Optional[int] = None
    backend: Backend = Backend.simulated
    kernel: KernelConfig = field(default_factory=KernelConfig)
    prefill: Prefill = Prefill.quantized


@dataclass
class DataConfig:
    name: str = MISSING
    source: DataSource = DataSource.embedded
    path: Optional[str] = None
    hf_path: Optional[str] = None
    hf_name: Optional[str] = None
    hf_split: str = "test"
    hf_calib_split: str = "train"
    text_field: str = "text"
    calib_fraction: float = 0.1


@dataclass
class EvalConfig:
    name: str = "ppl"
    seqlen: int = 2048
    max_windows: Optional[int] = 8
    tasks: list[str] = field(default_factory=list)
    limit: Optional[float] = None
    num_fewshot: Optional[int] = 0  # null: each lm-eval task's own (gsm8k 5, gsm8k_cot 8, most others 0)
    batch_size: int = 1
    # RULER (lm-eval's `ruler` tasks): prompt lengths in tokens of the model's tokenizer (lm-eval's `max_seq_lengths`
    # metadata), and the haystack of its essay tasks: wiki (embedded Wikipedia text, offline) | essay (lm-eval's, hub)
    max_seq_lengths: list[int] = field(default_factory=lambda: [4096])
    ruler_haystack: RulerHaystack = RulerHaystack.wiki
    # lm-eval's apply_chat_template: null follows model.chat_template; system_instruction: the system prompt
    chat_template: Optional[bool] = None
    system_instruction: Optional[str] = None
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 2


@dataclass
class CalibConfig:
    num_samples: int = 16
    seqlen: int = 512
    fisher: bool = True
    cache_dir: Optional[str] = None  # default: ~/.cache/kvbench/calib


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "kvbench"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING
    kv: KVConfig = field(default_factory=KVConfig)
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: str = "default"
    command: str = "run"  # run | calibrate
    rerun: bool = False  # recompute a finished run into its directory (not part of the run hash)
    seed: int = 0
    output_dir: str = "outputs"
    device: str = "auto"


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from kvbench.registry import plugins

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="kv", name="kv_schema", node=KVConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="calib", name="calib_schema", node=CalibConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)
    for name, cls in plugins("method").items():
        cs.store(group="method", name=f"{name}_schema", node=cls.config_class)
