"""nn.Linear: the per-sample weight gradient is delta a^T, so sum_n |delta_n a_n^T| is one
matmul |Delta|^T |A| for a single position, and one bmm over a sequence."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import Engine, register


def record_io(recorder, module):
    """The forward hook of layers read through their input a and output z (Linear, Conv):
    records (a, z, z's version, the batch dimension: 1 for a time-major layer)."""
    batch_dim = recorder.batch_dims.get(module, 0)

    def hook(mod, inputs, output):
        if torch.is_tensor(output) and output.requires_grad and output.dim() > batch_dim:
            recorder.calls.setdefault(mod, []).append((inputs[0].detach(), output,
                                                        output._version, batch_dim))
    return module.register_forward_hook(hook)


def batch_first(record, deltas: list):
    """(a, delta) with the samples first: a (B, ...), delta (K, B, ...)."""
    a, delta = record[0], deltas[0]
    if record[3] == 1:
        return a.transpose(0, 1), delta.transpose(1, 2)
    return a, delta


class InputOutput(Engine):
    """Layers recorded as (a, z): usable when z was not changed in place after any call."""

    def hook(self, recorder, module):
        return record_io(recorder, module)

    def usable(self, records):
        if records and all(r[1]._version == r[2] for r in records):
            return records
        return None

    def batch_size(self, record):
        return record[1].shape[record[3]]

    def probes(self, record):
        return [record[1]]


# Output derivatives at most this dense (an LM head's, where the specific kind selects one
# class per position) take the sparse path: only the (sample, output) rows they reach.
SPARSE_DENSITY = 1 / 16


def sparse_rows(d: torch.Tensor):
    """(rows, values) of a mostly-zero delta (K, B, T, out), or None where it is dense:
    rows (R, 4) of (k, n, t, o) indices and their values (R,)."""
    if d.numel() < 4096:
        return None
    nnz = int(torch.count_nonzero(d))
    if nnz > SPARSE_DENSITY * d.numel():
        return None
    idx = d.nonzero()
    return idx, d[tuple(idx.t())]


def compact_positions(a: torch.Tensor, d: torch.Tensor):
    """Drop the positions no output depends on (a classifier reading one token: BERT's last
    layer sees a derivative at [CLS] only): a (B, T, in), d (K, B, T, out) become
    (B, T', ...), T' the most positions any sample keeps, padded with zero derivatives.
    Returns them unchanged when over half the positions are kept."""
    live = (d != 0).any(-1).any(0)  # (B, T)
    t_kept = int(live.sum(1).max()) if live.numel() else 0
    if 2 * t_kept > a.shape[1]:
        return a, d
    order = live.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :max(t_kept, 1)]
    a = a.gather(1, order.unsqueeze(-1).expand(-1, -1, a.shape[-1]))
    d = d.gather(2, order.unsqueeze(0).unsqueeze(-1).expand(d.shape[0], -1, -1, d.shape[-1]))
    return a, d


@register(nn.Linear)
class LinearEngine(InputOutput):
    def accumulate(self, module, record, deltas, weight):
        a, delta = batch_first(record, deltas)
        a, delta = a.float(), delta.float()  # S in float32 under autocast
        k, b = delta.shape[:2]
        a = a.reshape(b, -1, a.shape[-1])
        d = delta.reshape(k, b, -1, delta.shape[-1])
        if a.shape[1] > 1:
            a, d = compact_positions(a, d)
        sparse = sparse_rows(d) if a.shape[1] > 1 else None
        if sparse is not None:
            keys, g_w, g_b = _sparse_per_sample(a, d, sparse)
            out = d.shape[-1]
            s_w = g_w.new_zeros(out, a.shape[-1]).index_add_(0, keys % out, g_w.abs_())
            s_b = g_b.new_zeros(out).index_add_(0, keys % out, g_b.abs_())
            return [(module.weight, s_w.mul_(weight)), (module.bias, s_b.mul_(weight))]
        if a.shape[1] == 1:
            # rank-one per-sample gradient: sum_n |d_n a_n^T| = (sum_k |d|)^T |a|
            dsum = (d[0, :, 0].abs() if k == 1 else d[:, :, 0].abs().sum(0)).mul_(weight)
            s_w, s_b = dsum.t().mm(a[:, 0].abs()), dsum.sum(0)
        else:
            s_w, s_b = sequence_linear(a, d, weight)
        return [(module.weight, s_w), (module.bias, s_b)]

    def per_sample(self, module, record, deltas, samples):
        return linear_rows(*batch_first(record, deltas), samples, module.weight, module.bias)


def _sparse_per_sample(a: torch.Tensor, d: torch.Tensor, sparse):
    """The nonzero rows of the per-sample gradients: keys (k * B + n) * out + o, their weight
    rows sum_t d[k, n, t, o] a[n, t] and bias entries sum_t d[k, n, t, o]."""
    (idx, vals), (_, b, _, out) = sparse, d.shape
    kk, n, t, o = idx.unbind(1)
    uniq, inverse = torch.unique((kk * b + n) * out + o, return_inverse=True)
    g_w = a.new_zeros(uniq.numel(), a.shape[-1]).index_add_(0, inverse, vals[:, None] * a[n, t])
    g_b = a.new_zeros(uniq.numel()).index_add_(0, inverse, vals)
    return uniq, g_w, g_b


def linear_rows(a: torch.Tensor, delta: torch.Tensor, samples: slice, w, bias):
    """Signed per-sample gradients of z = W a (+ b) over any positions, for the samples in
    ``samples``, as rows: [(W, keys, rows), (b, keys, rows)], a key (k * n + i) * out + o
    naming row o of sample i's gradient for output row k (see ``Engine.per_sample``).
    a: (B, ..., in), delta: (K, B, ..., out)."""
    a = a[samples].float()
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])
    d = delta[:, samples].float()
    d = d.reshape(d.shape[0], n, -1, d.shape[-1])
    sparse = sparse_rows(d)
    if sparse is not None:
        keys, g_w, g_b = _sparse_per_sample(a, d, sparse)
        return [(w, keys, g_w), (bias, keys, g_b[:, None])]
    g_w = torch.einsum("knto,nti->knoi", d, a)
    keys = torch.arange(g_w.shape[0] * n * g_w.shape[2], device=a.device)
    return [(w, keys, g_w.reshape(-1, g_w.shape[-1])), (bias, keys, d.sum(2).reshape(-1, 1))]


def sequence_linear(a: torch.Tensor, d: torch.Tensor, weight: float):
    """S of a weight W (out, in) used at every step t of a sequence, z_t = W a_t (+ b): the
    per-sample gradient is sum_t d_t a_t^T, one bmm over all K rows. a: (B, T, in), d: (K, B,
    T, out). Returns S of W and of the bias."""
    k, b, _, out = d.shape
    dk = d.permute(1, 0, 3, 2).reshape(b, k * out, -1)  # (B, K*out, T)
    s_w = torch.bmm(dk, a).abs_().sum(0).reshape(k, out, -1).sum(0)
    s_b = d.sum(2).abs_().sum((0, 1))
    return s_w.mul_(weight), s_b.mul_(weight)
