"""Data selection: an offline stage between the data source and tokenization.

``pool`` (a DatasetDict with train/eval) -> scorer (scores, clusters or a keep mask, computed in batches with
``datasets.map``) -> selector (the chosen indices under a budget) -> a manifest cached under the hash of its inputs
-> :class:`effitrain.selection.base.Selection` with the selected train split.  See ``docs/recipes/`` for the methods.
"""
