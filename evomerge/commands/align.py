"""`evomerge align MODEL_A MODEL_B OUT_DIR`: write model B permuted into model A's basin (Git Re-Basin).

The written model computes the same function as B (to float rounding); only the order of its hidden units
changes, so that merging it with A (by interpolation, task arithmetic, ...) averages matching units. Llama-style
Hugging Face folders (Llama, Mistral, Qwen2): one residual-stream permutation, one per FFN, whole KV groups of
heads per layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evomerge.errors import EvomergeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `evomerge align` (see ``run``)."""
    parser.add_argument("model_a", help="the reference model folder (its basin is the target)")
    parser.add_argument("model_b", help="the model folder to permute")
    parser.add_argument("out_dir", help="where to write B permuted (a Hugging Face folder)")
    parser.add_argument("--method", choices=("weight", "activation"), default="weight",
                        help="weight matching (no data) or activation matching (needs --calibration)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="calibration texts for activation matching: JSONL (see --field) or one text per line")
    parser.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--samples", type=int, default=64, help="calibration texts to use (default: 64)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per calibration text (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sweep order and the sample (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    """`evomerge align`: permute model B into model A's basin and write it as a checkpoint; returns 0.

    Raises:
        EvomergeError: bad folders or options, models that cannot be aligned, an existing output folder.
    """
    # deferred: `evomerge --help` imports every command module; torch and models load only when one runs
    import torch

    # deferred: the alignment stack (torch, transformers) loads only when `evomerge align` runs
    from evomerge.alignment.causal_lm import align_causal_lm
    from evomerge.checkpoint import write_checkpoint

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not args.overwrite:
        raise EvomergeError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    if args.method == "activation" and not args.calibration:
        raise EvomergeError("--method activation needs --calibration FILE")
    if args.method == "weight" and args.calibration:
        raise EvomergeError("--calibration is only used by --method activation")
    tensors, config, perms = align_causal_lm(
        args.model_a, args.model_b, method=args.method, calibration=args.calibration, field=args.field,
        samples=args.samples, max_length=args.max_length, seed=args.seed)
    moved = {name: int((p != torch.arange(len(p))).sum()) for name, p in perms.items()}
    card = (f"# {out_dir.name}\n\n{args.model_b} permuted into the basin of {args.model_a} with "
            f"`evomerge align --method {args.method}` (Git Re-Basin). It computes the same function as "
            f"{args.model_b}; only the order of hidden units changed.\n\nUnits moved per permutation:\n\n"
            f"```json\n{json.dumps(moved, indent=1)}\n```\n")
    write_checkpoint(out_dir, tensors, config, tokenizer_dir=args.model_b, model_card=card,
                     overwrite=args.overwrite)
    print(f"wrote {out_dir} ({args.method} matching, {sum(moved.values())} units moved "
          f"across {len(perms)} permutations)")
    return 0
