"""A custom evaluator whose evaluations finish only on the test's say-so (the kill-and-resume tests).

The test copies this file (and search_helpers.py, whose score it uses) into a gate folder and names that copy in
the experiment. Each evaluation scores the
candidate for real (the spread of its logits on fixed tokens), then may return only after claiming a ticket: a
``ticket-*`` file in the gate folder, claimed by an atomic rename (two evaluations never get the same one);
while there is none it waits. A file ``open`` in the gate folder lets every evaluation through. With N tickets
a run writes exactly N more lines to trials.jsonl, however slow or loaded the machine: that is how the tests
choose their kill points by trial count, never by sleeping.

Every process that imports the copy (a worker builds its evaluators before it reports ready, so before it is
given any trial) leaves a ``process-<pid>`` marker beside it: after killing a run, the test waits until those
processes are gone, so that no worker of a dead run claims a ticket meant for the next part. While an
evaluation waits for a ticket, a ``waiting-<pid>`` marker says that worker holds a scored trial (the cluster
tests kill a node once its worker does).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# search_helpers.py lies beside this file (the test copies both into the gate folder): a custom evaluator file's
# own folder is on sys.path in every process that loads it (evomerge/evaluators/custom.py)
from search_helpers import _logit_score

HERE = Path(__file__).resolve().parent
if (HERE / "GATE").exists():
    (HERE / f"process-{os.getpid()}").touch()


def gated(model, tokenizer, gate: str) -> dict[str, float]:
    """``std``: the candidate's logit spread, returned once a ticket is claimed (or the gate is open)."""
    result = {"std": _logit_score(model)}
    gated_wait(Path(gate))
    return result


def gated_wait(folder: Path) -> None:
    """Return once a ticket in ``folder`` is claimed (or the gate is open); a ``waiting-<pid>`` marker says an
    evaluation is waiting meanwhile."""
    waiting = folder / f"waiting-{os.getpid()}"
    waiting.touch()
    try:
        while not (folder / "open").exists():
            for ticket in sorted(folder.glob("ticket-*")):
                try:
                    os.rename(ticket, folder / f"used-{ticket.name}")
                except FileNotFoundError:
                    continue  # another evaluation claimed it first
                return
            time.sleep(0.01)
    finally:
        waiting.unlink(missing_ok=True)


gated.metric_names = ("std",)


def gated_items(model, tokenizer, gate: str, first: int, n: int = 36, items=None) -> dict:
    """A per-item accuracy for ``fitness: race | minibatch`` (item i right when the candidate's next-token logit
    prefers item i's first token over its second one, tokens drawn with seed i). The call that starts a trial
    (``first`` items: a race's first checkpoint, a mini-batch) claims a ticket before it returns, so each trial
    takes one ticket however far its race goes, and a run without tickets stops mid-race, inside a trial's first
    checkpoint."""
    positions = list(range(n)) if items is None else list(items)
    vocab = model.get_input_embeddings().weight.shape[0]
    values = []
    with torch.inference_mode():
        for i in positions:
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(4, vocab, (1, 6), generator=g)
            a, b = torch.randint(4, vocab, (2,), generator=g).tolist()
            last = model(ids.to(next(model.parameters()).device)).logits[0, -1].float()
            values.append(float(last[a] > last[b]))
    if items is None or len(positions) == first:
        gated_wait(Path(gate))
    return {"acc": values} if items is not None else {"acc": sum(values) / len(values)}


gated_items.metric_names = ("acc",)
gated_items.n_items = lambda n=36, **_: n
