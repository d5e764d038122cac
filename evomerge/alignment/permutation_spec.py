"""Permutation specs: which axes of which tensors move together when one hidden dimension is permuted.

Permuting the units of a hidden dimension (and every weight that reads or writes it, consistently) leaves the
function a network computes unchanged. A spec names each such permutation and lists the tensor axes it acts on,
so weight matching, activation matching and applying a permutation are written once for every architecture.

A permuted "unit" can be a block of contiguous elements (``Axis.block``): a whole attention head
(``head_dim`` rows), a whole KV group of heads, or a conv channel seen through ``Flatten`` (``H*W`` inputs of
the next linear layer). Convention: ``perm[i] = j`` means unit ``i`` of the permuted model is unit ``j`` of the
original.

Builders here: ``sequential_permutation_spec`` (MLPs and small CNNs written as ``nn.Sequential``, with
BatchNorm / LayerNorm / GroupNorm layers), ``resnet_permutation_spec`` (a residual stream shared by every
block's output, one permutation per block's inner width) and ``llama_permutation_spec`` (Llama-style causal LMs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Axis:
    """Axis ``axis`` of tensor ``param`` is permuted, ``block`` contiguous elements per unit."""

    param: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class ActivationPoint:
    """Where a permutation's units can be observed: a module's output (or input), channel dimension, block."""

    module: str
    where: str = "output"  # "output" or "input"
    channel_dim: int = -1
    block: int = 1


@dataclass
class PermutationSpec:
    """Permutation name -> the tensor axes it acts on (and where its units show up as activations)."""

    perms: dict[str, list[Axis]]
    sizes: dict[str, int]
    activations: dict[str, list[ActivationPoint]] = field(default_factory=dict)

    def axes_of_param(self) -> dict[str, list[tuple[str, Axis]]]:
        """param -> [(perm name, Axis)] for every permuted axis of that tensor."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for name, axes in self.perms.items():
            for ax in axes:
                out.setdefault(ax.param, []).append((name, ax))
        return out

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """Every named tensor exists and every permuted axis has ``size * block`` elements."""
        for name, axes in self.perms.items():
            for ax in axes:
                if ax.param not in state:
                    raise EvomergeError(f"permutation {name!r} names tensor {ax.param!r}, which the model lacks")
                dim = state[ax.param].shape[ax.axis]
                if dim != self.sizes[name] * ax.block:
                    raise EvomergeError(
                        f"tensor {ax.param!r} axis {ax.axis} has {dim} elements; permutation {name!r} expects "
                        f"{self.sizes[name]} units of {ax.block}")


def identity_perms(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """The identity permutation (``arange(n)``, int64) of every permutation group of ``spec``."""
    return {name: torch.arange(n) for name, n in spec.sizes.items()}


def expand_block(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation -> element permutation for units of ``block`` contiguous elements."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def permute_tensor(tensor: torch.Tensor, axes: list[tuple[str, Axis]], perms: dict[str, torch.Tensor],
                   skip: str | None = None) -> torch.Tensor:
    """``tensor`` with every listed axis permuted (except the one belonging to permutation ``skip``)."""
    for name, ax in axes:
        if name == skip:
            continue
        tensor = torch.index_select(tensor, ax.axis, expand_block(perms[name], ax.block).to(tensor.device))
    return tensor


def apply_permutation(spec: PermutationSpec, perms: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict: ``state`` with every permutation applied (tensors no spec touches are shared)."""
    by_param = spec.axes_of_param()
    return {k: (permute_tensor(v, by_param[k], perms) if k in by_param else v) for k, v in state.items()}


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation (``inv[perm[i]] = i``), same dtype and length."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


# --------------------------------------------------------------------------------------------------------------
# Builders


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def _module_tensor_names(prefix: str, module: nn.Module) -> list[str]:
    names = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
    names += [f"{prefix}{n}" for n, b in module.named_buffers(recurse=False)
              if b is not None and b.dim() > 0]
    return names


def sequential_permutation_spec(model: nn.Sequential, prefix: str = "") -> PermutationSpec:
    """Spec for an MLP or small CNN written as ``nn.Sequential`` of Linear / Conv2d / norm / activation / Flatten.

    Every Linear or Conv2d except the last gets a permutation of its output units; norm layers in between
    (BatchNorm running statistics included) follow it, the next Linear/Conv2d's input axis follows it, and
    through ``Flatten`` each channel becomes a block of ``H*W`` inputs. GroupNorm is only safe when every group
    has one channel, so other GroupNorms are refused. Activations are observed after the last module before
    the next Linear/Conv2d (after the nonlinearity).
    """
    children = list(model.named_children())
    layer_idx = [i for i, (_, m) in enumerate(children) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if len(layer_idx) < 2:
        raise EvomergeError("a sequential network needs at least two Linear/Conv2d layers to permute")
    perms: dict[str, list[Axis]] = {}
    sizes: dict[str, int] = {}
    acts: dict[str, list[ActivationPoint]] = {}
    for k, i in enumerate(layer_idx[:-1]):
        name_i, layer = children[i]
        n = layer.out_features if isinstance(layer, nn.Linear) else int(layer.out_channels)  # type: ignore[arg-type]
        pname = f"P_{k}"
        sizes[pname] = n
        axes = [Axis(f"{prefix}{name_i}.weight", 0)]
        if layer.bias is not None:
            axes.append(Axis(f"{prefix}{name_i}.bias", 0))
        channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        last_name = name_i
        nxt = layer_idx[k + 1]
        for j in range(i + 1, nxt):
            cname, child = children[j]
            if isinstance(child, nn.GroupNorm) and child.num_groups != child.num_channels:
                raise EvomergeError(f"GroupNorm {cname!r} mixes channels within groups; it cannot be permuted")
            if isinstance(child, _NORMS):
                axes += [Axis(t, 0) for t in _module_tensor_names(f"{prefix}{cname}.", child)]
            last_name = cname
        next_name, next_layer = children[nxt]
        block = 1
        if isinstance(next_layer, nn.Linear) and next_layer.in_features != n:
            in_features = int(next_layer.in_features)
            if in_features % n:
                raise EvomergeError(f"layer {next_name!r} reads {in_features} inputs, not a multiple "
                                    f"of the {n} channels before it")
            block = in_features // n
        axes.append(Axis(f"{prefix}{next_name}.weight", 1, block))
        perms[pname] = axes
        acts[pname] = [ActivationPoint(f"{prefix}{last_name}", "output", channel_dim)]
    return PermutationSpec(perms, sizes, acts)


def _norm_or_conv_axes(prefix: str, module: nn.Module) -> list[Axis]:
    return [Axis(t, 0) for t in _module_tensor_names(prefix, module)]


def resnet_permutation_spec(model: nn.Module, stem: list[str], blocks: list[tuple[list[str], list[str]]],
                            head: str) -> PermutationSpec:
    """Spec for a ResNet-style net with identity shortcuts.

    ``stem``: names of the modules writing the residual stream first (e.g. ``["conv", "bn"]``).
    ``blocks``: per residual block, (modules up to and including the inner width's norm, modules writing the
    block's output back to the stream), e.g. ``(["b0.conv1", "b0.bn1"], ["b0.conv2", "b0.bn2"])``.
    ``head``: the Linear reading the (pooled) stream. The stream permutation ``P_res`` is shared by the stem,
    every block's output and the head's input (identity shortcuts add the stream to itself); each block's
    inner width gets its own permutation.
    """
    mods = dict(model.named_modules())
    res_axes: list[Axis] = []
    for name in stem:
        res_axes += _norm_or_conv_axes(f"{name}.", mods[name])
    perms: dict[str, list[Axis]] = {}
    sizes: dict[str, int] = {}
    acts: dict[str, list[ActivationPoint]] = {"P_res": []}
    width = mods[stem[0]].out_channels
    res_in: list[Axis] = []
    for b, (inner, outer) in enumerate(blocks):
        first = mods[inner[0]]
        res_in.append(Axis(f"{inner[0]}.weight", 1))
        pname = f"P_block{b}"
        axes: list[Axis] = []
        for name in inner:
            axes += _norm_or_conv_axes(f"{name}.", mods[name])
        axes.append(Axis(f"{outer[0]}.weight", 1))
        perms[pname] = axes
        sizes[pname] = first.out_channels
        acts[pname] = [ActivationPoint(inner[-1], "output", 1)]
        for name in outer:
            res_axes += _norm_or_conv_axes(f"{name}.", mods[name])
        acts["P_res"].append(ActivationPoint(outer[-1], "output", 1))
    acts["P_res"].insert(0, ActivationPoint(stem[-1], "output", 1))
    perms = {"P_res": res_axes + res_in + [Axis(f"{head}.weight", 1)], **perms}
    sizes = {"P_res": width, **sizes}
    return PermutationSpec(perms, sizes, acts)


def llama_permutation_spec(config, param_names: list[str] | set[str], prefix: str = "model.") -> PermutationSpec:
    """Spec for a Llama-style causal LM (Llama, Mistral, Qwen2: RMSNorm, RoPE, gated MLP, optional GQA).

    - ``P_res``: one permutation of the residual stream shared by every layer: embedding columns, every
      q/k/v/gate/up input, every o/down output, every RMSNorm weight (RMSNorm is equivariant to permutations),
      lm_head columns.
    - ``P_ffn_{i}``: the FFN hidden units of layer i (gate/up rows, down columns).
    - ``P_heads_{i}``: whole KV groups of layer i. RoPE rotates pairs of dimensions inside a head, so the order
      inside a head is kept; with grouped-query attention the query heads sharing a KV head move with it, as one
      block of ``group * head_dim`` query rows / o_proj columns and ``head_dim`` key/value rows. (Reordering the
      query heads inside a group would also be safe; it is not searched.)
    """
    names = set(param_names)
    hidden = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    group = n_heads // n_kv
    n_layers = config.num_hidden_layers
    p = prefix

    def have(name: str) -> bool:
        """Whether the checkpoint has tensor ``name``."""
        return name in names

    res: list[Axis] = [Axis(f"{p}embed_tokens.weight", 1)]
    perms: dict[str, list[Axis]] = {}
    sizes: dict[str, int] = {"P_res": hidden}
    acts: dict[str, list[ActivationPoint]] = {"P_res": [ActivationPoint(f"{p}embed_tokens")]}
    for i in range(n_layers):
        L = f"{p}layers.{i}."
        a = f"{L}self_attn."
        m = f"{L}mlp."
        res += [Axis(f"{L}input_layernorm.weight", 0), Axis(f"{L}post_attention_layernorm.weight", 0)]
        res += [Axis(f"{a}{x}_proj.weight", 1) for x in "qkv"]
        res += [Axis(f"{a}o_proj.weight", 0), Axis(f"{m}down_proj.weight", 0)]
        res += [Axis(f"{m}gate_proj.weight", 1), Axis(f"{m}up_proj.weight", 1)]
        for extra in (f"{a}o_proj.bias", f"{m}down_proj.bias"):
            if have(extra):
                res.append(Axis(extra, 0))
        ffn = [Axis(f"{m}gate_proj.weight", 0), Axis(f"{m}up_proj.weight", 0), Axis(f"{m}down_proj.weight", 1)]
        ffn += [Axis(f"{m}{x}_proj.bias", 0) for x in ("gate", "up") if have(f"{m}{x}_proj.bias")]
        perms[f"P_ffn_{i}"] = ffn
        sizes[f"P_ffn_{i}"] = config.intermediate_size
        acts[f"P_ffn_{i}"] = [ActivationPoint(f"{m}down_proj", "input")]
        heads = [Axis(f"{a}q_proj.weight", 0, group * head_dim), Axis(f"{a}k_proj.weight", 0, head_dim),
                 Axis(f"{a}v_proj.weight", 0, head_dim), Axis(f"{a}o_proj.weight", 1, group * head_dim)]
        heads += [Axis(f"{a}{x}_proj.bias", 0, group * head_dim if x == "q" else head_dim)
                  for x in "qkv" if have(f"{a}{x}_proj.bias")]
        if n_kv > 1:
            perms[f"P_heads_{i}"] = heads
            sizes[f"P_heads_{i}"] = n_kv
            acts[f"P_heads_{i}"] = [ActivationPoint(f"{a}o_proj", "input", -1, group * head_dim)]
        acts["P_res"].append(ActivationPoint(f"{p}layers.{i}"))
    res.append(Axis(f"{p}norm.weight", 0))
    if have("lm_head.weight"):
        res.append(Axis("lm_head.weight", 1))
    perms = {"P_res": res, **perms}
    return PermutationSpec(perms, sizes, acts)
