"""``models: {build: ...}``: the tiny local model family an experiment can ask its run to build.

Built once into the run folder's ``models/`` (atomically: a temporary folder renamed into place, so a kill
mid-build leaves nothing half-written), then the experiment's model paths point into it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers

from evomerge import tiny
from evomerge.search.run_folder import RunFolder


def build_models(run: RunFolder, config: dict[str, Any]) -> dict[str, Any]:
    """Build the family that ``config["models"]["build"]`` asks for (if not built yet) and fill in the paths.

    Args:
        run: the run folder (the family goes to ``run.path / "models"``).
        config: the resolved experiment mapping (config.yaml).

    Returns:
        ``config`` with ``models`` base/sources (PS), a/b (DFS) or base/sources/b (ps_dfs) set; the run
        folder's config.yaml is updated to match. Without ``build`` the config is returned as is.
    """
    models = config["models"]
    build = models.get("build")
    if not build:
        return config
    target = run.path / "models"
    for stale in run.path.glob(".models-*"):  # a build interrupted by a kill
        shutil.rmtree(stale, ignore_errors=True)
    if not (target / "base" / "config.json").is_file():
        _build(run.path, target, build)
    names = [f"model_{i}" for i in range(1, build["n_variants"] + 1)]
    kind = config["search_space"]["kind"]
    if kind in ("ps", "ps_dfs"):
        models["base"] = str(target / "base")
        models["sources"] = {n: str(target / n) for n in names}
    if kind == "dfs":
        models["a"], models["b"] = str(target / names[0]), str(target / names[1])
    if kind == "ps_dfs":
        models["b"] = str(target / names[-1])
    run.update_config(config)
    return config


def _build(run_path: Path, target: Path, build: dict[str, Any]) -> None:
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tmp = Path(tempfile.mkdtemp(prefix=".models-", dir=run_path))
    kwargs = {k: v for k, v in build.items() if k not in ("arch", "n_variants", "seed", "scale")}
    tiny.make_family(tmp, n_variants=build["n_variants"], arch=build["arch"], seed=build["seed"],
                     scale=build.get("scale", 0.05), **kwargs)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
