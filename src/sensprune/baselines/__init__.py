"""The methods sensprune is compared against, sharing the regularizer's small interface.

Every method (the sensitivity regularizer included) offers:
    observe(targets)  context manager around the training forward (default: nothing)
    penalty()         a term added to the loss (default: 0)
    step()            after each optimizer step (decay, proximal step, scheduled pruning)
    end_phase()       at the end of the sparsification phase (Sparse VD's log-alpha pruning)
    state_dict() / load_state_dict()
Thresholds at epoch ends are applied by the training loop (``threshold = "auto" | T``) for
the methods with ``uses_threshold = True``.
"""

from __future__ import annotations

import contextlib

import torch


class Method:
    name = "none"
    uses_threshold = False

    def observe(self, targets=None):
        return contextlib.nullcontext()

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def step(self) -> None:
        pass

    def end_phase(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_method(cfg, model, optimizer, pruner, steps_per_epoch: int, n_train: int) -> Method:
    """The method named by ``cfg.method``, built for ``model``."""
    from ..regularizer import SensitivityRegularizer
    from .decay import L1Decay, L2Decay
    from .magnitude import GradualMagnitude, MagnitudeRetrain
    from .sparse_vd import SparseVD

    m = cfg.method
    if m == "sensitivity":
        return SensitivityRegularizer(
            model, cfg.lam, kind=cfg.kind, reduction=cfg.reduction, outputs=cfg.outputs,
            params=cfg.regularize, every=cfg.sens_every, optimizer=optimizer,
            lr_scaled=cfg.lam_lr_scaled, output_samples=cfg.output_samples or None,
            seed=cfg.seed, normalize=cfg.normalize, beta=cfg.beta, quantile=cfg.quantile,
            source=cfg.sens_source, times_weight=cfg.times_weight, batchnorm=cfg.batchnorm)
    if m == "l2":
        return L2Decay(model, cfg.lam, params=cfg.regularize)
    if m == "l1":
        return L1Decay(model, cfg.lam, params=cfg.regularize)
    if m == "magnitude":
        return MagnitudeRetrain()
    if m == "gmp":
        sparsify_steps = (cfg.epochs - cfg.warmup_epochs - cfg.finetune_epochs) * steps_per_epoch
        return GradualMagnitude(pruner, cfg.target_sparsity, sparsify_steps,
                                every=cfg.gmp_every)
    if m == "sparse_vd":
        return SparseVD(model, n_train, kl_warmup_steps=cfg.vd_kl_warmup_epochs * steps_per_epoch,
                        pruner=pruner)
    return Method()
