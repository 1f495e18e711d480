"""Memory-efficient training benchmark: the same model, data and steps with AdamW and each memory recipe.

Runs every configuration through the real entry point (``python -m effitrain.cli``), reads each run's
``summary.json`` (memory measured by ``effitrain.memory.memory_report``) and writes a table into
``docs/benchmarks.md`` under the heading "Memory-efficient training" (only that section is replaced).

    python scripts/bench_memory.py                        # CPU: the tiny default model
    python scripts/bench_memory.py --steps 200 --gpu      # GPU: llama_125m (>= 100M parameters), bf16

A second table compares per-layer weight updates (``optimizer.per_layer_updates=true``) with the ordinary step on a
wider model, where the full set of gradients is large enough to show in the process peak (both sides run with
``train.clip_grad_norm=0``, which per-layer updates require, and fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["baseline", "galore", "galore_8bit", "natural_galore", "dct_lowrank", "adamw_8bit", "apollo", "apollo_mini",
           "adam_mini", "muon", "cosmos", "lisa", "sltrain", "low_rank_refresh", "lora", "dora", "pissa", "ia3", "prefix_tuning", "mam_adapter", "tri_adapt_lora", "loram"]
#: a multi-stage recipe's row: the memory of the stage that trains the method, the eval loss of the pipeline's end
#: (loram: the LoRA trained on the pruned model; the loss of the full model with the recovered adapter)
METHOD_STAGE = {"loram": "pruned_lora"}
HEADING = "## Memory-efficient training"


#: the wider model of the per-layer table: ~27M parameters, so all gradients together are ~100 MiB in fp32
PER_LAYER_MODEL = ["model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=4",
                   "model.intermediate_size=1376"]


#: ``--reuse``: a run whose folder holds a summary made with the same command line is read, not run again
REUSE = False


def run(recipe: str, common: list[str], out: Path, label: str = "") -> dict:
    run_dir = out / (label or recipe)
    args = [sys.executable, "-m", "effitrain.cli", f"+recipe={recipe}", *common, f"run_dir={run_dir}", "overwrite=true"]
    record = out / f"{label or recipe}.args.json"   # beside the run folder, which overwrite=true replaces
    t = time.perf_counter()
    reused = REUSE and (run_dir / "summary.json").exists() and record.exists() \
        and json.loads(record.read_text()) == args[1:]
    if not reused:
        record.unlink(missing_ok=True)
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return {"error": tail[0][:200], "wall": time.perf_counter() - t}
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(args[1:]))
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("stages") and recipe in METHOD_STAGE:
        row = next(s for s in summary["stages"] if s["stage"] == METHOD_STAGE[recipe])
        summary = {**json.loads((Path(row["run_dir"]) / "summary.json").read_text()),
                   "final_eval_loss": summary.get("final_eval_loss")}
    summary["wall"] = time.perf_counter() - t
    return summary


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(results: dict[str, dict]) -> str:
    base = results["baseline"]
    rows = ["| recipe | trainable params | optimizer state (MiB) | vs AdamW | peak memory (MiB) | step time vs AdamW "
            "| final eval loss | Δ loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base_step = base["train_seconds"] / max(base["steps"], 1)
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        step = r["train_seconds"] / max(r["steps"], 1)
        rows.append(f"| {name} | {r['trainable_params']:,} | {mib(r['optimizer_state_bytes'])} | "
                    f"{r['optimizer_state_bytes'] / base['optimizer_state_bytes']:.2f} | {mib(r['peak_memory_bytes'])} | "
                    f"{step / base_step:.2f} | {r['final_eval_loss']:.3f} | {r['final_eval_loss'] - base['final_eval_loss']:+.3f} |")
    return "\n".join(rows)


def galore_expected_ratio(run_dir: Path) -> str:
    """The paper's expectation for the GaLore run: (2·r·n + m·r)/(2·m·n) of AdamW's state on every targeted m×n
    weight (m the smaller side, projected to rank r), full AdamW state on the rest (embeddings, norms)."""
    cfg = json.loads((run_dir / "final_model" / "config.json").read_text())
    import yaml
    rank = yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["rank"]
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * layers
    adam = sum(2 * a * b for a, b in shapes)
    galore = sum(2 * rank * max(a, b) + min(a, b) * rank for a, b in shapes)
    rest = 2 * (cfg["vocab_size"] * h + h * (2 * layers + 1))  # tied embedding/head and the RMSNorm scales
    return (f"GaLore (rank {rank}): expected {galore / adam:.2f} of AdamW's state on the targeted weights, "
            f"{(galore + rest) / (adam + rest):.2f} of the whole optimizer state once the untargeted embedding and "
            f"norms (full AdamW) are counted")


def per_layer_table(out: Path, steps: int, recipes: list[str]) -> str:
    common = [f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=5", "logger.progress_bar=false",
              "scheduler.warmup_steps=2", "precision=fp32", "train.clip_grad_norm=0", *PER_LAYER_MODEL]
    rows = ["| recipe | per-layer updates | trainable params | fp32 gradients of all params (MiB) "
            "| peak RSS (MiB) | Δ peak vs ordinary step | step time vs ordinary | final eval loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for recipe in recipes:
        pair = {}
        for per_layer in (False, True):
            label = f"per_layer-{recipe}-{'on' if per_layer else 'off'}"
            r = run(recipe, [*common, f"optimizer.per_layer_updates={str(per_layer).lower()}"], out, label)
            pair[per_layer] = r
            print(label, r.get("error") or f"peak={r['peak_memory_bytes']} loss={r['final_eval_loss']:.3f}",
                  flush=True)
        off = pair[False]
        for per_layer, r in pair.items():
            if "error" in r:
                rows.append(f"| {recipe} | {'yes' if per_layer else 'no'} | failed: {r['error']} |  |  |  |  |  |")
                continue
            grads = 4 * r["trainable_params"]   # what the ordinary step holds at once at the end of backward
            delta = (r["peak_memory_bytes"] - off["peak_memory_bytes"]) if "error" not in off else float("nan")
            step = (r["train_seconds"] / r["steps"]) / (off["train_seconds"] / off["steps"]) if "error" not in off \
                else float("nan")
            rows.append(f"| {recipe} | {'yes' if per_layer else 'no'} | {r['trainable_params']:,} | {mib(grads)} | "
                        f"{mib(r['peak_memory_bytes'])} | {mib(delta)} | {step:.2f} | {r['final_eval_loss']:.3f} |")
    return "\n".join(rows)


def write_section(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = text.find(HEADING)
    if start >= 0:
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + body + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    doc.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--gpu", action="store_true", help="llama_125m in bf16 (needs a GPU)")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_memory")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--per-layer-steps", type=int, default=20, help="steps of each per-layer comparison run (0: skip)")
    ap.add_argument("--per-layer-recipes", nargs="*", default=["baseline", "galore"])
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already in --out that were made with the same command line (delete a run's "
                         "folder to run it again): one row can be rerun without the others")
    ap.add_argument("extra", nargs="*", help="further overrides for every run")
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    common = [f"train.max_steps={a.steps}", f"train.eval_every={a.steps}", "train.log_every=10",
              "logger.progress_bar=false", "scheduler.warmup_steps=10", *a.extra]
    common += ["model=llama_125m", "precision=bf16"] if a.gpu else ["precision=fp32"]
    recipes = a.recipes if "baseline" in a.recipes else ["baseline", *a.recipes]
    results = {}
    for recipe in recipes:
        results[recipe] = run(recipe, common, a.out)
        r = results[recipe]
        print(recipe, r.get("error") or f"state={r['optimizer_state_bytes']} loss={r['final_eval_loss']:.3f}",
              flush=True)
    device = "GPU" if a.gpu else "CPU"
    cmd = "python scripts/bench_memory.py " + " ".join(shlex.quote(x) for x in sys.argv[1:] if x != "--reuse")
    info = results["baseline"]
    body = (f"{HEADING}\n\n"
            f"{device}: {info.get('total_params', 0):,}-parameter model, {a.steps} steps, global batch "
            f"{info.get('global_batch_size')} x {info.get('seq_len')} tokens of the demo corpus, precision "
            f"{info.get('precision')}, ZeRO stage 0, one process. Memory is measured from the live tensors "
            f"(`effitrain.memory`); peak memory is the process peak RSS on CPU (it includes the Python runtime and "
            f"libraries, so differences are small there) and `torch.cuda.max_memory_allocated` on a GPU. "
            f"Fine-tuning recipes (lisa, and lora ... loram) fine-tune `model=demo_base`, the same tiny Llama pre-trained first on "
            f"the run's data (300 steps, cached), so their loss starts from a trained base and does not compare "
            f"with the rows trained from scratch, nor says anything about fine-tuning quality; they are listed for "
            f"their memory. The optimizer state is the larger of right after the first step and at the end (a "
            f"momentum reset on the last step empties it).\n\n"
            f"Command: `{cmd}`\n\n{table(results)}\n")
    if "galore" in results and "error" not in results["galore"]:
        body += f"\n{galore_expected_ratio(a.out / 'galore')}; measured: " \
                f"{results['galore']['optimizer_state_bytes'] / info['optimizer_state_bytes']:.2f}.\n"
    if a.per_layer_steps and not a.gpu:
        body += (f"\n### Per-layer weight updates\n\nThe same recipes with `optimizer.per_layer_updates=true` (each "
                 f"parameter stepped in its post-accumulate-grad hook, its gradient freed at once) against the ordinary "
                 f"step, on a wider model ({' '.join(PER_LAYER_MODEL)}), {a.per_layer_steps} steps, fp32, "
                 f"`train.clip_grad_norm=0` on both sides. The gradient column is arithmetic (4 bytes per trainable "
                 f"parameter: what the ordinary step holds at once after backward, and what per-layer updates never "
                 f"hold); the peak is the whole process's RSS high-water mark as the OS reports it (ru_maxrss).\n\n"
                 f"{per_layer_table(a.out, a.per_layer_steps, a.per_layer_recipes)}\n")
    write_section(a.doc, body.rstrip("\n") + "\n\n")
    print(body)


if __name__ == "__main__":
    main()
