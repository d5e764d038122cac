"""`evomerge export DIR --out PATH [--trial best|ID]`: a trial of a run as a checkpoint on disk.

The candidate is read from the trial's record (runs of earlier releases: decoded from its genome, exactly
as the driver decoded it).

- PS trial: the trial's recipe is merged tensor by tensor by `evomerge merge`'s path (no more memory than that
  command; the same tensors as the engine the workers used: same kernels, same seeds) and written as a standard
  Hugging Face checkpoint (AutoModelForCausalLM, no custom code) with ``recipe.yaml``: exactly that recipe, so
  ``evomerge merge recipe.yaml`` reproduces the weights bit for bit.
- DFS trial: the path's layers are copied in order into a standard checkpoint (A's embeddings, norm, head and
  tokenizer). With all scales 1 that is the whole model. Otherwise ``evomerge_dataflow.json`` records the input
  scale of every layer, and ``evomerge.search.dataflow.load_dataflow_model(PATH)`` loads the model with them
  (plain transformers would silently ignore the scales).

Both also get ``evomerge_trial.json`` (run, trial id, genome x, params, metrics) for provenance. The folder appears
atomically (built next to PATH, then renamed). No file of it names the machine: the recipe, the provenance and
the model card give every path relative to PATH (``recipe.yaml`` resolves them against its own folder, so
``evomerge merge PATH/recipe.yaml`` still reproduces the weights).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from evomerge.checkpoint import find_generation_config, write_checkpoint
from evomerge.errors import EvomergeError
from evomerge.merge import run_merge
from evomerge.recipe import Recipe
from evomerge.search.candidates import Candidate, LayerPath
from evomerge.search.dataflow import SCALES_FILE, load_dataflow_model, path_config, path_state_dict
from evomerge.search.experiment import Experiment
from evomerge.search.objectives import best_trial
from evomerge.search.portable import portable_paths
from evomerge.search.records import TrialRecord, json_safe
from evomerge.search.run_folder import RunFolder
from evomerge.search.stages import PS_WINNER, stage_space

TRIAL_FILE = "evomerge_trial.json"


def trial_candidate(run: RunFolder, exp: Experiment, record: TrialRecord) -> Candidate:
    """The candidate of a finished trial: from its record, else decoded from its genome as the driver did.

    Returns:
        A ``Recipe`` (PS) or a ``LayerPath`` (DFS).
    """
    if record.candidate is not None:
        return record.candidate
    return stage_space(exp, run.path, record.stage).decode(record.x)


def _model_card(kind: str, record: TrialRecord, run: str, extra: str = "") -> str:
    metrics = "\n".join(f"- {k}: {v}" for k, v in record.metrics.items())
    return (f"# evomerge {kind.upper()} export\n\nTrial {record.trial} of the run in `{run}`.\n\n"
            f"Metrics at search time:\n{metrics}\n{extra}")


def export_trial(run: RunFolder, exp: Experiment, record: TrialRecord, out: str | Path,
                 overwrite: bool = False) -> Path:
    """Write a finished trial's candidate as a checkpoint folder (see module docstring), atomically.

    Args:
        run: the trial's run folder.
        exp: the run's experiment (its ``dtype`` is the DFS checkpoint's dtype; None: the sources').
        record: the trial.
        out: the checkpoint folder to write.
        overwrite: replace ``out`` if it exists.

    Returns:
        ``out`` as a Path.

    Raises:
        EvomergeError: ``out`` exists and ``overwrite`` is False, or the candidate's models cannot be read.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise EvomergeError(f"output folder {out} already exists (pass --overwrite to replace it)")
    cand = trial_candidate(run, exp, record)
    out.parent.mkdir(parents=True, exist_ok=True)
    here = out.resolve()
    run_rel = portable_paths(str(run.path), here)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    staging = staging_root / "ckpt"
    try:
        if isinstance(cand, LayerPath):
            card = _model_card("dfs", record, run_rel, _scale_note(cand))
            _write_dataflow(cand, staging, getattr(torch, exp.dtype) if exp.dtype else "auto", card)
        else:
            # the merge path, tensor by tensor: no more memory than `evomerge merge` of the recipe, and the
            # same tensors as the engine the workers used (same kernels, same per-tensor seeds); its paths
            # relative to the export, which its recipe.yaml resolves against
            portable = Recipe.from_dict(portable_paths(cand.to_dict(), here), root=here, source="the trial's recipe")
            run_merge(portable, staging, progress=False)
            recipe_yaml = portable.to_yaml()
            (staging / "README.md").write_text(_model_card("ps", record, run_rel, "\n## Recipe\n\n```yaml\n"
                                                           + recipe_yaml + "```\n"))
        info: dict[str, Any] = {
            "run": run_rel, "trial": record.trial, "stage": record.stage_name,
            "kind": "dfs" if isinstance(cand, LayerPath) else "ps", "params": record.params, "x": record.x,
            "metrics": record.metrics, "objectives": record.objectives, "score": record.score}
        if isinstance(cand, LayerPath):
            info.update({"a": portable_paths(cand.a, here), "b": portable_paths(cand.b, here),
                         "layers": cand.layers, "scales": cand.scales})
        (staging / TRIAL_FILE).write_text(json.dumps(json_safe(info), indent=1))
        _forget_source_path(staging / "config.json")
        if out.exists():
            os.replace(out, staging_root / "old")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return out


def _forget_source_path(config_file: Path) -> None:
    """Drop the ``_name_or_path`` transformers records in a config (the folder model A or the base was read
    from: a machine path), so the export names no machine path."""
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _scale_note(path: LayerPath) -> str:
    if all(s == 1.0 for s in path.scales):
        return ""
    return "\nThe layers carry input scales: load with `evomerge.search.dataflow.load_dataflow_model(PATH)`.\n"


def _write_dataflow(path: LayerPath, staging: Path, dtype: torch.dtype | str, card: str) -> None:
    """The path's layers copied in order into a standard checkpoint (A's embeddings, norm, head, tokenizer)."""
    a = AutoModelForCausalLM.from_pretrained(path.a, dtype=dtype, use_safetensors=True)
    b = AutoModelForCausalLM.from_pretrained(path.b, dtype=dtype, use_safetensors=True)
    tensors = path_state_dict(a, b, path.layers)
    if getattr(a.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    write_checkpoint(staging, tensors, path_config(a, b, path.layers).to_dict(), tokenizer_dir=path.a,
                     model_card=card, generation_config=find_generation_config(path.a))
    if any(s != 1.0 for s in path.scales):
        (staging / SCALES_FILE).write_text(json.dumps({"input_scales": path.scales}, indent=1))


def export_ps_winner(run: RunFolder, exp: Experiment, records: Sequence[TrialRecord], stage: int) -> Path:
    """ps_dfs: export the PS stage's best trial to ``stages/ps_winner``, the DFS stage's model A (once).

    Raises:
        EvomergeError: the PS stage has no successful trial.
    """
    target = run.path / PS_WINNER
    if (target / "config.json").is_file():
        return target
    best = best_trial(records, stage=stage)
    if best is None:
        raise EvomergeError("the PS stage has no successful trial; the DFS stage has no model A")
    target.parent.mkdir(parents=True, exist_ok=True)
    return export_trial(run, exp, best, target, overwrite=True)


def load_exported(path: str | Path, device: str = "cpu") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) of an exported trial, PS or DFS, scales included."""
    return load_dataflow_model(path, device=device), AutoTokenizer.from_pretrained(path)


__all__ = ["export_trial", "export_ps_winner", "trial_candidate", "load_exported"]
