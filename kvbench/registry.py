"""The one method registry: ``name -> KVMethod subclass``, with did-you-mean errors."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from kvbench.errors import UserError

METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("uniform")`` makes the method buildable by name."""

    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def unknown_name_error(kind: str, name: str, known) -> UserError:
    """One-line error naming the known choices and the closest match."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UserError(f"Unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")


def load_methods() -> dict[str, type]:
    """Import every module of ``kvbench.methods`` so each registers itself."""
    import kvbench.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"kvbench.methods.{info.name}")
    return METHODS


def get_method_class(name: str) -> type:
    load_methods()
    if name not in METHODS:
        raise unknown_name_error("method", name, METHODS)
    return METHODS[name]
