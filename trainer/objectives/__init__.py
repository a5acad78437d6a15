"""Training objectives behind one interface (:class:`~irepa.trainer.objectives.base.Objective`).

``register`` adds a class under its ``name``; ``get_objective(name)`` returns it (built-in
objectives are imported on first use, so importing this package stays cheap).
"""

from __future__ import annotations

import difflib
import importlib

from .base import DataSpec, Objective, Phase

__all__ = ["DataSpec", "Objective", "Phase", "register", "get_objective", "objective_names"]

#: built-in objectives: name -> module that registers it
BUILTIN = {"flow": "irepa.trainer.objectives.flow", "meanflow": "irepa.trainer.objectives.meanflow",
           "jit": "irepa.trainer.objectives.jit", "repae": "irepa.trainer.objectives.repae"}
_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable as ``--objective cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def objective_names() -> list[str]:
    """Every selectable objective name (built-in and registered)."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (ValueError naming the real ones otherwise)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, objective_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown --objective {name!r}: expected one of {', '.join(objective_names())}{hint}")
    return _REGISTRY[name]
