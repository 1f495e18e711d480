"""Which selection runs as which sharded job (issue 24, ``data.executor``): the ``selection`` hook that
:func:`effitrain.data.sharded.build_sharded_splits` calls, chosen by the selection's scorer -- the config layer's
rule (:func:`effitrain.config.blocks.data_engine.sharded_refusal`) has refused the others at ``check``."""

from __future__ import annotations

from typing import Any, Optional


def sharded_selection(name: str, params: Any, seed: int) -> Optional[Any]:
    """The hook for ``selection=name`` (None for ``none``: every train document)."""
    if name == "none":
        return None
    scorer = params.scorer["name"]
    if scorer == "dsir":
        from effitrain.selection.sharded_dsir import ShardedDSIR

        return ShardedDSIR(params, seed=seed)
    if scorer == "minhash_dedup":
        from effitrain.selection.sharded_dedup import ShardedDedup

        return ShardedDedup(params, seed=seed)
    if scorer == "embedding_kmeans":
        from effitrain.selection.sharded_kmeans import ShardedKMeans

        return ShardedKMeans(name, params, seed=seed)
    from effitrain.selection.sharded_scored import ShardedScored

    return ShardedScored(name, params, seed=seed)
