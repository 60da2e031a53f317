"""The exact generic path: S of any parameter through batched backward passes, one per
(sample, output) row (reduction "sample") or per output (reduction "batch"), chunked to
bound memory. Used for every parameter no engine covers and whenever samples are coupled."""

from __future__ import annotations

import torch

# Upper bound on floats materialized at once by the generic engine (rows x parameters).
_GENERIC_BUDGET = 1 << 25
# Up to this many backward rows, a loop of plain backward passes beats the vmapped one (measured
# on LeNet-300 and LeNet-5: max-pool and conv backward have no fast batching rule).
_LOOP_ROWS = 32


def batched_grad(y, inputs, grad_outputs):
    """Vector-Jacobian products for a stack of grad_outputs (R, *y.shape), one per row.

    A loop of plain backward passes for a few rows; autograd's vmapped backward for many
    (with the loop as fallback where an op has no batching rule).
    Unused inputs get zeros.
    """
    grads = None
    if grad_outputs.shape[0] > _LOOP_ROWS:
        try:
            grads = torch.autograd.grad(y, inputs, grad_outputs, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            grads = None
    if grads is None:
        rows = [torch.autograd.grad(y, inputs, g, retain_graph=True, allow_unused=True)
                for g in grad_outputs]
        # one row (the specific kind): a view, not a copy of every layer's output gradient
        stack = (lambda ts: ts[0].unsqueeze(0)) if len(rows) == 1 else torch.stack
        grads = tuple(None if rows[0][i] is None else stack([r[i] for r in rows])
                      for i in range(len(inputs)))
    r = grad_outputs.shape[0]
    return [torch.zeros((r,) + t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, inputs)]


def generic_sensitivity(y, alpha, params: list[torch.Tensor], reduction: str, denom: float,
             distributed: bool = False) -> list[torch.Tensor]:
    """Exact S for any parameter through per-row backward passes (rows chunked).

    ``denom`` is the global batch size. With ``distributed``, the batch reduction sums each
    chunk of per-class gradients over ranks before taking |.| (the sample reduction is summed
    over ranks by the caller)."""
    b, c = y.shape
    out = [torch.zeros_like(p) for p in params]
    if not params:
        return out
    if reduction == "batch":
        # Row k: d/dw (1/B) sum_n alpha_{n,k} y_{n,k}; S = sum_k |row_k|. Every rank must run
        # the same rows, so in DDP all classes are rows, present locally or not.
        ks = [k for k in range(c) if distributed or bool(alpha[:, k].any())]
        rows = []
        for k in ks:
            g = torch.zeros_like(y)
            g[:, k] = alpha[:, k] / denom
            rows.append(g)
        weights = [1.0] * len(rows)
    else:
        # Row (n, k): dy_{n,k}/dw with weight alpha_{n,k} / B.
        nz = alpha.nonzero(as_tuple=False)
        rows, weights = [], []
        for n, k in nz.tolist():
            g = torch.zeros_like(y)
            g[n, k] = 1.0
            rows.append(g)
            weights.append(float(alpha[n, k]) / denom)
    numel = sum(p.numel() for p in params)
    chunk = max(1, min(max(len(rows), 1), _GENERIC_BUDGET // max(numel, 1)))
    for start in range(0, len(rows), chunk):
        go = torch.stack(rows[start:start + chunk])
        w = torch.tensor(weights[start:start + chunk], dtype=y.dtype, device=y.device)
        grads = batched_grad(y, params, go)
        if distributed and reduction == "batch":
            from ..distributed import all_reduce_sum_
            all_reduce_sum_(grads)
        for acc, g in zip(out, grads):
            acc += torch.tensordot(w, g.abs(), dims=1)
    return out

