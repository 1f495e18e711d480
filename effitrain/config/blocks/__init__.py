"""The built-in block schemas: one module per group (or family), each registering its entries on import."""

from __future__ import annotations

import importlib
import pkgutil


def load_builtin_blocks() -> None:
    """Import every torch-free schema module of this package (they register on import).  It lives here, not in the
    registry, because the registry is the ground every schema stands on: it must not know which schemas exist."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
