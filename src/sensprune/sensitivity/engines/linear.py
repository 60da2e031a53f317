"""nn.Linear: the per-sample weight gradient is delta a^T, so sum_n |delta_n a_n^T| is one
matmul |Delta|^T |A| for a single position, and one bmm over a sequence."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import Engine, register


def record_io(recorder, module):
    """The forward hook of layers read through their input a and output z (Linear, Conv)."""
    def hook(mod, inputs, output):
        if torch.is_tensor(output) and output.requires_grad:
            recorder.calls.setdefault(mod, []).append((inputs[0].detach(), output,
                                                        output._version))
    return module.register_forward_hook(hook)


class InputOutput(Engine):
    """Layers recorded as (a, z): usable when called once and z was not changed in place."""

    def hook(self, recorder, module):
        return record_io(recorder, module)

    def usable(self, records):
        if len(records) == 1 and records[0][1]._version == records[0][2]:
            return records[0]
        return None

    def probes(self, record):
        return [record[1]]


@register(nn.Linear)
class LinearEngine(InputOutput):
    def accumulate(self, module, record, deltas, weight):
        a, delta = record[0].float(), deltas[0].float()  # S in float32 under autocast
        k, b = delta.shape[:2]
        a = a.reshape(b, -1, a.shape[-1])
        d = delta.reshape(k, b, -1, delta.shape[-1])
        if a.shape[1] == 1:
            # rank-one per-sample gradient: sum_n |d_n a_n^T| = (sum_k |d|)^T |a|
            dsum = d[:, :, 0].abs().sum(0).mul_(weight)  # scale the small operand
            s_w, s_b = dsum.t().mm(a[:, 0].abs()), dsum.sum(0)
        else:
            s_w, s_b = sequence_linear(a, d, weight)
        return [(module.weight, s_w), (module.bias, s_b)]


def sequence_linear(a: torch.Tensor, d: torch.Tensor, weight: float):
    """S of a weight W (out, in) used at every step t of a sequence, z_t = W a_t (+ b): the
    per-sample gradient is sum_t d_t a_t^T, one bmm over all K rows. a: (B, T, in), d: (K, B,
    T, out). Returns S of W and of the bias."""
    k, b, _, out = d.shape
    dk = d.permute(1, 0, 3, 2).reshape(b, k * out, -1)  # (B, K*out, T)
    s_w = torch.bmm(dk, a).abs_().sum(0).reshape(k, out, -1).sum(0)
    s_b = d.sum(2).abs_().sum((0, 1))
    return s_w.mul_(weight), s_b.mul_(weight)
