"""A package's public names, imported on first use: its ``__init__`` names them (``__all__``)
without importing its heavy modules (torch, matplotlib, scipy) when only a light one is wanted."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def exports(package: str, where: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and the module ``__getattr__`` (PEP 562) of ``package``, whose public name
    ``name`` lives in its module ``where[name]``."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{where[name]}"), name)

    return sorted(where), __getattr__
