"""`recforge data RECIPE.yaml key.sub=value ... [--strict]`: build the corpora of a recipe."""

from __future__ import annotations

import argparse


def _data(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe
    from recforge.data_recipes.build import run_data
    from recforge.data_recipes.recipe_config import DataRecipe

    cfg = load_recipe(DataRecipe, args.recipe, args.overrides)
    manifest = run_data(cfg, strict=args.strict)
    print(f"corpora written to {cfg.out_dir}")
    for name, info in manifest["corpora"].items():
        rows = info["rows"]
        print(f"  {name:<14} train {rows['train']:>8,}  eval {rows['eval']:>7,}")
    for name, reason in manifest["skipped"].items():
        print(f"  {name:<14} skipped: {reason}")
    rejects = manifest["rejects"]
    if rejects["total"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in rejects["by_reason"].items())
        print(f"  rejected rows: {rejects['total']} ({reasons}) -> {cfg.out_dir}/rejects.jsonl")
    leak = manifest["splits"]
    print(f"  leakage check: {'ok (0 eval ids in train)' if leak['leakage_ok'] else 'FAILED, see manifest.json splits'}")
    if manifest["special_tokens"]:
        print(f"  special tokens: {' '.join(manifest['special_tokens'])}")
    return 0 if leak["leakage_ok"] else 1


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args

    data = sub.add_parser("data", help="build corpora (CPT, in-context, reading, pairs, mix) from logs and catalogues")
    add_recipe_args(data)
    data.add_argument("--strict", action="store_true", help="stop at the first malformed input row")
    data.set_defaults(handler=_data)
