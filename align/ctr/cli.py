"""CLI of the CTR bridge: `recforge train-ctr RECIPE` (also `recforge eval ctr RECIPE`) and `recforge export-features RECIPE`."""

from __future__ import annotations

import argparse

from recforge.cli import add_recipe_args


def _eval_ctr(args: argparse.Namespace) -> int:
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import run_ctr
    from recforge.config import load_recipe
    from recforge.runstate import output_lock

    cfg = load_recipe(CTRRecipe, args.recipe, args.overrides)
    with output_lock(cfg.out_dir, "eval ctr"):  # one writer per out_dir, from the first check to the last write
        run_ctr(cfg)
    return 0


def _export_features(args: argparse.Namespace) -> int:
    from recforge.align.ctr.config import ExportFeaturesRecipe
    from recforge.align.ctr.run import run_export_features
    from recforge.config import load_recipe
    from recforge.runstate import output_lock

    cfg = load_recipe(ExportFeaturesRecipe, args.recipe, args.overrides)
    with output_lock(cfg.out_dir, "export-features"):
        run_export_features(cfg)
    return 0


def add_commands(sub, eval_sub) -> None:
    # the verb says what it does (trains CTR models, then reports their AUC); `eval ctr` stays for existing scripts
    train = sub.add_parser("train-ctr", help="train the CTR variants of a recipe (DIN / DCN-v2, BAHE, LARR) and report AUC, "
                                             "floors and the paired verdict")
    add_recipe_args(train)
    train.set_defaults(handler=_eval_ctr)
    ctr = eval_sub.add_parser("ctr", help="the same as `recforge train-ctr`")
    add_recipe_args(ctr)
    ctr.set_defaults(handler=_eval_ctr)
    export = sub.add_parser("export-features", help="id -> vector Parquet table with a JSON contract, for ranking jobs")
    add_recipe_args(export)
    export.set_defaults(handler=_export_features)
