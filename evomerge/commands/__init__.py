"""One module per `evomerge` sub-command; each has ``add_arguments(parser)`` and ``run(args) -> int``."""

COMMANDS = {
    "merge": "Merge models from a mergekit-compatible recipe YAML into a Hugging Face checkpoint.",
    "eval": "Evaluate a saved model with a built-in or YAML-defined evaluator.",
    "run": "Run (or resume) an evolutionary merge search from an experiment YAML.",
    "report": "Summarize a run folder: best trials, Pareto front, plots.",
    "export": "Export a trial of a run as a Hugging Face checkpoint plus its recipe.",
    "align": "Permute model B into model A's basin (Git Re-Basin weight or activation matching).",
}
