"""Shared fixtures: tiny model families built locally (never downloaded), and a clean offline environment."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """base, model_1, model_2: tiny Llama checkpoints sharing a base (float32, single safetensors file)."""
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp("llama"), n_variants=2, arch="llama", seed=0)


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory):
    """base, model_1, model_2: tiny Qwen2 checkpoints, sharded safetensors with an index."""
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp("qwen2"), n_variants=2, arch="qwen2", seed=1,
                            max_shard_size="40KB")


@pytest.fixture(scope="module")
def mergekit_api():
    """mergekit 0.1.5's own ``run_merge`` on a recipe mapping or MergeConfiguration (tests/mergekit_oracle.py);
    skips the test when mergekit does not import."""
    from mergekit_oracle import mergekit_runner  # a tests/ module: conftest loads before pytest puts tests/ on the path

    return mergekit_runner()


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (tiny models train and run many times faster so on this machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TINY_CHOICE_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A local lm-eval multiple-choice task, tiny_choice (six sums as JSON lines), for mergekit-evolve configs."""
    folder = tmp_path_factory.mktemp("evolve_tasks")
    items = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
             for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (6, 3)]]
    data = folder / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (folder / "tiny_choice.yaml").write_text(_TINY_CHOICE_YAML.format(data=data), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the test session (in this process); searches join it with ``address=``, so only
    the tests that check the embedded start pay for one."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = os.path.join(tempfile.gettempdir(), f"evomerge-ray-{os.getuid()}")
    os.makedirs(tmp, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING",
             _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
