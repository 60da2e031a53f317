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
                        distributed: bool = False, kind: str = "specific") -> list[torch.Tensor]:
    """Exact S for any parameter through per-row backward passes (rows chunked).

    ``denom`` is the global batch size. With ``distributed``, the batch reduction sums each
    chunk of per-class gradients over ranks before taking |.| (the sample reduction is summed
    over ranks by the caller)."""
    out = [torch.zeros_like(p) for p in params]
    if not params:
        return out
    c = y.shape[-1]
    flat = alpha.reshape(alpha.shape[0], -1, c)  # (B, positions, C)
    # Each row is (sample or None for all, class or None for alpha's own, weight); its
    # grad_output is built only when its chunk runs (a sequence's rows are large).
    if reduction == "batch":
        # Row k: d/dw (1/B) sum_n sum_t alpha_{n,t,k} y_{n,t,k}; S = sum_k |row_k|. Every rank
        # must run the same rows, so in DDP all classes are rows, present locally or not.
        present = (flat != 0).any(1).any(0)
        specs = [(None, k, 1.0) for k in range(c) if distributed or bool(present[k])]
    elif kind == "specific":
        # Row n: d(sum_t y_{n,t,target})/dw over the kept positions, weight 1/B
        specs = [(n, None, 1.0 / denom) for n in range(flat.shape[0]) if bool(flat[n].any())]
    else:
        # Row (n, k): d(sum_t y_{n,t,k})/dw over the kept positions, weight alpha / B
        specs = [(n, k, float(flat[n, :, k].max()) / denom)
                 for n, k in torch.nonzero((flat != 0).any(1)).tolist()]

    def grad_output(n, k):
        g = torch.zeros_like(y)
        if n is None:  # the batch reduction's row k
            g[..., k] = alpha[..., k] / denom
        elif k is None:
            g[n] = alpha[n]
        else:
            g[n, ..., k] = (alpha[n, ..., k] != 0).to(y.dtype)
        return g

    numel = sum(p.numel() for p in params)
    chunk = max(1, min(max(len(specs), 1), _GENERIC_BUDGET // max(numel, 1),
                       _GENERIC_BUDGET // max(y.numel(), 1)))
    for start in range(0, len(specs), chunk):
        part = specs[start:start + chunk]
        go = torch.stack([grad_output(n, k) for n, k, _ in part])
        w = torch.tensor([wt for _, _, wt in part], dtype=y.dtype, device=y.device)
        grads = batched_grad(y, params, go)
        if distributed and reduction == "batch":
            from ..distributed import all_reduce_sum_
            all_reduce_sum_(grads)
        for acc, g in zip(out, grads):
            acc += torch.tensordot(w.to(g.dtype), g.abs(), dims=1)
    return out
