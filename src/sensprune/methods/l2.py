"""L2 decay followed by thresholding, applied as a decoupled step after the optimizer (like
the sensitivity rule, so that a comparison changes only the decay):
    w <- w - lam * w          (the sensitivity rule with S = 0)"""

from __future__ import annotations

import torch

from ..models import select_params
from .base import Method, MethodContext


class L2Decay(Method):
    name = "l2"
    uses_threshold = True
    uses_lam = True

    def __init__(self, model, lam: float, regularize="weights"):
        self.lam = float(lam)
        self.params = select_params(model, regularize)

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "L2Decay":
        return cls(ctx.model, cfg.lam, regularize=cfg.regularize)

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params.values():
            p.mul_(1.0 - self.lam)
