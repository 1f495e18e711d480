#!/usr/bin/env python
"""Write a deterministic synthetic corpus for tests and benchmarks: N documents in M files, several domains.

    python scripts/make_corpus.py OUT_DIR --docs 100000 --files 16 --format jsonl.gz

Every record is ``{"id": "<domain>-<n>", "text": ..., "domain": ...}`` (``--no-ids`` leaves ``id`` out, so the
reader numbers the records).  Texts are English-like: sentences of pseudo-words drawn from a Zipf distribution over
a vocabulary made of syllables, each domain with its own word ranking and sentence shape (``code`` writes
assignments and calls).  Document lengths follow a log-normal distribution (median ~200 words, about 1.3 KB; a long
tail to a few thousand words), as web text does.  The same arguments give the same bytes on any machine: one seeded
NumPy generator per file, documents spread over files round-robin.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

DOMAINS = ("news", "forum", "science", "fiction", "code")
_SYLLABLES = ("ka", "to", "ri", "an", "el", "mo", "su", "ne", "li", "pa", "or", "ve", "di", "en", "co", "ma", "te",
              "si", "lu", "ba", "ex", "fo", "gi", "ha", "ju", "qui", "ro", "sa", "ti", "um", "wa", "yo", "ze", "in")
_VOCAB = 6000


def vocabulary() -> list[str]:
    """``_VOCAB`` distinct pseudo-words of one to four syllables (the same list every time)."""
    rng = np.random.default_rng(1234)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < _VOCAB:
        n = int(rng.integers(1, 5))
        w = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), n))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _zipf_probabilities(n: int, s: float = 1.07) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


class DomainText:
    """Text of one domain: its own permutation of the vocabulary under one Zipf law, and its sentence shape."""

    def __init__(self, domain: str, words: list[str]) -> None:
        order = np.random.default_rng(DOMAINS.index(domain) + 7).permutation(len(words))
        self.words = np.array(words, dtype=object)[order]
        self.domain = domain
        self.cdf = np.cumsum(_zipf_probabilities(len(words)))

    def document(self, rng: np.random.Generator, n_words: int) -> str:
        ids = np.searchsorted(self.cdf, rng.random(n_words))
        ids = np.minimum(ids, len(self.words) - 1)
        tokens = self.words[ids]
        if self.domain == "code":
            return self._code(rng, tokens)
        out, i = [], 0
        while i < n_words:
            k = int(rng.integers(6, 22))
            sentence = list(tokens[i:i + k])
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + (". " if rng.random() < 0.85 else "? "))
            if rng.random() < 0.08:
                out.append("\n\n")
            i += k
        return "".join(out).strip()

    @staticmethod
    def _code(rng: np.random.Generator, tokens: np.ndarray) -> str:
        lines, i = [], 0
        while i < len(tokens):
            a, b, c = (tokens[(i + j) % len(tokens)] for j in range(3))
            lines.append(f"{a}_{b} = {c}({int(rng.integers(0, 100))})" if rng.random() < 0.6 else f"def {a}({b}):")
            i += 3
        return "\n".join(lines)


def generate(out: Path, *, docs: int, files: int, fmt: str, seed: int, ids: bool,
             domains: tuple[str, ...] = DOMAINS) -> list[Path]:
    """Write the corpus; returns the files written (sorted)."""
    out.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    texts = {d: DomainText(d, words) for d in domains}
    written = []
    for f in range(files):
        rng = np.random.default_rng([seed, f])
        numbers = range(f, docs, files)  # document n lives in file n % files
        lengths = np.clip(rng.lognormal(np.log(200), 0.8, len(numbers)), 5, 5000).astype(int)
        records = []
        for n, length in zip(numbers, lengths):
            domain = domains[int(rng.integers(0, len(domains)))]
            record = {"id": f"{domain}-{n:09d}"} if ids else {}
            record.update(text=texts[domain].document(rng, int(length)), domain=domain)
            records.append(record)
        path = out / f"part-{f:05d}.{fmt}"
        _write(path, records, fmt)
        written.append(path)
    return written


def _write(path: Path, records: list[dict], fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if fmt == "jsonl.gz":
        with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime=0: the same bytes on every run
            fh.write(body)
    else:
        path.write_bytes(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--format", choices=("jsonl", "jsonl.gz", "parquet"), default="jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", type=int, default=len(DOMAINS), help=f"how many of {', '.join(DOMAINS)}")
    parser.add_argument("--no-ids", action="store_true", help="records without an 'id' field")
    args = parser.parse_args(argv)
    if args.docs < 1 or args.files < 1 or not 1 <= args.domains <= len(DOMAINS):
        parser.error("--docs and --files must be positive, --domains between 1 and 5")
    paths = generate(args.out, docs=args.docs, files=args.files, fmt=args.format, seed=args.seed,
                     ids=not args.no_ids, domains=DOMAINS[:args.domains])
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {args.docs} documents in {len(paths)} files to {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
