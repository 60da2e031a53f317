"""L2 and L1 regularization followed by thresholding: the two classic baselines.

Both are applied as decoupled steps after the optimizer (like the sensitivity regularizer),
so the comparison changes only the decay rule:
    L2: w <- w - lam * w                       (the sensitivity rule with S = 0)
    L1: w <- sign(w) * max(|w| - lam, 0)       (proximal step of lam * |w|)
"""

from __future__ import annotations

import torch

from . import Method


class _Decay(Method):
    uses_threshold = True

    def __init__(self, model, lam: float, params="weights"):
        from ..regularizer import select_params
        self.lam = float(lam)
        self.params = select_params(model, params)


class L2Decay(_Decay):
    name = "l2"

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params.values():
            p.mul_(1.0 - self.lam)


class L1Decay(_Decay):
    name = "l1"

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params.values():
            p.copy_(p.sign() * (p.abs() - self.lam).clamp_(min=0.0))
