"""The one registry of plugins, by kind: methods, evaluations, cache backends, kernel paths.

A plugin registers itself where it is defined (``@register("method", "uniform")``); :func:`get`
imports the kind's home package first (so every plugin there has registered) and fails on an
unknown name with the known ones and the closest match (lm-eval's ``api/registry.py`` style).

=================  =====================================  ==========================================
kind               home package (imported on first use)   what is registered
=================  =====================================  ==========================================
``method``         ``kvbench.methods``                    a :class:`~kvbench.method.KVMethod` subclass
``eval``           ``kvbench.eval``                       ``evaluate(cfg, model, tok, splits, method)``
``cache backend``  ``kvbench.cache``                      ``factory(model, method, n_layers, kernel)``
``kernel path``    ``kvbench.kernels.triton``             a decode-path module (``applies``/``launch``)
=================  =====================================  ==========================================
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from kvbench.errors import UserError

HOMES = {
    "method": "kvbench.methods",
    "eval": "kvbench.eval",
    "cache backend": "kvbench.cache",
    "kernel path": "kvbench.kernels.triton",
}
_PLUGINS: dict[str, dict[str, object]] = {kind: {} for kind in HOMES}


def register(kind: str, name: str):
    """Decorator: ``@register("method", "uniform")`` makes the object buildable by name."""
    if kind not in _PLUGINS:
        raise ValueError(f"unknown plugin kind {kind!r}; known: {', '.join(_PLUGINS)}")

    def wrap(obj):
        known = _PLUGINS[kind]
        if name in known and known[name] is not obj:
            raise ValueError(f"{kind} {name!r} is registered twice")
        if isinstance(obj, type):
            obj.name = name
        known[name] = obj
        return obj

    return wrap


def plugins(kind: str, load: bool = True) -> dict[str, object]:
    """Every registered plugin of ``kind`` (with ``load``, importing its home package's modules first)."""
    if not load:
        return _PLUGINS[kind]
    home = importlib.import_module(HOMES[kind])
    for info in pkgutil.iter_modules(getattr(home, "__path__", [])):
        importlib.import_module(f"{HOMES[kind]}.{info.name}")
    return _PLUGINS[kind]


def get(kind: str, name: str):
    """The plugin ``name`` of ``kind``; an unknown name is a one-line :class:`UserError`."""
    known = _PLUGINS[kind] if name in _PLUGINS[kind] else plugins(kind)
    if name not in known:
        raise unknown_name_error(kind, name, known)
    return known[name]


def did_you_mean(word: str, known) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name_error(kind: str, name: str, known) -> UserError:
    """One-line error naming the known choices and the closest match."""
    known = sorted(str(k) for k in known)
    return UserError(f"Unknown {kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known)}")
