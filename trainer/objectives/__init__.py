"""Training objectives behind one interface (:class:`~irepa.trainer.objectives.base.Objective`).

``register`` adds a class under its ``name``; ``get_objective(name)`` returns it (built-in
objectives are imported on first use). Importing this package does not import torch:
``objective_options(name)`` gives a built-in objective's flags from
:mod:`~irepa.trainer.objectives.options` without loading the objective, so a command line is
checked before anything heavy loads.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

from .options import BUILTIN_OPTIONS

if TYPE_CHECKING:  # imported lazily below (they need torch)
    from .base import DataSpec, Objective, Phase

__all__ = ["DataSpec", "Objective", "Phase", "register", "get_objective", "objective_names", "objective_options"]

#: built-in objectives: name -> module that registers it
BUILTIN = {"flow": "irepa.trainer.objectives.flow", "meanflow": "irepa.trainer.objectives.meanflow",
           "jit": "irepa.trainer.objectives.jit", "repae": "irepa.trainer.objectives.repae"}
_REGISTRY: dict[str, type[Objective]] = {}


def __getattr__(name: str) -> Any:
    if name in ("DataSpec", "Objective", "Phase"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable as ``--objective cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def objective_names() -> list[str]:
    """Every selectable objective name (built-in and registered)."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, objective_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown --objective {name!r}: expected one of {', '.join(objective_names())}{hint}")


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (ValueError naming the real ones otherwise)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name]


def objective_options(name: str) -> type | None:
    """The options dataclass of objective ``name`` (``None`` if it has no flags of its own); a
    built-in one's without importing its module (no torch)."""
    if name in _REGISTRY:
        return _REGISTRY[name].Options
    if name in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[name]
    raise _unknown(name)
