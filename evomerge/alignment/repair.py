"""REPAIR (Jordan et al. 2023): undo the variance collapse of an interpolated network.

Averaging two (aligned) networks shrinks each neuron's activation spread, and the shrinkage compounds with
depth. REPAIR measures, per channel, the mean and standard deviation at chosen modules of each endpoint, then
makes the interpolated network's channel statistics equal to the interpolation of the endpoints' (the std is
interpolated, not the variance):

- BatchNorm modules: their running statistics are recomputed on the data (resetting the BN statistics);
- Linear, Conv2d, or affine LayerNorm/GroupNorm modules: the correction is folded into the module's own
  weight and bias: ``w <- w * s_target / s_now`` and ``b <- (b - mu_now) * s_target / s_now + mu_target``,
  with ``s_now = sqrt(var_now + eps)`` as in BatchNorm (so a silent channel is not blown up), which turns the
  channel's output statistics into the target (exactly, up to ``eps``).

Modules are corrected in order, each measured after the ones before it were fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from evomerge.alignment.activation_matching import _first_tensor, run_model

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    """(rows, channels): channels on dim 1 for conv/BN maps, on the last dim for linear outputs."""
    t = _first_tensor(t).detach().double()
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def _channel_moments(model: nn.Module, module_names: Sequence[str], batches: Iterable[Any],
                     forward: Callable[[nn.Module, Any], Any], of_inputs: bool) -> dict[str, list]:
    """Module name -> [rows, per-channel sum, per-channel sum of squares] of each module's output (or input,
    with ``of_inputs``) over all ``batches``, in float64, with the model in eval mode for the pass."""
    mods = dict(model.named_modules())
    sums: dict[str, list] = {n: [0, 0.0, 0.0] for n in module_names}

    def hook(name):
        """A forward hook accumulating the channel sums and squares of module ``name``."""
        def fn(module, args, out=None):
            """Add this call's per-channel count, sum and sum of squares."""
            x = _channel_view(args[0] if of_inputs else out)
            s = sums[name]
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + (x * x).sum(0)
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) if of_inputs else mods[n].register_forward_hook(hook(n))
               for n in module_names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


@torch.no_grad()
def channel_stats(model: nn.Module, module_names: Sequence[str], batches: Iterable[Any],
                  forward: Callable[[nn.Module, Any], Any] = run_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (mean, std) per output channel over all ``batches`` (model in eval mode)."""
    out = {}
    for n, (count, s1, s2) in _channel_moments(model, module_names, batches, forward, of_inputs=False).items():
        mean = s1 / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt()
        out[n] = (mean, std)
    return out


@torch.no_grad()
def reset_batchnorm(model: nn.Module, module_name: str, batches: Iterable[Any],
                    forward: Callable[[nn.Module, Any], Any] = run_model) -> None:
    """Set one BatchNorm's running mean/var to its input's exact per-channel statistics over ``batches``.

    Pooled over all batches (unbiased variance, as BatchNorm keeps it), with the rest of the model in eval mode,
    rather than the momentum average of per-batch statistics a train-mode pass would give.
    """
    bn = dict(model.named_modules())[module_name]
    n, s1, s2 = _channel_moments(model, [module_name], batches, forward, of_inputs=True)[module_name]
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))


@torch.no_grad()
def repair(merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float], module_names: Sequence[str],
           batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] = run_model, eps: float = 1e-5,
           ) -> nn.Module:
    """Correct ``merged`` (in place) so each module's channel stats interpolate the endpoints' with ``weights``.

    ``merged`` is the interpolation ``sum_i weights[i] * endpoints[i]`` of aligned endpoints; ``batches`` is
    re-iterated several times, so pass a list.
    """
    batches = list(batches)
    target_mean: dict[str, torch.Tensor] = {}
    target_std: dict[str, torch.Tensor] = {}
    for w, model in zip(weights, endpoints):
        for name, (mean, std) in channel_stats(model, module_names, batches, forward).items():
            target_mean[name] = target_mean.get(name, 0) + w * mean
            target_std[name] = target_std.get(name, 0) + w * std
    mods = dict(merged.named_modules())
    for name in module_names:
        module = mods[name]
        if isinstance(module, _BN):
            reset_batchnorm(merged, name, batches, forward)
            continue
        if getattr(module, "weight", None) is None:
            raise ValueError(f"REPAIR cannot correct {name!r}: it has no weight to fold the correction into")
        mean, std = channel_stats(merged, [name], batches, forward)[name]
        scale = target_std[name] / (std * std + eps).sqrt()
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(scale.to(module.weight.dtype).view(shape))
        shift = target_mean[name] - mean * scale
        if module.bias is None:
            module.bias = nn.Parameter(shift.to(module.weight.dtype))
        else:
            module.bias.mul_(scale.to(module.bias.dtype)).add_(shift.to(module.bias.dtype))
    return merged
