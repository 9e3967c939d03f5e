"""`recforge data RECIPE.yaml key.sub=value ... [--strict]`: build the corpora of a recipe."""

from __future__ import annotations

import argparse
import sys


def _data(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe
    from recforge.data_recipes.recipe_config import DataRecipe

    cfg = load_recipe(DataRecipe, args.recipe, args.overrides)
    # a full disk is one line, exit 1, from recforge.cli.main (the run's manifest still says running)
    return _merge(cfg) if args.merge else _build(cfg, args)


def _build(cfg, args: argparse.Namespace) -> int:
    from recforge.data_recipes.build import run_data
    from recforge.shards import ShardSpec

    shard = ShardSpec.parse(args.shard)
    manifest = run_data(cfg, strict=args.strict, shard=shard)
    print(f"corpora written to {cfg.out_dir}" + (f"/{shard.folder} (shard {shard.index} of {shard.count})" if shard.active else ""))
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


def _merge(cfg) -> int:
    from recforge.data_recipes.build import merge_shards

    manifest = merge_shards(cfg)
    print(f"merged {manifest['shard']['count']} shards into {cfg.out_dir}")
    for name, info in manifest["corpora"].items():
        print(f"  {name:<14} train {info['rows']['train']:>8,}  eval {info['rows']['eval']:>7,}")
    leak = manifest["splits"]
    for key, rep in leak["cross_shard"].items():
        print(f"  across shards {key}: {rep['eval_ids_in_train']} eval ids in train rows")
    for key in leak["per_shard_failures"]:
        print(f"  leakage check FAILED in {key}")
    print(f"  leakage check: {'ok' if leak['leakage_ok'] else 'FAILED, see manifest.json splits'}")
    return 0 if leak["leakage_ok"] else 1


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args

    data = sub.add_parser("data", help="build corpora (CPT, in-context, reading, pairs, mix) from logs and catalogues")
    add_recipe_args(data)
    data.add_argument("--strict", action="store_true", help="stop at the first malformed input row")
    data.add_argument("--shard", metavar="i/N", help="build only the rows of shard i of N (group-key hash) into "
                      "out_dir/shard-IIIII-of-NNNNN; one array-job task per shard")
    data.add_argument("--merge", action="store_true", help="merge the N shard folders of out_dir into out_dir, "
                      "checking row ids and leakage across shards")
    data.set_defaults(handler=_data)
