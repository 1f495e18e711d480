"""The built-in demo corpus: real text with domain labels, made from what every Python 3.11 install has.

Selection and mixture methods need data whose domains really differ, and tests must never download.  So the demo
corpus is cut, deterministically, from the running interpreter's own files:

* ``prose``      -- the reference manual text in ``pydoc_data.topics`` (what ``help('assert')`` prints);
* ``code``       -- standard-library source files, cut at top-level ``def``/``class`` boundaries;
* ``docstrings`` -- the docstrings of standard-library modules, classes and functions (found with ``ast``);
* ``arithmetic`` -- worksheets of ``17 + 25 = 42`` lines from a seeded :class:`random.Random` (a graded domain:
  every worksheet has a difficulty, its number of digits, which difficulty curricula can use).

Determinism: files are listed and sorted, every random choice comes from a ``seed``-derived generator, and nothing
depends on set/dict iteration order or on time, so two builds (in two processes) are identical.  The corpus
depends on the interpreter's version, which is part of the cache key.

Document ids are stable beyond one build: ``code-00123-0004`` is chunk 4 of the 124th source file in sorted order
and ``prose-00007-0002`` chunk 2 of the 8th topic, whatever ``seed`` or ``max_docs_per_domain`` are; an arithmetic
id ``arithmetic-000123`` names the worksheet generated from ``(seed, 123)``.  A selection manifest that lists ids
therefore keeps its meaning when the cap grows.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

DEMO_DOMAINS = ("prose", "code", "docstrings", "arithmetic")

# Bump when the way documents are cut changes, so old caches are not reused.
_FORMAT_VERSION = 1

# Directories of the standard library that are not "the standard library" as users know it: third-party installs,
# and the test suites (large, full of deliberately odd code and encodings, and absent from many distro builds).
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


# ----------------------------------------------------------------------------------------------------------------
# Cutting text into documents
# ----------------------------------------------------------------------------------------------------------------

def _split_long(block: str, max_chars: int) -> list[str]:
    """Cut one block longer than ``max_chars`` at line boundaries (a single huge line is cut hard)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in block.splitlines(keepends=True):
        while len(line) > max_chars:  # e.g. a long data literal on one line
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


def _pack_blocks(blocks: Sequence[str], min_chars: int, max_chars: int, joiner: str) -> list[str]:
    """Merge consecutive blocks into documents of at least ``min_chars`` (the last may be shorter) and at most
    ``max_chars``; a block longer than ``max_chars`` is split on its own."""
    docs: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        text = joiner.join(current).strip("\n")
        if text.strip():
            docs.append(text)
        current, size = [], 0

    for block in blocks:
        if len(block) > max_chars:
            if current:
                flush()
            for piece in _split_long(block, max_chars):
                current, size = [piece], len(piece)
                flush()
            continue
        if current and size + len(joiner) + len(block) > max_chars:
            flush()
        current.append(block)
        size += len(block) + len(joiner)
        if size >= min_chars:
            flush()
    if current:
        flush()
    return docs


_TOP_LEVEL_START = re.compile(r"(?:async\s+def|def|class)\s|@")


def _code_blocks(source: str) -> list[str]:
    """Cut a module at its top-level ``def``/``class`` statements, keeping decorators with what they decorate."""
    blocks: list[list[str]] = [[]]
    previous_was_decorator = False
    for line in source.splitlines(keepends=True):
        starts = bool(_TOP_LEVEL_START.match(line))
        if starts and not previous_was_decorator and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
        if line.strip():
            previous_was_decorator = line.startswith("@")
    return ["".join(b) for b in blocks if "".join(b).strip()]


def _prose_paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


# ----------------------------------------------------------------------------------------------------------------
# The sources, each a list of "groups" (a file, a topic) that are cut into documents
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's ``.py`` files in sorted order (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(path)
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _read_source(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # a deliberately mis-encoded module: not worth a special case
        return None


def _code_docs(path: Path) -> list[str]:
    source = _read_source(path)
    if source is None:
        return []
    # Documents of ~1k characters, like the other domains', so that code does not dominate the token count.
    return _pack_blocks(_code_blocks(source), min_chars=600, max_chars=1500, joiner="")


def _docstring_docs(path: Path) -> list[str]:
    """One document per docstring of at least 40 characters (shorter ones are mostly "Return x.")."""
    source = _read_source(path)
    if source is None:
        return []
    try:
        with warnings.catch_warnings():  # invalid escape sequences in old modules warn on parse
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):  # breadth-first: module, then classes/functions in source order per level
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                docs.extend(_split_long(doc, 3000))
    return docs


def _prose_groups() -> list[tuple[str, Callable[[], list[str]]]]:
    from pydoc_data.topics import topics

    def cut(name: str) -> Callable[[], list[str]]:
        return lambda: _pack_blocks(_prose_paragraphs(topics[name]), min_chars=800, max_chars=2000, joiner="\n\n")

    return [(name, cut(name)) for name in sorted(topics)]


def _file_groups(cutter: Callable[[Path], list[str]]) -> list[tuple[str, Callable[[], list[str]]]]:
    return [(path.name, (lambda p=path: cutter(p))) for path in stdlib_files()]


def _collect(domain: str, groups: list[tuple[str, Callable[[], list[str]]]], n_eval: int, n_train: int,
             seed: int) -> tuple[list[dict], list[dict]]:
    """Visit the groups in a seeded order and cut them lazily until there are enough documents.

    Eval documents come first and take whole groups (the rest of the last eval group is dropped), so no file or
    topic is shared between eval and train: eval loss then measures generalisation, not memorised neighbours.
    Cutting lazily matters: parsing the whole standard library would take seconds that a small build never needs.
    """
    order = list(range(len(groups)))
    random.Random(f"demo-{domain}-{seed}").shuffle(order)
    eval_docs: list[dict] = []
    train_docs: list[dict] = []
    for g in order:
        if len(train_docs) >= n_train:
            break
        in_eval = len(eval_docs) < n_eval
        for c, text in enumerate(groups[g][1]()):
            doc = {"id": f"{domain}-{g:05d}-{c:04d}", "text": text, "domain": domain}
            if in_eval:
                if len(eval_docs) < n_eval:
                    eval_docs.append(doc)
            elif len(train_docs) < n_train:
                train_docs.append(doc)
    return train_docs, eval_docs


_OPS = ("+", "-", "*")


def arithmetic_worksheet(rng: random.Random) -> str:
    """A worksheet of 8-24 exact integer problems whose operands have ``digits`` digits (its difficulty)."""
    digits = rng.randint(1, 4)
    lines = [f"Worksheet: {digits}-digit arithmetic"]
    for _ in range(rng.randint(8, 24)):
        op = rng.choice(_OPS)
        a = rng.randint(0, 10 ** digits - 1)
        b = rng.randint(0, 10 ** (digits if op != "*" else max(1, digits - 1)) - 1)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines)


def _arithmetic(n_eval: int, n_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    docs = []
    for i in range(n_eval + n_train):
        # One generator per worksheet (a str seed is hashed with SHA-512, stable across processes), so worksheet i
        # is the same whatever the cap is.
        rng = random.Random(f"demo-arithmetic-{seed}-{i}")
        docs.append({"id": f"arithmetic-{i:06d}", "text": arithmetic_worksheet(rng), "domain": "arithmetic"})
    return docs[n_eval:], docs[:n_eval]


def make_demo_docs(max_docs_per_domain: int, eval_examples_per_domain: int, seed: int,
                   domains: Sequence[str] = DEMO_DOMAINS) -> tuple[list[dict], list[dict]]:
    """The (train, eval) documents of the demo corpus as lists of ``{"id", "text", "domain"}``, uncached.

    ``max_docs_per_domain`` caps the train documents of each domain; eval gets ``eval_examples_per_domain`` more,
    disjoint from train.  A domain with fewer documents (prose has ~450) simply has fewer.
    """
    train: list[dict] = []
    eval_: list[dict] = []
    for domain in domains:  # in the caller's (canonical) order
        if domain == "arithmetic":
            t, e = _arithmetic(eval_examples_per_domain, max_docs_per_domain, seed)
        else:
            groups = {"prose": _prose_groups, "code": lambda: _file_groups(_code_docs),
                      "docstrings": lambda: _file_groups(_docstring_docs)}[domain]()
            t, e = _collect(domain, groups, eval_examples_per_domain, max_docs_per_domain, seed)
        train.extend(t)
        eval_.extend(e)
    return train, eval_


# ----------------------------------------------------------------------------------------------------------------
# Cached DatasetDict
# ----------------------------------------------------------------------------------------------------------------

def demo_cache_key(max_docs_per_domain: int, eval_examples_per_domain: int, seed: int,
                   domains: Sequence[str]) -> str:
    """A hash of everything the corpus depends on, the interpreter's version included."""
    blob = json.dumps({"format": _FORMAT_VERSION, "python": sys.version, "max": max_docs_per_domain,
                       "eval": eval_examples_per_domain, "seed": seed, "domains": list(domains)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_demo(max_docs_per_domain: int = 2000, eval_examples_per_domain: int = 64, seed: int = 0,
              domains: Optional[Sequence[str]] = None, *, cache_root: Optional[Path] = None):
    """The demo corpus as ``DatasetDict(train, eval)`` with columns ``id``, ``text``, ``domain``.

    Built once per parameter set and kept with ``save_to_disk`` under ``<cache>/demo/<key>``; later calls (and
    other processes, e.g. the other torchrun ranks) memory-map the saved copy.  The returned datasets are always
    the ones loaded from disk, so their ``datasets`` fingerprints are stable across runs.
    """
    from effitrain.data.cache import build_once, quiet_progress

    domains = list(DEMO_DOMAINS if domains is None else [d for d in DEMO_DOMAINS if d in set(domains)])
    key = demo_cache_key(max_docs_per_domain, eval_examples_per_domain, seed, domains)

    def build(tmp: Path) -> None:
        import datasets

        train, eval_ = make_demo_docs(max_docs_per_domain, eval_examples_per_domain, seed, domains)
        features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                      "domain": datasets.Value("string")})
        dd = datasets.DatasetDict({
            "train": datasets.Dataset.from_list(train, features=features),
            "eval": datasets.Dataset.from_list(eval_, features=features),
        })
        dd.save_to_disk(str(tmp))

    with quiet_progress(max_docs_per_domain * len(domains)):
        path = build_once("demo", key, build, cache_root=cache_root)
    import datasets

    return datasets.load_from_disk(str(path))

