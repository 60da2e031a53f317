"""Neuron-level sensitivity (SeReNe): S of each output unit (neuron, channel) of a Linear or
Conv layer, from the same recorded forward and one backward to the layers' outputs."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from .definition import ROW_CHUNK, alpha_matrix, check_options, output_rows, row_grad_outputs
from .engines.batchnorm import samples_coupled
from .generic import batched_grad
from .recorder import LayerRecorder

UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv layers whose output units (neurons, channels) can be regularized as
    groups, by name, in definition order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, UNIT_TYPES) and m.weight.requires_grad}


def unit_sensitivity_from(y: torch.Tensor, alpha: torch.Tensor, recorder: LayerRecorder,
                          layers: dict[str, nn.Module], kind: str,
                          distributed: bool = False) -> dict[str, torch.Tensor]:
    """Neuron-level sensitivity (SeReNe) of every recorded layer in ``layers``: for each output
    unit n (a neuron, or a channel whose map holds P positions),
        S_n = (1/B) sum_i sum_k alpha_{i,k} sum_p |dy_{i,k} / dz_{i,n,p}|,
    z being the layer's output (before any activation). One backward (specific kind) or one
    per output (unspecific) gives every layer's dy/dz at once."""
    outputs = recorder.outputs()
    names = [n for n, m in layers.items() if m in outputs]
    if not names:
        return {}
    zs = [outputs[layers[n]] for n in names]
    denom = float(y.shape[0])
    rows, weight = output_rows(alpha, kind, 1.0)  # the same backward rows as the weight-level S
    out = [torch.zeros(z.shape[1], dtype=torch.float32, device=z.device) for z in zs]
    for start in range(0, len(rows), ROW_CHUNK):
        deltas = batched_grad(y, zs, row_grad_outputs(rows[start:start + ROW_CHUNK], alpha))
        for acc, d in zip(out, deltas):  # d: (R, B, units, *positions)
            acc += d.float().abs().transpose(0, 2).reshape(d.shape[2], -1).sum(1)
    if distributed:
        from ..distributed import all_reduce_sum_
        total = torch.tensor([denom], dtype=torch.float64)
        all_reduce_sum_([total] + out)
        denom = float(total)
    return {n: s.mul_(weight / denom) for n, s in zip(names, out)}


def unit_sensitivity(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                     *, kind: str = "specific") -> dict[str, torch.Tensor]:
    """Neuron-level sensitivity S_n of every Linear/Conv layer's output units, by layer name
    (see :func:`unit_sensitivity_from`). Samples must be independent (no BatchNorm in
    training mode)."""
    check_options(kind, "sample", "logits")
    if samples_coupled(model):
        raise ConfigError("unit_sensitivity needs independent samples: put BatchNorm layers "
                          "in eval mode (model.eval()) first")
    with torch.enable_grad():
        with LayerRecorder(model) as rec:
            y = model(inputs).float()
        alpha = alpha_matrix(y, targets, kind)
        return unit_sensitivity_from(y, alpha, rec, unit_layers(model), kind)
