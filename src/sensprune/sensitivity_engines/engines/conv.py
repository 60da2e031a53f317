"""nn.Conv1d / nn.Conv2d (groups 1, zero padding): per-sample weight gradients as unfold +
bmm (the im2col form) or as one grouped weight-gradient convolution, |.| and summed chunk by
chunk; a fixed rule picks the faster for the number of output rows."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from .linear import InputOutput, batch_first

# Per-sample conv gradients are summed chunk by chunk; small chunks stay in cache.
_CONV_CHUNK_FLOATS = 1 << 20


def _conv_unfold(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    """Per-sample conv gradients as unfold + bmm (the im2col form, as per-sample-gradient
    libraries compute them), |.| and summed chunk by chunk."""
    k, b = delta.shape[:2]
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(2)
        ks, st, pd, dl = ((1, mod.kernel_size[0]), (1, mod.stride[0]),
                          (0, mod.padding[0]), (1, mod.dilation[0]))
    else:
        ks, st, pd, dl = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    cols_t = F.unfold(a, ks, dilation=dl, padding=pd, stride=st).transpose(1, 2)  # (B, P, Cin*kk)
    o = mod.out_channels
    d = delta.reshape(k, b, o, -1)  # (K, B, O, P)
    # Per-sample gradient of each row is d (O, P) @ cols (P, Cin*kk): one bmm per chunk of
    # samples with all K rows stacked, abs, then summed (bounded memory).
    s_w = torch.zeros(o, cols_t.shape[2], dtype=a.dtype, device=a.device)
    chunk = max(1, _CONV_CHUNK_FLOATS // max(1, k * o * cols_t.shape[2]))
    for start in range(0, b, chunk):
        dk = d[:, start:start + chunk].transpose(0, 1).reshape(-1, k * o, d.shape[-1])
        g = torch.bmm(dk, cols_t[start:start + chunk]).abs_()
        s_w += g.reshape(-1, k, o, cols_t.shape[2]).sum((0, 1))
    s_b = d.sum(-1).abs_().sum((0, 1))
    return s_w.reshape(mod.weight.shape).mul_(weight), s_b.mul_(weight)


def _conv_grouped(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    """Per-sample conv gradients as one grouped weight-gradient convolution: the samples of a
    chunk become groups (input (1, n*Cin, ...), grad_output (1, n*K*O, ...), groups=n), so
    the conv backward kernel itself computes every per-sample gradient."""
    k, b = delta.shape[:2]
    o, wshape = mod.out_channels, mod.weight.shape
    weight_grad = (torch.nn.grad.conv1d_weight if isinstance(mod, nn.Conv1d)
                   else torch.nn.grad.conv2d_weight)
    s_w = torch.zeros(wshape, dtype=a.dtype, device=a.device)
    chunk = max(1, 4 * _CONV_CHUNK_FLOATS // max(1, k * wshape.numel()))
    for start in range(0, b, chunk):
        x, d = a[start:start + chunk], delta[:, start:start + chunk]
        n = x.shape[0]
        g = weight_grad(x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * k * o, *wshape[1:]),
                        d.transpose(0, 1).reshape(1, n * k * o, *d.shape[3:]),
                        stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=n)
        s_w += g.abs_().reshape(n * k, *wshape).sum(0)
    s_b = delta.flatten(3).sum(-1).abs_().sum((0, 1))
    return s_w.mul_(weight), s_b.mul_(weight)


# Which of the two exact engines is faster (benchmarks/conv_engines.py, this 2-core CPU, one
# thread, results/conv_engines.json): with one output row (the specific kind) the grouped
# convolution, on every ResNet-32 and LeNet-5 layer shape (1.5-6x); with ten rows (the
# unspecific kind) mostly unfold. A fixed rule rather than a timing at run time: the choice,
# and so every bit of S, is the same in every process (resumed runs, DDP ranks).
def _conv_engine(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    return _conv_grouped if delta.shape[0] == 1 else _conv_unfold



@register(nn.Conv1d, nn.Conv2d)
class ConvEngine(InputOutput):
    def supports(self, module):
        return (module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))

    def accumulate(self, module, record, deltas, weight):
        a, delta = batch_first(record, deltas)
        a, delta = a.float(), delta.float()  # S in float32 under autocast
        s_w, s_b = _conv_engine(module, a, delta, weight)(module, a, delta, weight)
        return [(module.weight, s_w), (module.bias, s_b)]
