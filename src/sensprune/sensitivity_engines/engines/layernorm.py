"""nn.LayerNorm (when regularized: ``regularize="all"``): z = x_hat * gamma + beta, so the
per-sample gradients are sum_t delta_t * x_hat_t and sum_t delta_t, x_hat recomputed from the
recorded input."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import register
from .linear import InputOutput, batch_first


@register(nn.LayerNorm)
class LayerNormEngine(InputOutput):
    def supports(self, module):
        return module.elementwise_affine

    def accumulate(self, module, record, deltas, weight):
        a, delta = batch_first(record, deltas)
        shape = module.normalized_shape
        x_hat = F.layer_norm(a.float(), shape, eps=module.eps)
        k, b = delta.shape[:2]
        d = delta.float().reshape(k, b, -1, *shape)
        x_hat = x_hat.reshape(b, -1, *shape)
        s_w = (d * x_hat).sum(2).abs_().sum((0, 1))
        s_b = d.sum(2).abs_().sum((0, 1))
        return [(module.weight, s_w.mul_(weight)), (module.bias, s_b.mul_(weight))]
