"""The one composition of the packaged Hydra config, and the one-line override check.

Everything that builds a config — the CLI, the sweep runner, reports, benchmarks, tests — calls
:func:`compose` (or Hydra's own ``@hydra.main`` for the CLI), so the override check and the schemas
are the same everywhere.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from kvbench.errors import UserError
from kvbench.registry import did_you_mean as _did_you_mean

GROUPS = ("model", "method", "kv", "data", "eval", "calib", "logging", "experiment")


def conf_dir() -> str:
    """The packaged ``conf/`` folder (works for editable and regular installs, from any cwd)."""
    return str(Path(str(files("kvbench.conf"))).resolve())


def group_options(group: str) -> list[str]:
    root = Path(conf_dir()) / group  # options in subfolders too (experiment=kvquant_ablation/nuq)
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def check_overrides(args: list[str]) -> str | None:
    """One-line error for an unknown config option or key, before Hydra prints a traceback-like report.

    Group choices (``method=qokvv``) are checked against ``conf/<group>/``; dotted keys
    (``kv.bitz=4``) against the composed config, naming the valid keys.
    """
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    for ov in overrides:
        key, value = ov.lstrip("+~").split("=", 1)
        if key in GROUPS:
            known = group_options(key)
            for choice in value.split(","):
                if choice and choice not in known and not choice.startswith(("choice(", "range(", "glob(")):
                    return f"Unknown {key} {choice!r}.{_did_you_mean(choice, known)} Known: {', '.join(known)}"
    if "-m" in args or "--multirun" in args:
        return None  # sweep syntax (a,b) cannot be composed as one config; Hydra validates each job
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            compose("config", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - turned into one line below
        msg = str(e).splitlines()[0]
        typed = _type_error(e)
        if typed:
            return typed
        for ov in overrides:
            key = ov.lstrip("+~").split("=", 1)[0]
            parent, _, leaf = key.rpartition(".")
            if not parent:
                continue
            try:
                with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
                    base = compose("config", overrides=[o for o in overrides if o != ov])
                node = OmegaConf.select(base, parent)
            except Exception:  # noqa: BLE001
                continue
            if OmegaConf.is_dict(node) and leaf not in node:
                return f"Unknown key {key!r}.{_did_you_mean(leaf, node.keys())} Valid keys of {parent}: {', '.join(node.keys())}"
        return f"invalid override: {msg}"
    return None


EXPECTED = {"Integer": "an integer", "Float": "a number", "bool": "true or false", "ListConfig": "a list, e.g. [a,b]"}


def _type_error(e: Exception) -> str | None:
    """``kv.bits=four`` -> "kv.bits=four: an integer is expected (got 'four')"."""
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if not key:
        return None
    text = str(cause).splitlines()[0]
    choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", text)
    if choice:  # an Enum field: name the choices and the closest one
        value, known = choice.group(1), choice.group(2).split(", ")
        return f"{key}={value}: expected one of {', '.join(known)}.{_did_you_mean(value, known)}"
    for word, expected in EXPECTED.items():
        if word in text:
            value = str(e).split("=", 1)[1] if "=" in str(e) else "?"
            return f"{key}={value}: {expected} is expected ({text})"
    return None


def compose(overrides=()):
    """The packaged config composed with ``overrides`` (as ``python -m kvbench`` would compose it).

    Raises:
        UserError: one line naming the bad override (unknown key or option, wrong type, bad choice).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kvbench.config.schema import register_configs

    overrides = list(overrides)
    register_configs()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - every composition failure becomes one line
        raise UserError(check_overrides(overrides) or str(e).strip().splitlines()[0]) from None
