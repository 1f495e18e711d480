#!/usr/bin/env python
"""merge_ablation against training the mixtures: do the merged proxies rank candidate mixtures as trained models do?

The paper's claim (Na et al. 2024, 2410.15661): the perplexity of a parameter average of partition models, weighted
by a candidate mixture, is highly (rank) correlated with the perplexity of a model trained on that mixture.  Per seed:

1. ``effitrain +recipe=merge_ablation`` as a user runs it (the seed stage, one continued run per domain partition,
   every candidate on the simplex grid scored by its merged model, the main stage on the best);
2. K candidates are taken from the recipe's ranking, evenly spaced over it (best and worst included), leaving out the
   single-partition vertices: their "merged" model *is* a partition model, so trained and proxy agree by
   construction and would inflate the correlation;
3. each of the K mixtures is trained through the CLI exactly as a partition run is (continued from the same seed
   model, the same steps, scheduler and seed), with the mixture in place of the single domain; the runs' resolved
   configs are checked to differ from the partition runs' in the mixture alone;
4. every trained model is scored on the same held-out rows the recipe scored its merged models on (the partition
   models are re-scored first, and must reproduce the recipe's own losses for the vertices);
5. Spearman's rank correlation (scipy) between the merged-proxy and trained perplexities over the K candidates, and
   whether the recipe's chosen mixture is also the best of the K once trained.

    OMP_NUM_THREADS=1 python scripts/bench_merge_ablation.py --seeds 0 --candidates 8
    OMP_NUM_THREADS=1 python scripts/bench_merge_ablation.py --seeds 0 1 --write docs/benchmarks.md

Extra ``key=value`` arguments go to the recipe runs (e.g. ``stages.1.train.max_steps=60``); ``--mixture-steps``
trains the K mixtures longer or shorter than a partition run (default: the same steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402

SECTION_START = "<!-- bench_merge_ablation:start -->"
SECTION_END = "<!-- bench_merge_ablation:end -->"
HEADING = "### merge_ablation: merged proxies against models trained on each mixture"
PARTITIONS = "stages/02-partitions"
SEED_MODEL = "stages/01-seed/final_model"
# keys a candidate run may differ in from a partition run: where it writes, and the mixture it trains on
# (and the recipe's name and paper: metadata the stage's runs carry, not settings)
OWN_KEYS = ("run_dir", "timeline.mixture", "overwrite", "resume", "recipe")


# ------------------------------------------------------------------------------------------------ the pure parts
def pick_candidates(mixtures: Sequence[Sequence[float]], losses: Sequence[float], k: int) -> list[int]:
    """Indices of ``k`` non-vertex mixtures evenly spaced over their ranking by ``losses`` (the lowest and the
    highest included), in rank order."""
    inner = [i for i, m in enumerate(mixtures) if sum(1 for w in m if w > 0) > 1]
    ranked = sorted(inner, key=lambda i: (losses[i], i))
    if k > len(ranked):
        raise ValueError(f"--candidates {k}: the grid has only {len(ranked)} mixtures of two or more partitions")
    if k < 2:
        raise ValueError("--candidates: a rank correlation needs at least 2 candidates")
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, k)).astype(int))
    return [ranked[p] for p in picks]


def spearman(proxy: Sequence[float], trained: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (scipy; ties get average ranks)."""
    from scipy.stats import spearmanr

    result = spearmanr(proxy, trained)
    return float(result.statistic), float(result.pvalue)


def mixture_text(mixture: dict[str, float]) -> str:
    return ", ".join(f"{d} {w:g}" for d, w in mixture.items() if w > 0)


def seed_table(rows: list[dict[str, Any]]) -> str:
    """One seed's candidates: the mixture, the proxy's perplexity and rank, the trained model's and its rank."""
    proxy_rank = {id(r): i + 1 for i, r in enumerate(sorted(rows, key=lambda r: r["proxy_ppl"]))}
    trained_rank = {id(r): i + 1 for i, r in enumerate(sorted(rows, key=lambda r: r["trained_ppl"]))}
    lines = ["| mixture | merged-proxy perplexity | rank | trained perplexity | rank |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["proxy_ppl"]):
        chosen = " (the recipe's choice)" if r.get("chosen") else ""
        lines.append(f"| {mixture_text(r['mixture'])}{chosen} | {r['proxy_ppl']:.2f} | {proxy_rank[id(r)]} | "
                     f"{r['trained_ppl']:.2f} | {trained_rank[id(r)]} |")
    return "\n".join(lines)


def summary_table(per_seed: dict[int, dict[str, Any]]) -> str:
    lines = ["| seed | candidates | Spearman rho (p) | recipe's choice (merged proxy) | its trained rank | best trained "
             "mixture | trained perplexity: choice / best / uniform |", "|---|---|---|---|---|---|---|"]
    for seed, s in per_seed.items():
        rows = s["rows"]
        best = min(rows, key=lambda r: r["trained_ppl"])
        chosen = next(r for r in rows if r.get("chosen"))
        rank = 1 + sorted(r["trained_ppl"] for r in rows).index(chosen["trained_ppl"])
        uniform = next((r for r in rows if len(set(r["mixture"].values())) == 1), None)
        lines.append(f"| {seed} | {len(rows)} | {s['rho']:.2f} ({s['p']:.2f}) | {mixture_text(chosen['mixture'])} | "
                     f"{rank} of {len(rows)} | {mixture_text(best['mixture'])} | {chosen['trained_ppl']:.2f} / "
                     f"{best['trained_ppl']:.2f} / {_ppl_text(uniform)} |")
    return "\n".join(lines)


def _ppl_text(row: Optional[dict[str, Any]]) -> str:
    return f"{row['trained_ppl']:.2f}" if row else "not a candidate"


def config_differences(a: dict[str, Any], b: dict[str, Any], ignore: Sequence[str] = OWN_KEYS) -> list[str]:
    """Dotted keys whose values differ between two run configs, leaving out ``ignore`` and what lies under them.  A
    key one config leaves out and the other sets to null or false is not a difference (a stage's inherited model
    block names only its path and switches; the ``pretrained`` option spells out its null/false defaults)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(a), flat(b)
    skip = lambda key: any(key == i or key.startswith(i + ".") for i in ignore)  # noqa: E731
    unset = lambda flat_cfg, key: key not in flat_cfg or flat_cfg[key] is None or flat_cfg[key] is False  # noqa: E731
    return sorted(k for k in set(fa) | set(fb) if not skip(k) and fa.get(k, "<absent>") != fb.get(k, "<absent>")
                  and not (unset(fa, k) and unset(fb, k) and (k not in fa or k not in fb)))


# ------------------------------------------------------------------------------------------------ the runs
def _cli(overrides: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "effitrain.cli", "logger.progress_bar=false", *overrides], cwd=REPO,
                   check=True)


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def _score(folder: Path, rows: np.ndarray) -> float:
    """The mean token loss of a saved model on ``rows``, by the recipe's own scoring function."""
    from transformers import AutoModelForCausalLM

    from effitrain.curriculum import merge_ablation

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return merge_ablation.evaluate_candidates(model, [state], np.array([[1.0]]), rows)[0]


def bench_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from effitrain.curriculum import merge_ablation
    from effitrain.curriculum.merge_ablation_sweep import eval_rows

    out = args.out / f"seed{seed}"
    recipe_run = out / "recipe"
    # what is compared is the partitions stage's ranking; the recipe's main stage (training the chosen mixture from
    # scratch) does not enter it, so a reused run needs that stage's conclusion only
    if not (args.reuse and (recipe_run / PARTITIONS / "concluded.yaml").is_file()):
        _cli(["+recipe=merge_ablation", f"train.seed={seed}", f"run_dir={recipe_run}", "overwrite=true",
              *args.overrides])
    record = _yaml(recipe_run / PARTITIONS / "concluded.yaml")["record"]
    domains = record["domains"]
    mixtures = [[c["mixture"][d] for d in domains] for c in record["candidates"]]
    losses = [c["loss"] for c in record["candidates"]]
    members = {d: recipe_run / PARTITIONS / "members" / f"partition-{d}" for d in domains}
    member_cfg = _yaml(members[domains[0]] / "config.yaml")
    targets = domains if record["target"] == "all" else [record["target"]]
    rows = eval_rows(member_cfg, targets, member_cfg_eval_rows(recipe_run))
    if len(rows) != record["eval_rows"]:
        raise SystemExit(f"re-built {len(rows)} eval rows, the recipe scored {record['eval_rows']}")
    # the scoring here must be the recipe's: a partition model alone is the vertex candidate
    for d in domains:
        vertex = next(c for c in record["candidates"] if c["mixture"][d] == 1.0)
        again = _score(members[d] / "final_model", rows)
        if abs(again - vertex["loss"]) > 1e-4:
            raise SystemExit(f"partition-{d} scores {again:.6f} here, {vertex['loss']:.6f} in the recipe")

    steps = args.mixture_steps or member_cfg["train"]["max_steps"]
    picked = pick_candidates(mixtures, losses, args.candidates)
    chosen = [record["chosen"]["mixture"].get(d, 0.0) for d in domains]
    results = []
    for i in picked:
        mixture = dict(zip(domains, mixtures[i]))
        tag = "mix-" + "-".join(f"{d[:4]}{round(w * 100)}" for d, w in mixture.items() if w > 0)
        run = out / tag
        value = "{" + ",".join(f"{d}:{w}" for d, w in mixture.items() if w > 0) + "}"
        if not (args.reuse and (run / "summary.json").is_file()):
            switches = [f"model.{k}={v}" for k, v in member_cfg["model"].items() if k not in ("name", "path")]
            _cli(["curriculum=mixture", "model=pretrained", f"model.path={recipe_run / SEED_MODEL}", *switches,
                  f"++timeline.mixture={{unit:step,points:[{{at:0,value:{value}}}]}}",
                  f"train.seed={seed}", f"train.max_steps={steps}",
                  f"scheduler.warmup_steps={member_cfg['scheduler']['warmup_steps']}",
                  f"train.eval_every={member_cfg['train']['eval_every']}", "train.save_final_model=true",
                  f"run_dir={run}", "overwrite=true", *args.overrides_mixture])
        if args.mixture_steps is None:
            diff = config_differences(member_cfg, _yaml(run / "config.yaml"))
            if diff:
                raise SystemExit(f"{tag}: its config differs from a partition run's in {diff}")
        trained = _score(run / "final_model", rows)
        results.append({"mixture": mixture, "proxy_loss": losses[i], "trained_loss": trained,
                        "proxy_ppl": merge_ablation.perplexity(losses[i]),
                        "trained_ppl": merge_ablation.perplexity(trained),
                        "chosen": np.allclose(mixtures[i], chosen)})
    if not any(r["chosen"] for r in results):
        raise SystemExit("the recipe's choice is not among the candidates (it should rank first)")
    rho, p = spearman([r["proxy_loss"] for r in results], [r["trained_loss"] for r in results])
    return {"rows": results, "rho": rho, "p": p, "steps": steps, "eval_rows": len(rows),
            "grid": len(mixtures), "domains": domains}


def member_cfg_eval_rows(recipe_run: Path) -> int:
    """``eval_rows`` of the partitions stage's sweep, as the recipe ran it."""
    cfg = _yaml(recipe_run / "config.yaml")
    return int(cfg["stages"][1]["sweep"].get("eval_rows", 16))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--candidates", type=int, default=8, help="mixtures trained per seed (K)")
    parser.add_argument("--mixture-steps", type=int, default=None,
                        help="steps of each mixture run (default: a partition run's, the same budget)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_merge_ablation")
    parser.add_argument("--reuse", action="store_true", help="read finished runs under --out instead of running")
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section of the file")
    args, args.overrides = parser.parse_known_args(argv)
    # the recipe's stage keys (stages.N....) do not apply to the plain mixture runs
    args.overrides_mixture = [o for o in args.overrides if not o.lstrip("+~").startswith("stages.")]

    per_seed = {seed: bench_seed(seed, args) for seed in args.seeds}
    (args.out / "results.json").write_text(json.dumps({str(s): v for s, v in per_seed.items()}, indent=1))
    tables = [f"Seed {seed}:\n\n{seed_table(s['rows'])}" for seed, s in per_seed.items()]
    text = summary_table(per_seed) + "\n\n" + "\n\n".join(tables)
    print(text)
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_merge_ablation.py " + " ".join(
            ["--seeds " + " ".join(map(str, args.seeds)), f"--candidates {args.candidates}",
             *([f"--mixture-steps {args.mixture_steps}"] if args.mixture_steps else []), *args.overrides,
             f"--write {args.write}"])
        first = next(iter(per_seed.values()))
        body = (f"{HEADING}\n\n{SECTION_START}\n"
                f"`effitrain +recipe=merge_ablation` (tiny_llama, a 40-step seed, one 30-step continued run per "
                f"domain: {', '.join(first['domains'])}; {first['grid']} candidates on the 0.25 grid scored by "
                f"their merged models), then {args.candidates} of its candidates of two or more domains, evenly "
                f"spaced over its ranking, each trained like a partition run ({first['steps']} steps from the same "
                f"seed model, same scheduler and seed) on the mixture. Every model is scored on the same "
                f"{first['eval_rows']} held-out rows (every domain's) the recipe scores its merged models on. Rank "
                f"correlation: Spearman's rho (scipy) between the two perplexities over the candidates. Machine: "
                f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.\n\n"
                f"```\n{cmd}\n```\n\n{text}\n")
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"{HEADING}\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
