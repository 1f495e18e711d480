"""The data pipeline: source (demo / local / hub) -> selection -> tokenize and pack -> curriculum sampler.

* :mod:`effitrain.data.build` -- the registered dataset builders, returning ``DatasetDict(train, eval)`` with
  columns ``id``, ``text``, ``domain``;
* :mod:`effitrain.data.demo` -- the built-in demo corpus made from the Python install;
* :mod:`effitrain.data.tokenizer` -- a trained byte-level BPE or a named tokenizer;
* :mod:`effitrain.data.packing` -- fixed-length packed sequences, one domain each, cached by content;
* :mod:`effitrain.data.cache` -- build-once cache folders shared safely between processes.

Nothing is imported here, so importing the package stays cheap (``datasets`` and ``transformers`` load on use).
"""
