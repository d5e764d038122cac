"""Model I/O on real files: safetensors checkpoints built by evomerge.tiny, read back, rewritten, reloaded.

Covers reading single and sharded safetensors (and .bin only with allow_pickle), every bad-input case giving a
one-line EvomergeError naming the file, atomic streaming writes (nothing left behind when interrupted, overwrite
only after the new folder is whole) and that outputs load with transformers offline.
"""

from __future__ import annotations

import json
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.checkpoint import Checkpoint, model_card, parse_size, write_checkpoint
from evomerge.errors import EvomergeError


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, read with the safetensors library directly (the oracle)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path | str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message, message


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_index_entry(src: Path, dst: Path, tensor: str, file: str) -> tuple[Path, Path]:
    """A copy of the sharded checkpoint ``src`` whose index maps ``tensor`` to ``file``: (folder, index path)."""
    folder = _copy(src, dst)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][tensor] = file
    index_path.write_text(json.dumps(index))
    return folder, index_path


def _logits(model_dir: Path, dtype=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7]])).logits


# ------------------------------------------------------------------------------------------------ reading


def test_reads_single_file_lazily_with_shapes_dtypes_and_config(llama_family):
    ckpt = Checkpoint(llama_family["base"])
    oracle = _all_tensors(llama_family["base"])
    assert ckpt.format == "safetensors"
    assert sorted(ckpt.tensor_names) == sorted(oracle)
    assert ckpt.config["model_type"] == "llama"
    assert ckpt.num_layers == ckpt.config["num_hidden_layers"] == 4
    assert {p.name for p in ckpt.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}
    for name, tensor in oracle.items():
        assert ckpt.shape(name) == list(tensor.shape)
        assert ckpt.dtype(name) == torch.float32
        assert torch.equal(ckpt.get(name), tensor)
    name = "model.layers.1.mlp.up_proj.weight"
    half = ckpt.get(name, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and torch.equal(half, oracle[name].to(torch.bfloat16))
    with pytest.raises(EvomergeError, match="not found"):
        ckpt.get("model.layers.99.mlp.up_proj.weight")


def test_in_place_changes_to_a_read_tensor_do_not_leak_into_later_reads(llama_family):
    """safetensors hands out views of one shared copy-on-write mapping; get() must return a tensor of its own."""
    ckpt = Checkpoint(llama_family["base"])
    name = "model.layers.0.self_attn.q_proj.weight"
    oracle = load_file(llama_family["base"] / "model.safetensors")[name]
    ckpt.get(name).add_(1.0)
    ckpt.get(name, dtype=torch.float32).mul_(3.0)
    assert torch.equal(ckpt.get(name), oracle)
    assert torch.equal(ckpt.get(name, copy=False), oracle)


def test_reads_sharded_checkpoint_through_its_index(qwen2_family):
    folder = qwen2_family["base"]
    assert (folder / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(folder)
    oracle = _all_tensors(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(ckpt.tensor_names) == sorted(index["weight_map"]) == sorted(oracle)
    assert len(set(index["weight_map"].values())) > 5
    for name, tensor in oracle.items():
        assert torch.equal(ckpt.get(name), tensor)
    assert ckpt.num_layers == 4


# ------------------------------------------------------------------------------------------------ round trips


def test_single_file_round_trip_loads_with_transformers(llama_family, tmp_path):
    src = Checkpoint(llama_family["base"])
    out = write_checkpoint(tmp_path / "out", {n: src.get(n) for n in src.tensor_names}, src.config,
                           tokenizer_dir=src.path, recipe_yaml="merge_method: linear", max_shard_size="2GB")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert (out / "recipe.yaml").read_text() == "merge_method: linear\n"
    written = _all_tensors(out)
    oracle = _all_tensors(src.path)
    assert written.keys() == oracle.keys()
    assert all(torch.equal(written[n], oracle[n]) for n in oracle)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["num_hidden_layers"] == 4
    assert torch.equal(_logits(out), _logits(src.path))

    from transformers import AutoTokenizer

    text = "merge the models, then evaluate 12 + 30"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(src.path)(text)["input_ids"]


def test_sharded_round_trip_from_a_stream(qwen2_family, tmp_path):
    src = Checkpoint(qwen2_family["model_1"])
    limit = parse_size("100KB")
    out = write_checkpoint(tmp_path / "out", src.tensors(), src.config, tokenizer_dir=src.path,
                           max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # a shard only exceeds the limit when it holds one tensor bigger than the limit
        assert shard.stat().st_size <= limit + 4096 or len(load_file(shard)) == 1
    written = _all_tensors(out)
    oracle = _all_tensors(src.path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in oracle.values())
    assert written.keys() == oracle.keys() and all(torch.equal(written[n], oracle[n]) for n in oracle)
    assert Checkpoint(out).tensor_names == src.tensor_names  # file order survives the round trip
    assert torch.equal(_logits(out), _logits(src.path))


def test_dtype_conversion_on_write(llama_family, tmp_path):
    src = Checkpoint(llama_family["model_2"])
    out = write_checkpoint(tmp_path / "bf16", src.tensors(), src.config, tokenizer_dir=src.path,
                           dtype="bfloat16", max_shard_size="64KB")
    ckpt = Checkpoint(out)
    assert {ckpt.dtype(n) for n in ckpt.tensor_names} == {torch.bfloat16}
    for name in src.tensor_names:
        assert torch.equal(ckpt.get(name), src.get(name).to(torch.bfloat16))
        assert torch.equal(ckpt.get(name, dtype=torch.float32), src.get(name).to(torch.bfloat16).float())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16


def test_layer_count_follows_stacked_layers(qwen2_family, tmp_path):
    """Passthrough stacking writes more layers than the source config says: config.json must follow."""
    src = Checkpoint(qwen2_family["base"])

    def stacked():  # layers 0,1,2,3 then 2,3 again -> 6 layers
        order = [0, 1, 2, 3, 2, 3]
        for name in src.tensor_names:
            if not name.startswith("model.layers."):
                yield name, src.get(name)
        for new, old in enumerate(order):
            prefix = f"model.layers.{old}."
            for name in src.tensor_names:
                if name.startswith(prefix):
                    yield f"model.layers.{new}." + name[len(prefix):], src.get(name)

    out = write_checkpoint(tmp_path / "stacked", stacked(), src.config, tokenizer_dir=src.path)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(model.model.layers) == 6
    assert torch.equal(model.model.layers[4].mlp.up_proj.weight, src.get("model.layers.2.mlp.up_proj.weight"))


def test_write_streams_one_tensor_at_a_time(llama_family, tmp_path):
    """The writer must not keep tensors it has written: a tensor is freed once the next one is requested."""
    src = Checkpoint(llama_family["base"])
    refs: list[weakref.ref] = []
    alive_behind: list[int] = []

    def stream():
        for name in src.tensor_names:  # tensors hold no reference cycles: refcounting frees them at once
            alive_behind.append(sum(r() is not None for r in refs[:-1]))
            tensor = src.get(name).clone()
            refs.append(weakref.ref(tensor))
            yield name, tensor

    write_checkpoint(tmp_path / "out", stream(), src.config, max_shard_size="2GB")
    assert len(refs) == len(src.tensor_names) and max(alive_behind) == 0


def test_model_card_has_yaml_header_sources_method_and_recipe():
    recipe = "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n"
    card = model_card(recipe, ["./base", "./a"], "ties")
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "transformers"
    assert header["tags"] == ["evomerge", "merge"] and header["base_model"] == ["./base", "./a"]
    assert "**ties**" in card and "- ./a" in card and recipe in card


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("40KB") == 40_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1MB", 0, "2 parsecs"):
        with pytest.raises(EvomergeError):
            parse_size(bad)


# ------------------------------------------------------------------------------------------------ pickle


def _pickle_folder(src: Path, dst: Path, sharded: bool) -> dict[str, torch.Tensor]:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = _all_tensors(src)
    if not sharded:
        torch.save(state, dst / "pytorch_model.bin")
    else:
        names = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, dst / file)
        weight_map = {n: file for file, part in halves.items() for n in part}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_refused_without_flag_and_loaded_with_it(llama_family, tmp_path, sharded):
    folder = tmp_path / "bin"
    state = _pickle_folder(llama_family["model_1"], folder, sharded)
    with pytest.raises(EvomergeError, match="--allow-pickle") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, folder)
    ckpt = Checkpoint(folder, allow_pickle=True)
    assert ckpt.format == "pickle" and sorted(ckpt.tensor_names) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(ckpt.get(name), tensor) and ckpt.shape(name) == list(tensor.shape)
    name = sorted(state)[0]
    ckpt.get(name).add_(1.0)
    assert torch.equal(ckpt.get(name), state[name])


def test_bin_with_arbitrary_objects_is_refused_even_with_the_flag(llama_family, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(llama_family["base"] / "config.json", folder / "config.json")
    torch.save({"weight": torch.zeros(2), "payload": Path("/etc/passwd")}, folder / "pytorch_model.bin")
    with pytest.raises(EvomergeError) as exc:
        Checkpoint(folder, allow_pickle=True)
    _assert_one_line_naming(exc, folder / "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_folder_config_and_weights(llama_family, tmp_path):
    with pytest.raises(EvomergeError, match="not found") as exc:
        Checkpoint(tmp_path / "nope")
    _assert_one_line_naming(exc, tmp_path / "nope")

    no_config = _copy(llama_family["base"], tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(EvomergeError, match="config.json") as exc:
        Checkpoint(no_config)
    _assert_one_line_naming(exc, no_config)

    no_weights = _copy(llama_family["base"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(EvomergeError, match="no weights") as exc:
        Checkpoint(no_weights)
    _assert_one_line_naming(exc, no_weights)


def test_truncated_safetensors(llama_family, tmp_path):
    folder = _copy(llama_family["base"], tmp_path / "truncated")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(EvomergeError, match="truncated") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)
    file.write_bytes(data[:5])  # not even a header length
    with pytest.raises(EvomergeError) as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)


def test_corrupted_safetensors_headers(llama_family, tmp_path):
    folder = _copy(llama_family["base"], tmp_path / "corrupt")
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])

    garbage = bytearray(data)
    garbage[8:40] = b"\xff" * 32  # header bytes overwritten
    file.write_bytes(garbage)
    with pytest.raises(EvomergeError, match="unreadable header") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)

    huge = bytearray(data)
    huge[:8] = struct.pack("<Q", len(data) * 10)  # header length beyond the end of the file
    file.write_bytes(huge)
    with pytest.raises(EvomergeError, match="header length") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)

    file.write_bytes(bytes(data) + b"\0" * 64)  # trailing bytes: the size no longer matches the header
    with pytest.raises(EvomergeError, match="corrupted") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)

    header = json.loads(bytes(data[8:8 + header_len]))
    name = next(n for n in header if n != "__metadata__")
    header[name]["shape"] = [7, 7]  # shape no longer matches its byte range
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + header_len:]))
    with pytest.raises(EvomergeError, match="corrupted") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, file)


def test_corrupt_shard_in_sharded_checkpoint(qwen2_family, tmp_path):
    folder = _copy(qwen2_family["base"], tmp_path / "sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(EvomergeError, match="truncated") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, shard)


def test_index_naming_a_missing_shard_or_tensor(qwen2_family, tmp_path):
    folder = _copy(qwen2_family["base"], tmp_path / "missing_shard")
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(EvomergeError, match="missing") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, shard.name)
    assert str(folder) in str(exc.value)

    folder, _ = _with_index_entry(qwen2_family["base"], tmp_path / "missing_tensor",
                                  "model.layers.9.mlp.up_proj.weight", "model-00001-of-00022.safetensors")
    with pytest.raises(EvomergeError, match="does not hold") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, folder / "model-00001-of-00022.safetensors")


# ------------------------------------------------------------------------------------------------ atomic writes


class _Boom(RuntimeError):
    pass


def _failing_stream(ckpt: Checkpoint, after: int):
    for i, name in enumerate(ckpt.tensor_names):
        if i == after:
            raise _Boom("disk full, say")
        yield name, ckpt.get(name)


def test_interrupted_write_leaves_nothing(llama_family, tmp_path):
    src = Checkpoint(llama_family["base"])
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(_Boom):  # small shards: several are already complete when the stream fails
        write_checkpoint(parent / "merged", _failing_stream(src, after=30), src.config,
                         tokenizer_dir=src.path, max_shard_size="20KB")
    assert list(parent.iterdir()) == []


def test_bad_tensor_mid_stream_leaves_nothing(llama_family, tmp_path):
    src = Checkpoint(llama_family["base"])

    def stream():
        yield "a", torch.zeros(3)
        yield "a", torch.ones(3)  # a duplicate name is a programming error, caught before anything is renamed

    with pytest.raises(ValueError, match="twice"):
        write_checkpoint(tmp_path / "merged", stream(), src.config)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_semantics(llama_family, tmp_path):
    src = Checkpoint(llama_family["base"])
    other = Checkpoint(llama_family["model_1"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    with pytest.raises(EvomergeError, match="--overwrite") as exc:
        write_checkpoint(out, src.tensors(), src.config)
    _assert_one_line_naming(exc, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    with pytest.raises(_Boom):  # a failed overwrite keeps the old folder as it was
        write_checkpoint(out, _failing_stream(src, after=10), src.config, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    write_checkpoint(out, src.tensors(), src.config, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert all(torch.equal(t, src.get(n)) for n, t in _all_tensors(out).items())

    write_checkpoint(out, other.tensors(), other.config, overwrite=True)
    assert all(torch.equal(t, other.get(n)) for n, t in _all_tensors(out).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_written_file_is_standard_safetensors_with_metadata(tmp_path):
    """Our own streaming serializer must produce files the safetensors library reads, for every dtype we use."""
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4).t(),  # non-contiguous input
    }
    out = write_checkpoint(tmp_path / "out", tensors, {"model_type": "llama"})
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    ckpt = Checkpoint(out)  # and our reader's header checks accept it
    assert ckpt.config["dtype"] == "float32" and ckpt.shape("empty") == [0, 4] and ckpt.shape("scalar") == []


def test_header_larger_than_its_reserved_room(tmp_path):
    """Shards reserve room for their header; a shard of very many small tensors outgrows it and is rewritten."""
    tensors = {f"model.layers.{i}.some_rather_long_module_name.weight": torch.full((3,), float(i))
               for i in range(400)}
    out = write_checkpoint(tmp_path / "many", tensors, {"model_type": "llama", "num_hidden_layers": 400},
                           max_shard_size="1MB")
    file = out / "model.safetensors"
    (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
    assert header_len > 1_000_000 // 64  # bigger than the room reserved for a 1MB shard
    loaded = load_file(file)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_index_may_not_point_outside_its_folder(qwen2_family, tmp_path):
    folder, index_path = _with_index_entry(qwen2_family["base"], tmp_path / "escape", "lm_head.weight",
                                           "../elsewhere/model.safetensors")
    with pytest.raises(EvomergeError, match="not a file name") as exc:
        Checkpoint(folder)
    _assert_one_line_naming(exc, index_path)
