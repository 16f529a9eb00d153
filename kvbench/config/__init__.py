"""Configuration: the dataclass schemas (:mod:`.schema`) and the one composition (:mod:`.compose`)."""

from kvbench.config.compose import GROUPS, check_overrides, compose, conf_dir, group_options
from kvbench.config.schema import (
    SUPPORTED_BITS,
    Backend,
    CalibConfig,
    Config,
    DataConfig,
    DataSource,
    EvalConfig,
    KernelConfig,
    KernelImpl,
    KVConfig,
    LoggingConfig,
    ModelConfig,
    Prefill,
    WandbConfig,
    WandbMode,
    register_configs,
)

__all__ = [
    "GROUPS", "SUPPORTED_BITS", "Backend", "CalibConfig", "Config", "DataConfig", "DataSource", "EvalConfig",
    "KVConfig", "KernelConfig", "KernelImpl", "LoggingConfig", "ModelConfig", "Prefill", "WandbConfig", "WandbMode",
    "check_overrides", "compose", "conf_dir", "group_options", "register_configs",
]
