"""`evomerge export DIR --out PATH [--trial best|ID]`: a trial of a run as a checkpoint on disk.

- PS trial: the genome's recipe is merged tensor by tensor by `evomerge merge`'s path (no more memory than that
  command; the same tensors as the engine the workers used: same kernels, same seeds) and written as a standard
  Hugging Face checkpoint (AutoModelForCausalLM, no custom code) with ``recipe.yaml``: exactly that recipe, so
  ``evomerge merge recipe.yaml`` reproduces the weights bit for bit.
- DFS trial: the path's layers are copied in order into a standard checkpoint (A's embeddings, norm, head and
  tokenizer). With all scales 1 that is the whole model. Otherwise ``evomerge_dataflow.json`` records the input
  scale of every layer, and ``evomerge.search.dataflow.load_dataflow_model(PATH)`` loads the model with them
  (plain transformers would silently ignore the scales).

Both also get ``evomerge_trial.json`` (run, trial id, genome, metrics) for provenance. The folder appears
atomically (built next to PATH, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.run_folder import RunFolder, json_safe

TRIAL_FILE = "evomerge_trial.json"


def trial_candidate(run: RunFolder, exp, record: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(space, candidate) of a finished trial, rebuilt from its unit genome exactly as the driver built it."""
    from evomerge.search.loop import stage_definitions
    from evomerge.search.search_space import build_space

    stage = record.get("stage", 0)
    st = stage_definitions(exp)[stage]
    models = dict(exp.models)
    if exp.kind == "ps_dfs" and st["name"] == "dfs":
        models["a"] = str(run.path / "stages" / "ps_winner")
    space = build_space(st["space"], models, exp.dtype)
    return space, space.candidate(space.values(record["x"]))


def _model_card(kind: str, record: dict[str, Any], run: RunFolder, extra: str = "") -> str:
    metrics = "\n".join(f"- {k}: {v}" for k, v in record.get("metrics", {}).items())
    return (f"# evomerge {kind.upper()} export\n\nTrial {record['trial']} of the run in `{run.path}`.\n\n"
            f"Metrics at search time:\n{metrics}\n{extra}")


def export_trial(run: RunFolder, exp, record: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    from evomerge.checkpoint import find_generation_config, write_checkpoint

    out = Path(out)
    if out.exists() and not overwrite:
        raise EvomergeError(f"output folder {out} already exists (pass --overwrite to replace it)")
    space, cand = trial_candidate(run, exp, record)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    staging = staging_root / "ckpt"
    try:
        if space.kind == "ps":
            from evomerge.merge import run_merge
            from evomerge.search.worker import recipe_from_mapping

            # the merge path, tensor by tensor: no more memory than `evomerge merge` of the recipe, and the
            # same tensors as the engine the workers used (same kernels, same per-tensor seeds)
            run_merge(recipe_from_mapping(cand), staging, progress=False)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            from evomerge.search.dataflow import SCALES_FILE, path_config, path_state_dict

            dtype = getattr(torch, exp.dtype) if exp.dtype else "auto"
            a = AutoModelForCausalLM.from_pretrained(cand["a"], dtype=dtype, use_safetensors=True)
            b = AutoModelForCausalLM.from_pretrained(cand["b"], dtype=dtype, use_safetensors=True)
            tensors = path_state_dict(a, b, cand["layers"])
            if getattr(a.config, "tie_word_embeddings", False):
                tensors.pop("lm_head.weight", None)
            scaled = any(s != 1.0 for s in cand["scales"])
            note = ("\nThe layers carry input scales: load with "
                    "`evomerge.search.dataflow.load_dataflow_model(PATH)`.\n") if scaled else ""
            write_checkpoint(staging, tensors, path_config(a, b, cand["layers"]).to_dict(), tokenizer_dir=cand["a"],
                             model_card=_model_card("dfs", record, run, note),
                             generation_config=find_generation_config(cand["a"]))
            if scaled:
                (staging / SCALES_FILE).write_text(json.dumps({"input_scales": cand["scales"]}, indent=1))
        info = {"run": str(run.path), "trial": record["trial"], "stage": record.get("stage_name"),
                "kind": space.kind, "genome": record["genome"], "x": record["x"], "metrics": record["metrics"],
                "objectives": record["objectives"], "score": record["score"]}
        if space.kind != "ps":
            info.update({"a": cand["a"], "b": cand["b"], "layers": cand["layers"], "scales": cand["scales"]})
        (staging / TRIAL_FILE).write_text(json.dumps(json_safe(info), indent=1))
        if out.exists():
            old = staging_root / "old"
            os.replace(out, old)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return out


def load_exported(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of an exported trial, PS or DFS, scales included."""
    from transformers import AutoTokenizer

    from evomerge.search.dataflow import load_dataflow_model

    return load_dataflow_model(path, device=device), AutoTokenizer.from_pretrained(path)


__all__ = ["export_trial", "trial_candidate", "load_exported"]
