"""transformers' Conv1D (GPT-2's attention and MLP projections): z = a W + b with W stored
(in, out), a Linear with its weight transposed; S is the Linear's, transposed."""

from __future__ import annotations

from ...models import is_hf_conv1d
from . import register_matching
import torch

from .linear import LinearEngine, batch_first, sequence_linear


@register_matching(is_hf_conv1d)
class HFConv1DEngine(LinearEngine):
    def accumulate(self, module, record, deltas, weight):
        a, delta = batch_first(record, deltas)
        a, delta = a.float(), delta.float()
        k, b = delta.shape[:2]
        s_w, s_b = sequence_linear(a.reshape(b, -1, a.shape[-1]),
                                   delta.reshape(k, b, -1, delta.shape[-1]), weight)
        return [(module.weight, s_w.t()), (module.bias, s_b)]

    def per_sample(self, module, record, deltas, samples):
        a, delta = batch_first(record, deltas)
        a = a[samples].float()
        n = a.shape[0]
        a = a.reshape(n, -1, a.shape[-1])
        d = delta[:, samples].float()
        d = d.reshape(d.shape[0], n, -1, d.shape[-1])
        g_w = torch.einsum("knto,nti->knio", d, a)  # W is stored (in, out): rows are inputs
        keys_w = torch.arange(g_w.shape[0] * n * g_w.shape[2], device=a.device)
        keys_b = torch.arange(d.shape[0] * n * d.shape[-1], device=a.device)
        return [(module.weight, keys_w, g_w.reshape(-1, g_w.shape[-1])),
                (module.bias, keys_b, d.sum(2).reshape(-1, 1))]
