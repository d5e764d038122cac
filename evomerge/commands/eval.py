"""`evomerge eval MODEL_DIR --evaluator SPEC`: evaluate a saved model (a readable table, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `evomerge eval` (see ``run``)."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint folder (safetensors)")
    parser.add_argument("--evaluator", "-e", required=True, metavar="SPEC",
                        help="mgsm:LANG, gsm8k[:SPLIT], lm_eval:TASK[,METRIC], perplexity:PATH, "
                             "custom:MODULE:FN, or an evaluator YAML")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate N items drawn with --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subsample (default 0)")
    parser.add_argument("--split", default=None, help="named split of the evaluator (e.g. search, test)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B", help="generation / scoring batch size")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype to load (default: as saved)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while generating")


def load_model(model_dir: str, device: str = "cpu", dtype: str = "auto"):
    """Model + tokenizer from a local folder: safetensors only, no remote code, nothing downloaded."""
    # deferred: `evomerge --help` imports every command module; torch and models load only when one runs
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise EvomergeError(f"model folder not found: {model_dir}")
    if not (path / "config.json").is_file():
        raise EvomergeError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise EvomergeError(f"{model_dir} has no .safetensors weights (pickle .bin checkpoints are not loaded)")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"invalid device {device!r}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"device {device!r} asked but CUDA is not available")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True,
                                                     dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise EvomergeError(f"cannot load model from {model_dir}: {str(exc).splitlines()[0]}") from None
    from evomerge.search.dataflow import apply_dataflow_scales  # deferred like torch above

    scaled: Any = apply_dataflow_scales(model, path)  # a DFS export with input scalings (evomerge_dataflow.json)
    return scaled.to(torch_device).eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    """`evomerge eval`: build the evaluator, load the model, print its metrics (``--json``: one object); 0.

    Raises:
        EvomergeError: a bad evaluator spec or option, or a model folder that cannot be loaded.
    """
    # deferred: `evomerge --help` imports every command module; torch and models load only when one runs
    from evomerge.evaluators import build_evaluator

    if args.limit is not None and args.limit < 1:
        raise EvomergeError("--limit must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise EvomergeError("--batch-size must be >= 1")
    options = {"split": args.split, "batch_size": args.batch_size}
    evaluator = build_evaluator(args.evaluator, limit=args.limit, seed=args.seed, **options)
    model, tokenizer = load_model(args.model_dir, args.device, args.dtype)
    started = time.perf_counter()
    if args.progress and hasattr(evaluator, "run") and hasattr(evaluator, "summarize"):
        metrics = evaluator.summarize(evaluator.run(model, tokenizer, progress=True))
    else:
        metrics = evaluator.evaluate(model, tokenizer)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(metrics, sort_keys=False))
        return 0
    n_items = len(getattr(evaluator, "items", []) or [])
    header = f"{evaluator.name}: {args.model_dir}" + (f" ({n_items} items" if n_items else " (") + \
        f"{', ' if n_items else ''}{seconds:.1f} s)"
    width = max([len("metric")] + [len(k) for k in metrics])
    lines = [header, f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
