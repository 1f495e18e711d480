#!/usr/bin/env python
"""Generation throughput per generator backend: the same tiny model, the same prompts and sampling parameters
through ``backend=transformers`` (in-process ``model.generate``), ``backend=openai`` (the OpenAI-compatible test
server of tests/generation_server.py, wrapping the same model on localhost) and ``backend=vllm`` (where vllm imports
and a GPU is present; otherwise its row says why it was skipped).

Each backend first answers one warm-up request (untimed), then answers the prompts twice through the synthesis stage's own request path (the request cache first,
the generator for the rest: ``generation.synthesis._answer_round``) on one fresh cache: the first run sends every
request, the second finds every answer in the cache.  Reported: requests/s and generated tokens/s of the first run,
and the second run's wall time and requests sent (the cache's effect).

    python scripts/bench_generation.py --prompts 64 --max-new-tokens 32
    python scripts/bench_generation.py --write docs/benchmarks.md

Times depend on the machine and its load: the ``uptime`` load averages before and after are printed (and written)
next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # the OpenAI-compatible test server
from _sections import replace_marked_section  # noqa: E402

SECTION_START = "<!-- bench_generation:start -->"
SECTION_END = "<!-- bench_generation:end -->"
HEADING = "## Generation: throughput per backend"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_model(folder: Path, hidden: int, layers: int) -> tuple[Path, list[str]]:
    """A tiny Llama (random weights) with a BPE tokenizer trained on the demo corpus's prose, saved as a folder
    every backend can load (the tests' generator model, larger)."""
    import datasets
    import torch
    import transformers

    from effitrain.data.demo import load_demo
    from effitrain.data.tokenizer import train_bpe

    texts = load_demo(60, 4, 0, domains=["prose"])["train"]["text"]
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 400, folder)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, texts


def prompts_from(texts: list[str], count: int, words: int) -> list[str]:
    """``count`` distinct prompts: the starts of the demo's prose documents, then of their second halves, ..."""
    out: list[str] = []
    offset = 0
    while len(out) < count:
        for text in texts:
            start = text.split()[offset:offset + words]
            if len(start) == words and " ".join(start) not in out:
                out.append(" ".join(start))
            if len(out) == count:
                break
        offset += words
        if offset > 10_000:
            raise SystemExit(f"the demo corpus holds fewer than {count} distinct prompts of {words} words")
    return out


def vllm_skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no GPU here"
    return None


def measure(block_raw: dict, model_path: Path | None, prompts: list[str], cache_dir: Path) -> dict:
    from effitrain.config.blocks.generator import parse_generator
    from effitrain.generation.cache import RequestCache
    from effitrain.generation.synthesis import _answer_round

    block = parse_generator(block_raw, "generator")
    generator = block.build(model_path=model_path)
    requests = [generator.request(p) for p in prompts]
    runs = []
    try:
        # one request outside the timing (not one of the prompts, never cached): the first call's one-time costs
        # (lazy initialisation, the server's first connection) are not the backend's throughput
        for _ in generator.answer([generator.request("warm-up: " + prompts[0])]):
            pass
        for _ in range(2):  # the second run: every answer is in the cache
            cache = RequestCache(cache_dir)
            answers: dict = {}
            counts = {"sent": 0, "cached": 0, "dropped": 0, "tokens_sent": 0}
            started = time.perf_counter()
            _answer_round(requests, answers, generator, cache, counts, lambda: False)
            seconds = time.perf_counter() - started
            cache.close()
            runs.append({"seconds": seconds, **counts})
    finally:
        generator.close()
    first, second = runs
    return {"requests": len(requests), "seconds": round(first["seconds"], 3),
            "requests_per_s": round(first["sent"] / first["seconds"], 2),
            "tokens": first["tokens_sent"], "tokens_per_s": round(first["tokens_sent"] / first["seconds"], 1),
            "second_run_seconds": round(second["seconds"], 4), "second_run_sent": second["sent"],
            "second_run_cached": second["cached"]}


def median_row(runs: list[dict]) -> dict:
    """One backend's figures over the rounds: the median of each time and rate, the first run's spread."""
    med = {key: statistics.median(r[key] for r in runs) for key in ("seconds", "requests_per_s", "tokens",
                                                                      "tokens_per_s", "second_run_seconds")}
    return {"requests": runs[0]["requests"], "seconds": round(med["seconds"], 3),
            "seconds_range": f"{min(r['seconds'] for r in runs):.3f}–{max(r['seconds'] for r in runs):.3f}",
            "requests_per_s": round(med["requests_per_s"], 2), "tokens": int(med["tokens"]),
            "tokens_per_s": round(med["tokens_per_s"], 1), "second_run_seconds": round(med["second_run_seconds"], 4),
            "second_run_sent": max(r["second_run_sent"] for r in runs),
            "second_run_cached": min(r["second_run_cached"] for r in runs), "rounds": len(runs)}


def load_sentence(before: str, after: str, cpus: int) -> str:
    """What the load said about the times: a one-minute load average below one busy core before the run means the
    machine was otherwise idle and the times are this machine's; above it they are this moment's only."""
    idle = float(before.split()[0]) < 1.0
    if idle:
        return (f"Measured on an otherwise idle {cpus}-CPU machine (`uptime` load averages {before} before and "
                f"{after} after the run; the larger 5- and 15-minute figures are earlier jobs).")
    return (f"**Measured under load** on a shared {cpus}-CPU machine: `uptime` load averages {before} before and "
            f"{after} after the run. The times are this moment's, not the backends' speed: only the second-run "
            f"columns (nothing sent, every answer from the cache) do not depend on the load.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers / vllm: prompts per call")
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds in which the backends alternate, each on a fresh cache; medians reported")
    parser.add_argument("--write", type=Path, help="replace this script's section of the markdown file")
    args = parser.parse_args()


    from effitrain.config.blocks import load_builtin_blocks
    from generation_server import TinyServer

    load_builtin_blocks()
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        folder, texts = make_model(Path(tmp) / "model", args.hidden, args.layers)
        prompts = prompts_from(texts, args.prompts, args.prompt_words)
        sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "seed": 0}
        server = TinyServer(str(folder)).start()
        reason = vllm_skip_reason()
        backends = {
            "transformers": ({"backend": "transformers", "model": str(folder), "batch_size": args.batch_size,
                              "device": "cpu", "dtype": "float32", **sampling}, folder),
            "openai (test server, localhost)": ({"backend": "openai", "model": "tiny", "base_url": server.base_url,
                                                 "concurrency": args.concurrency, "batch_size": args.batch_size,
                                                 **sampling}, None)}
        if reason is None:
            backends["vllm"] = ({"backend": "vllm", "model": str(folder), "batch_size": args.batch_size,
                                 **sampling}, folder)
        rounds: dict[str, list[dict]] = {name: [] for name in backends}
        try:
            for r in range(args.rounds):   # alternating rounds: drift on a shared machine hits every backend alike
                for i, (name, (block, model)) in enumerate(backends.items()):
                    rounds[name].append(measure(block, model, prompts, Path(tmp) / f"cache-{i}-{r}"))
            answered = len(server.answered)   # every round's second run reached the server not once
        finally:
            server.stop()
        rows = [{"backend": name, **median_row(runs)} for name, runs in rounds.items()]
        rows[1]["server_answered"] = answered
        if reason is not None:
            rows.append({"backend": "vllm", "skipped": reason})
    load_after = load()
    setup = (f"{args.prompts} prompts of {args.prompt_words} words (the demo corpus's prose), {args.max_new_tokens} "
             f"new tokens at most, temperature 1.0, seed 0; a random tiny Llama ({args.hidden} wide, {args.layers} "
             f"layers, 400-token BPE), float32 on CPU; transformers batch {args.batch_size}, openai concurrency "
             f"{args.concurrency}")
    result = {"setup": setup, "rows": rows, "load_before": load_before, "load_after": load_after,
              "cpus": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result, indent=1))
    if args.write:
        command = " ".join(["python scripts/bench_generation.py", *sys.argv[1:]])
        lines = ["| backend | requests | first run (s), median | min–max (s) | requests/s | generated tokens | "
                 "tokens/s | second run (s) | second run: sent / cached (every round) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in rows:
            if "skipped" in row:
                lines.append(f"| {row['backend']} | skipped: {row['skipped']} | | | | | | | |")
                continue
            lines.append(f"| {row['backend']} | {row['requests']} | {row['seconds']} | {row['seconds_range']} | "
                         f"{row['requests_per_s']} | "
                         f"{row['tokens']} | {row['tokens_per_s']} | {row['second_run_seconds']} | "
                         f"{row['second_run_sent']} / {row['second_run_cached']} |")
        body = "\n".join([
            f"{HEADING}\n\n{SECTION_START}",
            f"`{command}` ({args.prompts} requests through each backend on a fresh request cache, twice, in "
            f"{args.rounds} rounds in which the backends alternate; medians). "
            f"{setup}.",
            "",
            *lines,
            "",
            load_sentence(load_before, load_after, os.cpu_count() or 1)
            + " The openai row includes the HTTP round trips to a one-model-call-at-a-time test server, so it "
            "measures the client and the cache path, not a serving engine's batching.",
            SECTION_END,
        ])
        replace_marked_section(args.write, f"{HEADING}\n\n{SECTION_START}", SECTION_END, body)


if __name__ == "__main__":
    main()
