"""`recforge cpt`, `recforge sft`, `recforge publish`, `recforge cpt-demo`."""

from __future__ import annotations

import argparse
import json


def _cpt(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .cpt import run_cpt
    from .cpt_config import CPTConfig

    cfg = load_recipe(CPTConfig, args.recipe, args.overrides)
    report = run_cpt(cfg, resume=args.resume, allow_partial=args.allow_partial)
    for name, r in report.get("sources", {}).items():
        print(f"{name}: perplexity {r['before']['perplexity']:.2f} -> {r['after']['perplexity']:.2f} "
              f"({100 * r['perplexity_change']:+.1f}%)")
    print(f"model written to {cfg.out_dir}/model")
    return 0


def _cpt_demo(args: argparse.Namespace) -> int:
    from .demo import run_cpt_demo

    summary = run_cpt_demo(args.out, args.base_model)
    print(json.dumps(summary, indent=2))
    return 0


def _sft(args: argparse.Namespace) -> int:
    from recforge.config import load_recipe

    from .sft import run_sft
    from .sft_config import SFTConfig

    cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
    metrics = run_sft(cfg, resume=args.resume, allow_partial=args.allow_partial)
    print(json.dumps(metrics, indent=2))
    print(f"model written to {cfg.out_dir}/model")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from .publish import publish

    result = publish(args.run_dir, args.out, merge=args.merge, push_to_hub=args.push_to_hub,
                     private=args.private, max_diff=args.max_logit_diff, check_vllm=args.vllm_check)
    for name, check in (result["vllm_check"] or {}).items():
        print(f"vLLM check ({name}): " + (f"loaded, greedy tokens match transformers on {check['greedy_match']} sample texts"
                                           if check["loaded"] else f"not loadable: {check['error']}"))
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"published to {args.out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _add_allow_partial(parser) -> None:
    parser.add_argument("--allow-partial", action="store_true",
                        help="read inputs whose recforge run did not finish (killed or still running); "
                             "the run's manifest.json records which (allow_partial)")


def add_commands(sub, eval_sub) -> None:
    from recforge.cli import add_recipe_args

    cpt = sub.add_parser("cpt", help="continual pre-training (full / LoRA / QLoRA) on corpus Parquet")
    add_recipe_args(cpt)
    cpt.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir/checkpoints")
    _add_allow_partial(cpt)
    cpt.set_defaults(handler=_cpt)

    demo = sub.add_parser("cpt-demo", help="the `make cpt` demo: pre-train on goodbooks, CPT on ESCI with/without replay")
    demo.add_argument("--out", default="runs/cpt")
    demo.add_argument("--base-model", default=None, help="tiny model folder (default: build one under --out)")
    demo.set_defaults(handler=_cpt_demo)

    sft = sub.add_parser("sft", help="supervised fine-tuning with loss on completions only (trl)")
    add_recipe_args(sft)
    sft.add_argument("--resume", action="store_true")
    _add_allow_partial(sft)
    sft.set_defaults(handler=_sft)

    pub = sub.add_parser("publish", help="package a cpt/sft run: adapter, tokenizer, model card, optional merge / hub push")
    pub.add_argument("run_dir", help="a cpt or sft out_dir (holding model/ and manifest.json)")
    pub.add_argument("--out", required=True)
    pub.add_argument("--merge", action="store_true", help="also write a merged full model (after a logit-parity check)")
    pub.add_argument("--max-logit-diff", type=float, default=1e-3)
    pub.add_argument("--push-to-hub", metavar="REPO", default=None, help="push with the token in $HF_TOKEN")
    pub.add_argument("--private", action="store_true")
    pub.add_argument("--vllm-check", choices=("auto", "on", "off"), default="auto",
                     help="load what is published in vLLM and compare greedy tokens (auto: where vLLM is installed)")
    pub.set_defaults(handler=_publish)
