"""`evomerge merge RECIPE.yaml OUT_DIR`: merge models from a mergekit-compatible recipe into a checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `evomerge merge` (see ``run``)."""
    parser.add_argument("recipe", help="recipe YAML (mergekit 0.1.5 format; see docs/METHODS.md)")
    parser.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random drops (dare_*, della*); default 0")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read .bin (pickle) weights, with torch.load(weights_only=True)")
    parser.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """`evomerge merge RECIPE OUT_DIR`: ``Recipe.load`` then ``evomerge.merge.run_merge``.

    Args:
        args: the parsed options: ``recipe`` (a YAML path), ``out_dir``, ``device``, ``seed``, ``overwrite``,
            ``allow_pickle``, ``shard_size``, ``no_progress``.

    Returns:
        0; the output folder's path is printed on stdout.

    Raises:
        EvomergeError: a bad recipe (unknown key, method or parameter; the unknown-method message lists every
            method), sources that cannot be merged, or an existing output folder; ``evomerge.cli.main`` prints it
            as one line on stderr and exits with code 2.
    """
    # deferred: `evomerge --help` imports every command module; torch and models load only when one runs
    from evomerge.merge import run_merge
    from evomerge.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    out = run_merge(recipe, args.out_dir, device=args.device, seed=args.seed, overwrite=args.overwrite,
                    allow_pickle=args.allow_pickle, shard_size=args.shard_size, progress=not args.no_progress)
    print(f"merged model written to {out}")
    return 0
