"""generate's commands: `recforge generate`, `recforge generate-export`, `recforge prompts ...`, `recforge eval tags`."""

from __future__ import annotations

import argparse
import json
import sys

from recforge.config import RecforgeError


def _generate(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe
    from recforge.generate.generate_config import GenerateConfig
    from recforge.generate.runner import run_generate, run_problem

    cfg = load_recipe(GenerateConfig, args.recipe, args.overrides)
    if args.ray:
        return _generate_on_ray(cfg, args)
    manifest = run_generate(cfg, shard=args.shard, force=args.force, progress=not args.no_progress, overwrite=args.overwrite,
                            retry_failed=args.retry_failed, allow_partial=args.allow_partial)
    p = manifest["progress"]
    out = {o["name"]: o["rows"] for o in manifest["outputs"]}
    print(
        f"generate {manifest['fingerprint']['settings']['task']}: {out['generations']} rows, {out['failed']} failed "
        f"(of {manifest['input_rows']} inputs) -> {manifest['outputs'][0]['path']}\n"
        f"model: {manifest['model_used']['name_or_path']}"
        + (f" + adapter {manifest['model_used']['adapter']}" if manifest["model_used"]["adapter"] else "")
        + f" | this run: {p['rows_per_s']} rows/s, {p['tokens_per_s']} tokens/s, failure rate {p['failure_rate']:.1%}"
    )
    problem = run_problem(manifest)  # stopped early, or too many failures: a pipeline must not go on silently
    if problem:
        print(f"recforge generate: {problem}", file=sys.stderr)
        return 1
    return 0 if manifest["complete"] else 1


def _generate_on_ray(cfg, args: argparse.Namespace) -> int:
    from recforge.generate.ray_run import run_generate_on_ray

    if args.shard:
        raise RecforgeError("--shard and --ray: Ray runs every shard itself (use --shards N)")
    manifest = run_generate_on_ray(cfg, args.shards, address=args.address, cpus_per_shard=args.cpus_per_shard,
                                   gpus_per_shard=args.gpus_per_shard, max_retries=args.max_shard_retries,
                                   force=args.force, overwrite=args.overwrite, retry_failed=args.retry_failed,
                                   progress=not args.no_progress)
    shards = manifest["shards"]
    print(f"generate on Ray: {sum(s.get('rows') or 0 for s in shards)} rows, {sum(s.get('failed') or 0 for s in shards)} "
          f"failed (of {manifest['input_rows']} inputs) in {len(shards)} shards -> {cfg.out_dir}")
    if manifest["stopped"]:
        print(f"recforge generate: {manifest['stopped']}", file=sys.stderr)
        return 1
    return 0 if manifest["complete"] else 1


def _export(args: argparse.Namespace) -> int:
    from recforge.generate.postprocess import export_features

    manifest = export_features(args.runs, args.out, args.taxonomy_map, args.drop_unmapped, args.max_tags, args.allow_partial)
    print(f"features: {manifest['outputs'][0]['rows']} entities -> {args.out}")
    return 0


def _prompts_list(args: argparse.Namespace) -> int:
    from recforge.prompts import list_prompts, load_prompt

    for name in list_prompts():
        spec = load_prompt(name).spec
        print(f"{name:22s} v{spec.version:4s} {spec.output.format:6s} {spec.description.strip()[:70]}")
    return 0


def _prompts_show(args: argparse.Namespace) -> int:
    from recforge.prompts import load_prompt

    t = load_prompt(args.name)
    print(f"# {t.path}\n{t.source}\n# {t.path.with_suffix('.yaml')}\n{t.spec_text}", end="")
    return 0


def _prompts_render(args: argparse.Namespace) -> int:
    from recforge.prompts import load_prompt, render_chat

    t = load_prompt(args.name)
    text = args.record
    if text.startswith("@"):
        from recforge.io import resolve_path

        path = resolve_path(text[1:])
        if not path.is_file():
            raise RecforgeError(f"--record: file not found: {text[1:]}")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecforgeError(f"--record: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise RecforgeError("--record: must be a JSON object")
    bad = [kv for kv in args.var if "=" not in kv]
    if bad:
        raise RecforgeError(f"--var {bad[0]!r}: expected key=value")
    variables = dict(kv.split("=", 1) for kv in args.var)
    messages = t.messages(record, str(record.get("id", "record")), variables)
    if args.model:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as err:
            raise RecforgeError(f"--model {args.model}: cannot load its tokenizer: {' '.join(str(err).split())[:300]}") from None
        print(render_chat(tokenizer, messages))
    else:
        print(json.dumps(messages, indent=2, ensure_ascii=False))
    return 0


def _eval_tags(args: argparse.Namespace) -> int:
    from pathlib import Path

    from recforge.generate.postprocess import aggregate, load_taxonomy_map
    from recforge.generate.tag_eval import evaluate_tags
    from recforge.io import atomic_write_json
    from recforge.splits import DEFAULT_RULE, SplitRule

    src = Path(args.pred)
    ids = None
    run_info: dict = {}
    rule = DEFAULT_RULE
    if src.is_dir():
        from recforge.generate.postprocess import read_run_outputs
        from recforge.readers import FileKey, RejectLog, SourceConfig, read_records

        mapping = load_taxonomy_map(args.taxonomy_map)
        partial: list[str] = []
        rows = read_run_outputs(src, args.allow_partial, partial).to_pylist()
        feats = aggregate(rows, mapping)
        failed_ids: set[str] = set()
        for failed in [src / "failed.jsonl", *src.glob("shard-*/failed.jsonl")]:
            if failed.is_file() and failed.stat().st_size:  # the run's own log; an unreadable line is skipped, not fatal
                failed_ids |= {i for i, _ in read_records(SourceConfig(path=str(failed), id="id"), RejectLog(), FileKey(str(failed)))}
        ids = {r["id"] for r in rows} | failed_ids
        pred = {eid: f["tags"] for (etype, eid), f in feats.items() if etype == "item"}
        run_info = {"output_rows": len(rows), "failed_rows": len(failed_ids), **({"partial_inputs": partial} if partial else {})}
        manifest = src / "manifest.json"
        if manifest.is_file():  # which model made these tags (the SFT tagger or the base-model fallback)
            m = json.loads(manifest.read_text())
            run_info["model_used"] = m.get("model_used")
            run_info["input_rows"] = m.get("input_rows")
            if m.get("split_rule"):  # held-out books by the run's own rule (its recipe's `split:` section)
                rule = SplitRule(**{k: m["split_rule"][k] for k in ("salt", "eval_percent") if k in m["split_rule"]})
    else:
        from recforge.features_table import read_features_table
        from recforge.runstate import require_complete

        if not src.is_file():
            raise RecforgeError(f"--pred: {src} is neither a generate run folder nor a features parquet file")
        note = require_complete(src, "--pred", args.allow_partial)  # a features table of an unfinished export
        run_info = {"partial_inputs": [note]} if note else {}
        pred = {r["entity_id"]: list(r.get("tags") or []) for r in read_features_table(str(src), "--pred")
                if r.get("entity_type", "item") == "item"}
    result = evaluate_tags(pred, args.truth, k=args.k, truth_top=args.truth_top, split=args.split, ids=ids, rule=rule)
    result.update(run_info)
    result["pred"] = str(src)
    k, base = args.k, result["popular_baseline"]
    lines = [
        f"tags vs shelf tags ({result['books']} {args.split} books with shelf tags, truth = top {args.truth_top} book shelves):",
        f"  model             precision@{k} {result[f'precision@{k}']:.4f}  recall@{k} {result[f'recall@{k}']:.4f}",
        f"  popular baseline  precision@{k} {base[f'precision@{k}']:.4f}  recall@{k} {base[f'recall@{k}']:.4f}"
        f"  (the {k} most common training shelves for every book)",
    ]
    if "output_rows" in run_info:
        used = run_info.get("model_used") or {}
        lines.append(f"  rows: {run_info['output_rows']} generated, {run_info['failed_rows']} failed"
                     + (f" (of {run_info['input_rows']} inputs)" if run_info.get("input_rows") is not None else "")
                     + (f" | model: {used.get('name_or_path')}" if used else "")
                     + (" (fallback: the fine-tuned tagger was not found)" if used.get("note") else ""))
    print("\n".join(lines))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args
    from recforge.ray_executor import add_ray_args

    gen = sub.add_parser("generate", help="mass generation (tags, summaries, queries, knowledge) from a recipe")
    add_recipe_args(gen)
    gen.add_argument("--shard", metavar="i/N", help="run data-parallel shard i of N (its own folder and seed offset)")
    gen.add_argument("--force", action="store_true", help="resume into an output made with another fingerprint")
    gen.add_argument("--overwrite", action="store_true", help="discard this output folder's previous rows and start over")
    gen.add_argument("--retry-failed", action="store_true",
                     help="also retry the failed rows of finished chunks whose failure is deterministic (parse errors, "
                          "truncation, prompt_too_long, render_error); engine-error rows are retried on every resume")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (figures still go to progress.json)")
    add_ray_args(gen, "run the shards", 2, "engine.tensor_parallel_size for vLLM where the cluster has GPUs")
    gen.add_argument("--allow-partial", action="store_true",
                     help="read a model folder or input file whose producing run (publish, cpt, sft, data) did not "
                          "finish (recorded in the manifest)")
    gen.set_defaults(handler=_generate)

    exp = sub.add_parser("generate-export", help="normalise + aggregate generation runs into a features table")
    exp.add_argument("runs", nargs="+", help="generate out_dir folders (tags, summary, queries, knowledge runs)")
    exp.add_argument("--out", required=True, help="features .parquet to write")
    exp.add_argument("--taxonomy-map", help="YAML/JSON mapping tag variant -> canonical tag")
    exp.add_argument("--drop-unmapped", action="store_true", help="with --taxonomy-map: drop tags it does not map")
    exp.add_argument("--max-tags", type=int, default=10)
    exp.add_argument("--allow-partial", action="store_true",
                     help="export runs that did not finish (killed, stopped early); the manifest lists them")
    exp.set_defaults(handler=_export)

    prompts = sub.add_parser("prompts", help="inspect the prompt templates")
    psub = prompts.add_subparsers(dest="prompts_command", required=True)
    psub.add_parser("list", help="shipped tasks").set_defaults(handler=_prompts_list)
    show = psub.add_parser("show", help="a template and its spec")
    show.add_argument("name")
    show.set_defaults(handler=_prompts_show)
    render = psub.add_parser("render", help="render a template for one record")
    render.add_argument("name")
    render.add_argument("--record", required=True, help="JSON object, or @file.json")
    render.add_argument("--var", action="append", default=[], metavar="key=value", help="template variable")
    render.add_argument("--model", help="apply this model's chat template (default: print the messages)")
    render.set_defaults(handler=_prompts_render)

    tags = eval_sub.add_parser("tags", help="precision@k / recall@k of generated tags vs goodbooks shelf tags")
    tags.add_argument("--pred", required=True, help="a generate run folder or a features parquet")
    tags.add_argument("--truth", default="sample://goodbooks_10k_book_tags/books_tags.jsonl.gz")
    tags.add_argument("--k", type=int, default=5)
    tags.add_argument("--truth-top", type=int, default=10, help="truth = this many top book-describing shelves")
    tags.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    tags.add_argument("--taxonomy-map")
    tags.add_argument("--out", help="write the metrics JSON here")
    tags.add_argument("--allow-partial", action="store_true",
                      help="score a run that did not finish (killed, stopped early); the metrics JSON says so")
    tags.set_defaults(handler=_eval_tags)
