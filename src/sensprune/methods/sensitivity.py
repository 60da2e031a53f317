"""The paper's method as a training method: ``regularizer.SensitivityRegularizer`` (the
drop-in for any loop) built from the run's settings, thresholded at epoch ends."""

from __future__ import annotations

import torch

from ..regularizer import SensitivityRegularizer
from .base import Method, MethodContext


# the sensitivity's own settings (the library's argument names), then the common ones it reads
OWN = ("kind", "reduction", "outputs", "sens_every", "lam_lr_scaled", "normalize", "beta",
       "quantile", "sens_source", "times_weight", "batchnorm", "decay_floor")
SETTINGS = OWN + ("regularize", "seed")
# what `sensprune inspect` can override: the settings that shape S and d on a trained model
INSPECT = ("kind", "outputs", "reduction", "normalize", "beta", "quantile", "times_weight",
           "sens_source", "decay_floor")


class Sensitivity(SensitivityRegularizer, Method):
    name = "sensitivity"
    uses_threshold = True
    uses_lam = True
    reads = OWN + ("output_samples",)

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "Sensitivity":
        # the library's arguments are the settings' own names
        return cls(ctx.model, cfg.lam, optimizer=ctx.optimizer,
                   output_samples=cfg.output_samples or None,
                   **{k: getattr(cfg, k) for k in SETTINGS})

    @torch.no_grad()
    def epoch_stats(self) -> dict:
        """How far the decay is from uniform weight decay, per layer, over the weights still in
        the network, from the insensitivity d of the epoch's last sensitivity step (one batch):
        mean d, its coefficient of variation (0 for weight decay) and the share at the least
        decay (d = 0, or d = decay_floor)."""
        out = {}
        for name, d in self.insensitivity.items():
            kept = d[self.params[name].detach() != 0].float()
            if kept.numel() == 0:
                continue
            mean = kept.mean()
            out[name] = {"mean_decay": float(mean),
                         "cv_decay": float(kept.std(unbiased=False) / mean) if mean > 0 else 0.0,
                         "undecayed": float((kept <= self.decay_floor).float().mean())}
        return {"decay": out} if out else {}
