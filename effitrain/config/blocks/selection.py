"""Selection block: an offline stage that picks training documents before tokenization."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import register


@register("selection", "none", builder="effitrain.selection.none:build_none", summary="Train on the whole pool")
@dataclass
class NoSelection:
    pass
