"""``mixsup-train RECIPE --data DIR --out DIR``: train a recipe and write checkpoints."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from mixsup.errors import add_debug_flag, run_command


def build_parser() -> argparse.ArgumentParser:
    from mixsup.training.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="mixsup-train", description=__doc__)
    parser.add_argument("recipe", choices=RECIPES, help="training method")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (LiTS naming, optional manifest.json)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoints and log.csv")
    parser.add_argument("--preset", default="default", help="tiny (smoke runs) or default")
    parser.add_argument("--config", type=Path, help="JSON or TOML file of config keys (flags and --set win)")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint (usually OUT/last.pt)")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="start from this run's weights (fine-tuning: new optimizer and schedule, epoch 0); "
                             "for a unet run also an ONNX export, e.g. the bundled model_repository/unet")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set epochs=40 --set spacing_mm=[2,2]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (per-epoch lines still print)")
    add_debug_flag(parser)
    return parser


def handle(args: argparse.Namespace) -> int:
    from mixsup.training.data.manifest import load_dataset
    from mixsup.training.recipes import get_recipe
    from mixsup.training.trainer import TrainConfig, read_config_file, train

    recipe = get_recipe(args.recipe)
    options = tuple(recipe.DEFAULTS)
    config = TrainConfig.preset(args.preset, recipe=args.recipe)
    if args.config:
        config = config.updated(read_config_file(args.config), options)
    config = config.override(args.overrides, options)
    config = config.updated({"options": {**recipe.DEFAULTS, **config.options}})
    manifest = load_dataset(args.data)
    best = train(recipe, manifest, args.out, config, resume=args.resume, progress=not args.no_progress,
                 init_from=args.init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"mixsup-train: best checkpoint {best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("mixsup-train", build_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
