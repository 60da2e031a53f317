"""L1 regularization followed by thresholding, as the proximal step of lam * |w| after the
optimizer:
    w <- sign(w) * max(|w| - lam, 0)"""

from __future__ import annotations

import torch

from .l2 import L2Decay


class L1Decay(L2Decay):  # the same construction, another step
    name = "l1"

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params.values():
            p.copy_(p.sign() * (p.abs() - self.lam).clamp_(min=0.0))
