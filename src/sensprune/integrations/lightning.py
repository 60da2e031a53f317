"""``SensitivityPruning``: the sensitivity rule, masks kept outside the model and the cubic
schedule, as a ``lightning.pytorch.Callback``::

    trainer = lightning.Trainer(max_epochs=20, callbacks=[SensitivityPruning(lam=1e-3, target=0.9)])

S comes from the training forward of the regularized module (the LightningModule, or its
submodule named by ``module=``) with the targets of the batch (``batch[1]``, or ``targets=``);
the decay and the masks act after every optimizer step (once per step under gradient
accumulation), and the pruned fraction follows the cubic schedule to ``target``. The masks
are saved in Lightning's checkpoint with the callback's state (the model keeps its plain
parameter names) and a ``ckpt_path=`` resume continues the schedule where it stopped. Under
``strategy="ddp"`` S is reduced over the ranks, so every rank holds the same S and masks;
sharded strategies (FSDP, DeepSpeed) are refused at setup.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sensprune.integrations.lightning needs Lightning: "
                      "pip install 'sensprune[lightning]'") from e

from ..errors import ConfigError
from .core import CallbackBase, Schedule, SparseTraining, default_targets


class SensitivityPruning(CallbackBase, Callback):
    """Prune a LightningModule's weights to ``target`` with the sensitivity rule.

    Args:
        lam: the regularization factor lambda (``method="sensitivity"`` or ``"l2"``).
        target: the fraction of the weights removed at the end of the schedule.
        start, end: the schedule's window in ``unit``s (default: from the first to the last
            epoch, ``trainer.max_epochs``; in steps, ``trainer.max_steps`` or the estimated
            number of optimizer steps). The regularizer acts inside the window; the masks
            hold for the rest of the fit (fine-tuning).
        unit: ``"epoch"`` (prune at epoch ends) or ``"step"`` (after optimizer steps).
        every: prune every N units (and at the window's end).
        method: ``"sensitivity"`` (the paper's rule), ``"l2"`` (w <- w - lam w, the baseline)
            or ``"gmp"`` (no regularizer: gradual magnitude pruning on the same schedule).
        module: the attribute name of the submodule to regularize and prune (its forward
            must return the logits); default: the LightningModule itself.
        targets: ``targets(batch)`` returns the class indices (default: ``batch[1]`` or
            ``batch["labels"]``).
        regularize, decay_floor, kind, sens_every, output, **regularizer_options: as for
            :class:`sensprune.SensitivityRegularizer` (which parameters: every Linear, Conv,
            recurrent and attention-projection weight by default).
    """

    def __init__(self, lam: float, target: float, *, start: int = 0, end: int | None = None,
                 unit: str = "epoch", every: int = 1, method: str = "sensitivity",
                 module: str | None = None, targets: Callable[[Any], torch.Tensor] | None = None,
                 regularize: str | list[str] = "weights", decay_floor: float = 0.0,
                 kind: str = "specific", sens_every: int = 1, output: Callable | None = None,
                 **regularizer_options):
        if unit not in ("epoch", "step"):
            raise ConfigError(f"unit must be 'epoch' or 'step', got {unit!r}")
        self.core = SparseTraining(lam, target, method=method, regularize=regularize,
                                   decay_floor=decay_floor, kind=kind, sens_every=sens_every,
                                   output=output, **regularizer_options)
        self.start, self.end, self.unit, self.every = start, end, unit, every
        self.module_name = module
        self.targets_of = targets or default_targets
        self.schedule: Schedule | None = None
        self._steps_at_batch_start = 0

    # -- fit -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise ConfigError(f"SensitivityPruning does not support {name}: the masks and S "
                              "need whole parameters on every rank; use strategy='ddp'")

    def on_train_start(self, trainer, pl_module) -> None:
        module = pl_module if self.module_name is None else getattr(pl_module, self.module_name)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.core.attach(module, optimizer)
        end = self.end if self.end is not None else self._default_end(trainer)
        self.schedule = Schedule(self.core.target, self.start, end, self.every)

    def _default_end(self, trainer) -> int:
        if self.unit == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ConfigError("unit='epoch' needs Trainer(max_epochs=...) or end=")
            return trainer.max_epochs
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 \
            else trainer.estimated_stepping_batches
        return int(steps)

    def on_train_end(self, trainer, pl_module) -> None:
        self.core.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.core.detach()

    # -- steps ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._steps_at_batch_start = trainer.global_step
        done = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        self.core.active = self.schedule.active(done)
        self.core.targets = self.targets_of(batch) if self.core.active else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._steps_at_batch_start:
            return  # a micro-batch of an accumulation: no optimizer step yet
        self.core.after_optimizer_step()
        if self.unit == "step":
            self._maybe_prune(trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.unit == "epoch":
            self._maybe_prune(trainer.current_epoch + 1)

    # -- Lightning's checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.core.load_state_dict(state_dict)
