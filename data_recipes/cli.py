"""`recforge data RECIPE.yaml key.sub=value ... [--strict] [--shard i/N | --merge | --ray --shards N]`: build the
corpora of a recipe (in one process, one shard, or every shard as a Ray task and then the merge)."""

from __future__ import annotations

import argparse
import sys

from recforge.config import RecforgeError


def _data(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe
    from recforge.data_recipes.recipe_config import DataRecipe

    cfg = load_recipe(DataRecipe, args.recipe, args.overrides)
    # a full disk is one line, exit 1, from recforge.cli.main (the run's manifest still says running)
    if args.ray:
        return _build_on_ray(cfg, args)
    if args.shards is not None:
        raise RecforgeError("--shards needs --ray (without it, run one `--shard i/N` per task, then --merge)")
    return _merge(cfg) if args.merge else _build(cfg, args)


def _build_on_ray(cfg, args: argparse.Namespace) -> int:
    from recforge.data_recipes.data_ray import run_data_on_ray

    if args.shard or args.merge:
        raise RecforgeError(f"{'--shard' if args.shard else '--merge'} and --ray: Ray builds every shard and merges "
                            "them itself (use --shards N)")
    out = run_data_on_ray(cfg, 2 if args.shards is None else args.shards, strict=args.strict, address=args.address,
                          cpus_per_shard=args.cpus_per_shard, gpus_per_shard=args.gpus_per_shard,
                          max_retries=args.max_shard_retries, progress=sys.stderr.isatty())
    retried = [f"{s['shard']} ({s['attempts']} attempts)" for s in out["shards"] if s["attempts"] > 1]
    print(f"data on Ray: {len(out['shards'])} shards built in {cfg.out_dir}"
          + (f", resubmitted: {', '.join(retried)}" if retried else ""))
    if out["stopped"]:
        print(f"recforge data: {out['stopped']} (no merge; {cfg.out_dir}/manifest.json says complete: false)",
              file=sys.stderr)
        return 1
    return _report_merge(out["manifest"], cfg)


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
    from recforge.data_recipes.shard_merge import merge_shards

    return _report_merge(merge_shards(cfg), cfg)


def _report_merge(manifest: dict, cfg) -> int:
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
    from recforge.ray_executor import add_ray_args

    data = sub.add_parser("data", help="build corpora (CPT, in-context, reading, pairs, mix) from logs and catalogues")
    add_recipe_args(data)
    data.add_argument("--strict", action="store_true", help="stop at the first malformed input row")
    data.add_argument("--shard", metavar="i/N", help="build only the rows of shard i of N (group-key hash) into "
                      "out_dir/shard-IIIII-of-NNNNN; one array-job task per shard")
    data.add_argument("--merge", action="store_true", help="merge the N shard folders of out_dir into out_dir, "
                      "checking row ids and leakage across shards")
    add_ray_args(data, "build the shards (then --merge, on this machine)", None, "0, a data shard uses no GPU")
    data.set_defaults(handler=_data)
