"""Hugging Face causal-LM plumbing for alignment and data-aware merges: loading, compatibility checks, alignment.

Models are local folders only: ``transformers`` loads them with ``local_files_only=True``, safetensors only
unless ``allow_pickle``, and never with remote code. Permutation alignment supports the Llama-style families
whose every tensor ``llama_permutation_spec`` knows (RMSNorm, RoPE, gated MLP, optional GQA, q/k/v biases,
Qwen3's per-head q/k norms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.alignment.activation_matching import activation_matching
from evomerge.alignment.calibration import load_texts, tokenized_batches
from evomerge.alignment.permutation_spec import PermutationSpec, apply_permutation, llama_permutation_spec
from evomerge.alignment.weight_matching import weight_matching
from evomerge.checkpoint import Checkpoint
from evomerge.errors import EvomergeError

#: model_type values whose tensors llama_permutation_spec covers (Qwen3's per-head q/k norms are shared by all
#: heads and keep their order, so whole-head permutations leave them as they are).
LLAMA_STYLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "tie_word_embeddings")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """(model, tokenizer-or-None) from a local folder: no hub, no remote code, safetensors unless allow_pickle."""
    import transformers  # deferred: seconds to import, and `evomerge merge` reaches this module without using it

    Checkpoint(path, allow_pickle=allow_pickle)  # one-line errors for missing / broken folders
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, dtype=dtype,
            use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"cannot load model {path}: {first}") from None
    return model.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer of a local folder (no hub, no remote code); ``EvomergeError`` when it cannot be loaded."""
    import transformers  # deferred: seconds to import, and `evomerge merge` reaches this module without using it

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"cannot load the tokenizer of {path}: {first}") from None


def check_same_architecture(ckpt_a: Checkpoint, ckpt_b: Checkpoint) -> None:
    """Same model type, same shape-defining config entries, same tensor names and shapes; else one line."""
    ta, tb = ckpt_a.config.get("model_type"), ckpt_b.config.get("model_type")
    if ta != tb:
        raise EvomergeError(f"architecture mismatch: {ckpt_a.path} is {ta!r}, {ckpt_b.path} is {tb!r}")
    for key in _SHAPE_KEYS:
        va, vb = ckpt_a.config.get(key), ckpt_b.config.get(key)
        if va != vb:
            raise EvomergeError(f"architecture mismatch: {key} is {va} in {ckpt_a.path} but {vb} in {ckpt_b.path}")
    names_a, names_b = set(ckpt_a.tensor_names), set(ckpt_b.tensor_names)
    if names_a != names_b:
        diff = sorted(names_a ^ names_b)
        where = ckpt_a.path if diff[0] in names_a else ckpt_b.path
        raise EvomergeError(f"architecture mismatch: tensor {diff[0]!r} only in {where} ({len(diff)} differ)")
    for name in ckpt_a.tensor_names:
        sa, sb = ckpt_a.shape(name), ckpt_b.shape(name)
        if sa != sb:
            raise EvomergeError(f"shape mismatch: tensor {name!r} is {sa} in {ckpt_a.path} but {sb} in {ckpt_b.path}")


def causal_lm_spec(ckpt: Checkpoint) -> PermutationSpec:
    """The Llama-style permutation spec of a checkpoint (checked against its tensors)."""
    import transformers  # deferred: seconds to import, and `evomerge merge` reaches this module without using it

    model_type = ckpt.config.get("model_type")
    if model_type not in LLAMA_STYLE_MODEL_TYPES:
        raise EvomergeError(f"alignment supports Llama-style models ({', '.join(LLAMA_STYLE_MODEL_TYPES)}); "
                            f"{ckpt.path} is {model_type!r}")
    config = transformers.AutoConfig.for_model(**ckpt.config)
    spec = llama_permutation_spec(config, ckpt.tensor_names)
    covered = {ax.param for axes in spec.perms.values() for ax in axes}
    for name in ckpt.tensor_names:
        if name not in covered and ckpt.shape(name) and config.hidden_size in ckpt.shape(name):
            # a tensor touching the hidden size that the spec does not know would break the function
            raise EvomergeError(f"alignment does not know how to permute tensor {name!r} of {ckpt.path}")
    spec.check({n: torch.empty(ckpt.shape(n), device="meta") for n in ckpt.tensor_names})
    return spec


def align_causal_lm(path_a: str | Path, path_b: str | Path, method: str = "weight",
                    calibration: str | Path | None = None, field: str = "text", samples: int = 64,
                    max_length: int = 128, batch_size: int = 4, seed: int = 0, max_iter: int = 100,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """(B's tensors permuted into A's basin, B's config, the permutations) for two Llama-style checkpoints."""
    ckpt_a, ckpt_b = Checkpoint(path_a), Checkpoint(path_b)
    check_same_architecture(ckpt_a, ckpt_b)
    spec = causal_lm_spec(ckpt_a)
    state_b = dict(ckpt_b.tensors())
    if method == "weight":
        state_a = dict(ckpt_a.tensors())
        perms = weight_matching(spec, state_a, state_b, max_iter=max_iter, seed=seed)
        del state_a
    elif method == "activation":
        if calibration is None:
            raise EvomergeError("activation matching needs calibration texts (--calibration FILE)")
        texts = load_texts(calibration, field=field, samples=samples, seed=seed)
        batches = tokenized_batches(texts, load_tokenizer(path_a), max_length=max_length, batch_size=batch_size)
        model_a, model_b = load_causal_lm(path_a), load_causal_lm(path_b)
        perms = activation_matching(spec, model_a, model_b, batches)
        del model_a, model_b
    else:
        raise EvomergeError(f"unknown alignment method {method!r}; use 'weight' or 'activation'")
    return apply_permutation(spec, perms, state_b), ckpt_b.config, perms
