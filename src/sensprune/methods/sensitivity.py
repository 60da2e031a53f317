"""The paper's method as a training method: ``regularizer.SensitivityRegularizer`` (the
drop-in for any loop) built from the run's settings, thresholded at epoch ends."""

from __future__ import annotations

from ..regularizer import SensitivityRegularizer
from .base import Method, MethodContext


class Sensitivity(SensitivityRegularizer, Method):
    name = "sensitivity"
    uses_threshold = True
    uses_lam = True

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "Sensitivity":
        return cls(
            ctx.model, cfg.lam, kind=cfg.kind, reduction=cfg.reduction, outputs=cfg.outputs,
            params=cfg.regularize, every=cfg.sens_every, optimizer=ctx.optimizer,
            lr_scaled=cfg.lam_lr_scaled, output_samples=cfg.output_samples or None,
            seed=cfg.seed, normalize=cfg.normalize, beta=cfg.beta, quantile=cfg.quantile,
            source=cfg.sens_source, times_weight=cfg.times_weight, batchnorm=cfg.batchnorm)
