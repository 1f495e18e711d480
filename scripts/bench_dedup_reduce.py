#!/usr/bin/env python
"""The peak RSS of the sharded MinHash dedup's reduce (``ShardedDedup.representatives``: exact hashes numbered, then
the LSH bands numbered and the query-against-kept pass) at several pool sizes, on synthetic signature files.

    python scripts/bench_dedup_reduce.py --candidates 10000 1000000 --workdir /tmp/bench-dedup-reduce

The inputs are what the signatures stage writes (``pool/NNNNNN.npz`` and ``sig/NNNNNN.npy`` over 16 files, the
``dedup`` recipe's 128 permutations, ``uint32`` values): random signatures, 1 % of the documents a copy of an
earlier one (an exact duplicate), 1 % an earlier signature with 3 of its 128 values changed (a near duplicate).
Each size's reduce runs in a fresh process, so its peak RSS (``ru_maxrss``) is the reduce's own; the RSS before the
reduce (imports and the pool's columns loaded) is printed with it.  Memory does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FILES, NUM_PERM = 16, 128

_REDUCE = """
import json, resource, sys
from pathlib import Path
import psutil
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY
from effitrain.selection.sharded_dedup import ShardedDedup
from effitrain.selection.sharded_pool import load_pool
load_builtin_blocks()
work = Path(sys.argv[1])
block = REGISTRY.parse("selection", {"name": "dedup"}, "selection")
pool = load_pool(work, %d, None, None, 0)
from datasketch import MinHashLSH  # its import (scipy) is start-up, not the reduce
MinHashLSH(threshold=0.8, num_perm=128)
before = psutil.Process().memory_info().rss
keep, exact = ShardedDedup(block.params, seed=0).representatives(work, pool)
print(json.dumps({"candidates": pool.candidates, "kept": int(keep.sum()), "exact": int(exact.sum()),
                  "rss_before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""" % FILES


def _inputs(work: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_file = -(-n // FILES)
    made = 0
    for f in range(FILES):
        rows = min(per_file, n - made)
        sig = rng.integers(0, 2**32 - 1, size=(rows, NUM_PERM), dtype=np.uint32)
        exact = rng.integers(0, 255, size=(rows, 20), dtype=np.uint8)
        copies = rng.random(rows)
        for i in np.flatnonzero(copies < 0.02)[1:]:  # a copy of an earlier row of this file
            j = int(rng.integers(0, i))
            sig[i] = sig[j]
            if copies[i] < 0.01:
                exact[i] = exact[j]
            else:
                sig[i, rng.choice(NUM_PERM, 3, replace=False)] = rng.integers(0, 2**32 - 1, 3, dtype=np.uint32)
        (work / "sig").mkdir(parents=True, exist_ok=True)
        (work / "pool").mkdir(parents=True, exist_ok=True)
        np.save(work / "sig" / f"{f:06d}.npy", sig)
        np.savez(work / "pool" / f"{f:06d}.npz", record=np.arange(rows, dtype=np.int64),
                 domain=np.zeros(rows, dtype=np.int32), domains=np.array(["a"]),
                 weight=rng.integers(50, 500, rows, dtype=np.int64), exact=exact.view("S20").reshape(-1))
        made += rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dedup-reduce-"))
    print("| candidates | kept | exact duplicates | RSS before the reduce | peak RSS of the reduce's process |")
    print("|---|---|---|---|---|")
    for n in args.candidates:
        work = workdir / f"pool-{n}"
        if not (work / "sig").is_dir():
            _inputs(work, n)
        out = subprocess.run([sys.executable, "-c", _REDUCE, str(work)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['candidates']:,} | {r['kept']:,} | {r['exact']:,} | {r['rss_before'] / 2**20:,.0f} MB | "
              f"{r['peak'] / 2**20:,.0f} MB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
