"""`recforge align RECIPE`, `recforge embed RECIPE`, `recforge eval retrieval RECIPE`."""

from __future__ import annotations

import argparse


def _align(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import AlignConfig
    from .trainer import run_align

    cfg = load_recipe(AlignConfig, args.recipe, args.overrides)
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
    out = run_embed(cfg)
    print(f"embedded {out['rows']} items -> {out['out_dir']} ({out['items_per_s']:.1f} items/s)")
    return 0


def _eval_retrieval(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .align_config import RetrievalEvalConfig
    from .evaluate import run_eval_retrieval

    cfg = load_recipe(RetrievalEvalConfig, args.recipe, args.overrides)
    out = run_eval_retrieval(cfg)
    print(out["table"])
    print(f"\nwritten: {out['json']} {out['markdown']} {out['png']}")
    return 0


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args

    p = sub.add_parser("align", help="contrastively align an LLM/encoder into an embedding model, export and evaluate it")
    add_recipe_args(p)
    p.set_defaults(handler=_align)
    p = sub.add_parser("embed", help="embed a catalogue into Parquet (id, vector) shards + a faiss index, resumable")
    add_recipe_args(p)
    p.set_defaults(handler=_embed)
    p = eval_sub.add_parser("retrieval", help="Recall@k / NDCG@10 / MRR@10 of models on held-out queries")
    add_recipe_args(p)
    p.set_defaults(handler=_eval_retrieval)
