"""The evolutionary search: experiment config, search spaces, optimizers, the Ray loop, run folders, report,
export. See docs/ARCHITECTURE.md; each module holds one idea."""
