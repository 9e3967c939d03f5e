"""`recforge align RECIPE`, `recforge embed RECIPE`, `recforge eval retrieval RECIPE`."""

from __future__ import annotations

import argparse


def _align(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import AlignConfig
    from .trainer import run_align

    from recforge.runstate import output_lock

    cfg = load_recipe(AlignConfig, args.recipe, args.overrides)
    with output_lock(cfg.out_dir, "align"):  # one writer per out_dir, from the first check to the last write
        out = run_align(cfg)
    print(out["table"])
    check = out["export_check"]
    print(f"\nexported to {out['export_dir']} (reload check: min cosine right {check['min_cosine_right_padding']:.6f}, "
          f"left {check['min_cosine_left_padding']:.6f})")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import EmbedConfig
    from .embed import run_embed

    cfg = load_recipe(EmbedConfig, args.recipe, args.overrides)
    if args.ray:
        return _embed_on_ray(cfg, args)
    if args.shards is not None:
        from recforge.config import RecforgeError

        raise RecforgeError("--shards needs --ray (one process encodes every part)")
    out = run_embed(cfg, overwrite=args.overwrite)
    print(f"embedded {out['rows']} items -> {out['out_dir']} ({out['items_per_s']:.1f} items/s)")
    return 0


def _embed_on_ray(cfg, args: argparse.Namespace) -> int:
    import sys

    from .embed_ray import run_embed_on_ray

    out = run_embed_on_ray(cfg, 2 if args.shards is None else args.shards, address=args.address,
                           cpus_per_shard=args.cpus_per_shard, gpus_per_shard=args.gpus_per_shard,
                           max_retries=args.max_shard_retries, overwrite=args.overwrite)
    print(f"embed on Ray: {out['rows']} items in {len(out['manifest']['shards'])} shards -> {out['out_dir']} "
          f"({out['items_per_s']:.1f} items/s)")
    if out["stopped"]:
        print(f"recforge embed: {out['stopped']}", file=sys.stderr)
        return 1
    return 0 if out["complete"] else 1


def _eval_retrieval(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import RetrievalEvalConfig
    from .evaluate import run_eval_retrieval

    cfg = load_recipe(RetrievalEvalConfig, args.recipe, args.overrides)
    out = run_eval_retrieval(cfg)
    print(out["table"])
    print(f"\nwritten: {out['json']} {out['markdown']} {out['png']}")
    return 0


def _pseudo_filter(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import PseudoFilterConfig
    from .pseudo_filter import run_pseudo_filter

    from recforge.runstate import output_lock

    cfg = load_recipe(PseudoFilterConfig, args.recipe, args.overrides)
    with output_lock(cfg.out_dir, "pseudo-filter"):
        r = run_pseudo_filter(cfg)
    print(f"pseudo-queries: {r['generated_queries']} generated for {r['items_with_queries']} items, {r['scored_queries']} "
          f"scored, {r['kept_pairs']} kept ({100 * r['kept_share']:.1f} %: own item in the top {r['top_k']} of "
          f"{r['items_in_catalogue']} by {r['model']}) -> {cfg.out_dir}/pairs.parquet ({r['seconds']['total']:.0f} s)")
    return 0


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args
    from recforge.ray_executor import add_ray_args

    p = sub.add_parser("align", help="contrastively align an LLM/encoder into an embedding model, export and evaluate it")
    add_recipe_args(p)
    p.set_defaults(handler=_align)
    p = sub.add_parser("embed", help="embed a catalogue into Parquet (id, vector) shards + a faiss index, resumable")
    add_recipe_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="discard this out_dir's earlier vectors and start over (instead of refusing a changed catalogue or plan)")
    add_ray_args(p, "encode the parts (shard i: parts s with s %% N == i; same plan and vectors)", None,
                 "1 where the cluster has GPUs and device is not cpu")
    p.set_defaults(handler=_embed)
    p = sub.add_parser("pseudo-filter", help="keep the LLM pseudo-queries whose own item the current embedder "
                                             "retrieves in its top k (round-trip filter) -> pairs for `recforge align`")
    add_recipe_args(p)
    p.set_defaults(handler=_pseudo_filter)
    p = eval_sub.add_parser("retrieval", help="Recall@k / NDCG@10 / MRR@10 of models on held-out queries")
    add_recipe_args(p)
    p.set_defaults(handler=_eval_retrieval)
