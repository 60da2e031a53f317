"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity
rises from 0 to the target s_f along s_t = s_f (1 - (1 - t/n)^3) over the sparsification
phase, pruning the smallest-magnitude weights every ``every`` steps: one global ranking
(``threshold_mode = "global"``), or the same fraction of every layer (``"layer"``)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..pruning import cubic_sparsity
from .base import Method, MethodContext


class GradualMagnitude(Method):
    name = "gmp"
    reads = ("gmp_every",)
    quick_settings = {"gmp_every": 5}

    def __init__(self, pruner, target_sparsity: float, total_steps: int, gmp_every: int = 100,
                 threshold_mode: str = "global"):
        if not 0.0 < target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
        self.pruner = pruner
        self.target = float(target_sparsity)
        self.total = max(1, int(total_steps))
        self.every = max(1, int(gmp_every))
        self.t = 0
        self.mode = threshold_mode

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "GradualMagnitude":
        return cls(ctx.pruner, cfg.target_sparsity, cfg.sparsify_epochs * ctx.steps_per_epoch,
                   gmp_every=cfg.gmp_every, threshold_mode=cfg.threshold_mode)

    def sparsity_at(self, t: int) -> float:
        return cubic_sparsity(self.target, t / self.total)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        if self.t % self.every and self.t < self.total:
            return
        self.pruner.prune_to(self.sparsity_at(self.t), self.mode)

    def end_phase(self) -> None:
        self.pruner.prune_to(self.target, self.mode)

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
