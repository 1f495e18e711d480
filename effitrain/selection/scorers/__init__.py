"""Scorers: ``Scorer(params).score(candidates, ctx) -> Scores``.  Candidates are a ``datasets.Dataset`` with ``text``
and ``n_tokens``; features are computed with batched ``datasets.map`` (``ctx.num_proc`` workers for the CPU ones)."""
