"""nn.Embedding: the per-sample gradient of the table holds, in row v, the sum of the output
derivatives at the positions whose index is v; S sums |.| of those rows over samples, found by
grouping (sample, index) pairs, so the cost is that of the lookups, not of the table."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register
from .linear import InputOutput, batch_first


@register(nn.Embedding)
class EmbeddingEngine(InputOutput):
    def supports(self, module):
        # max_norm renormalizes rows in place; scale_grad_by_freq rescales by batch counts
        return module.max_norm is None and not module.scale_grad_by_freq

    def accumulate(self, module, record, deltas, weight):
        idx, delta = batch_first(record, deltas)
        k, b = delta.shape[:2]
        v, dim = module.weight.shape
        d = delta.float().reshape(k, -1, dim)  # (K, B*T, D)
        keys = (torch.arange(b, device=idx.device).unsqueeze(1) * v
                + idx.reshape(b, -1)).flatten()  # one key per (sample, row)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = d.new_zeros(k, uniq.numel(), dim).index_add_(1, inverse, d)
        s_w = d.new_zeros(v, dim).index_add_(0, uniq % v, sums.abs_().sum(0))
        if module.padding_idx is not None:  # its row gets no gradient
            s_w[module.padding_idx] = 0
        return [(module.weight, s_w.mul_(weight))]

    def per_sample(self, module, record, deltas, samples):
        idx, delta = batch_first(record, deltas)
        idx, d = idx[samples], delta[:, samples].float()
        k, n = d.shape[:2]
        v, dim = module.weight.shape
        rows = idx.reshape(1, n, -1)
        if module.padding_idx is not None:  # its row gets no gradient: no key for it
            keep = rows != module.padding_idx
        kn = torch.arange(k * n, device=idx.device).reshape(k, n, 1)
        keys = (kn * v + rows).flatten()
        values = d.reshape(-1, dim)
        if module.padding_idx is not None:
            keep = keep.expand(k, n, -1).flatten()
            keys, values = keys[keep], values[keep]
        return [(module.weight, keys, values)]
