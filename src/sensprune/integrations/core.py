"""What both framework callbacks share: the schedule, and the regularizer and pruner driven
around a framework's training forward and optimizer step.

During fit, a forward pre-hook and a forward hook on the regularized module open and close
``observe()`` around each training forward (evaluation forwards are left alone), so S comes
from the training forward itself, whatever calls the module. With gradient accumulation each
micro-batch's S is kept and the optimizer step uses the mean (exactly S of the whole batch);
the decay and the masks act once per optimizer step. The hooks are removed when fit ends.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models import select_params
from ..pruning import Pruner, cubic_sparsity
from ..regularizer import SensitivityRegularizer

METHODS = ("sensitivity", "l2", "gmp")


class Schedule:
    """The cubic sparsity schedule over a window of units (epochs or optimizer steps):
    after ``u`` units, for start < u <= end, every ``every`` units and at the end, the pruned
    fraction is ``target * (1 - (1 - (u - start) / (end - start))^3)``. The regularizer acts
    while start <= (units done) < end."""

    def __init__(self, target: float, start: int, end: int, every: int = 1):
        if not 0.0 <= target < 1.0:
            raise ConfigError(f"target must be a fraction in [0, 1) of the weights to remove, "
                              f"got {target}")
        if not 0 <= start < end:
            raise ConfigError(f"the schedule needs 0 <= start < end, got start={start}, "
                              f"end={end}")
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        self.target, self.start, self.end, self.every = target, start, end, every

    def active(self, done: int) -> bool:
        return self.start <= done < self.end

    def sparsity_after(self, done: int) -> float | None:
        """The fraction to prune after ``done`` units, or None when no pruning is due."""
        if not self.start < done <= self.end:
            return None
        if (done - self.start) % self.every and done != self.end:
            return None
        return cubic_sparsity(self.target, (done - self.start) / (self.end - self.start))


def default_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: ``batch[1]`` of an (inputs, targets) pair, ``batch["labels"]``
    (or ``"label"``, ``"targets"``) of a dict."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[1]):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label", "targets"):
            if torch.is_tensor(batch.get(key)):
                return batch[key]
    raise ConfigError("cannot find the targets in the batch (an (inputs, targets) pair or a "
                      "dict with 'labels'); pass targets=lambda batch: <the class indices>")


class SparseTraining:
    """The regularizer, the pruner and the hooks of one fit (see the module docstring)."""

    def __init__(self, lam: float, target: float, *, method: str = "sensitivity",
                 regularize: str | list[str] = "weights", decay_floor: float = 0.0,
                 kind: str = "specific", sens_every: int = 1,
                 output: Callable | None = None, **regularizer_options):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")
        if not 0.0 <= target < 1.0:
            raise ConfigError(f"target must be a fraction in [0, 1) of the weights to remove, "
                              f"got {target}")
        self.lam, self.target, self.method = float(lam), float(target), method
        self.regularize = regularize
        self.options = dict(decay_floor=decay_floor, kind=kind, sens_every=sens_every,
                            output=output, **regularizer_options)
        self.model: nn.Module | None = None
        self.regularizer: SensitivityRegularizer | None = None
        self.pruner: Pruner | None = None
        self.active = False
        self.targets: torch.Tensor | None = None
        self._handles: list = []
        self._open = None  # the observe() context of the forward in flight
        self._closer = None
        self._loaded: dict | None = None

    # -- fit start and end ---------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Build the regularizer and the pruner on ``model`` and install the forward hooks."""
        self.model = model
        params = select_params(model, self.regularize)
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = Pruner(model, params, optimizer=optimizer)
        self.pruner.optimizer = optimizer
        if self.method == "sensitivity" and self.regularizer is None:
            self.regularizer = SensitivityRegularizer(model, self.lam, regularize=list(params),
                                                      **self.options)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self.pruner.apply()
        self._handles = [model.register_forward_pre_hook(self._before_forward)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._abandon()

    # -- around each training forward ----------------------------------------------------------
    def _before_forward(self, module, args):
        # an observe() still open belongs to an enclosing call of the same module (Lightning
        # under DDP calls the module with its forward redirected to training_step, which calls
        # it again for the logits) or to a forward that raised: drop it without computing S,
        # the innermost call is the one that returns the outputs
        self._abandon()
        if (self.regularizer is None or not self.active or not module.training
                or self.targets is None or not torch.is_grad_enabled()):
            return
        ctx = self.regularizer.observe(self.targets, accumulate=True)
        ctx.__enter__()
        self._open = ctx
        # closed by a hook registered after observe()'s own, so that one has seen the output
        self._closer = module.register_forward_hook(lambda *_: self._close())

    def _close(self):
        """End the observed forward: observe() computes S from it."""
        ctx = self._release()
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _abandon(self):
        """Drop an observed forward without computing S (its hooks are removed)."""
        ctx = self._release()
        if ctx is not None:
            ctx.gen.close()

    def _release(self):
        ctx, self._open = self._open, None
        closer, self._closer = self._closer, None
        if closer is not None:
            closer.remove()
        return ctx

    # -- after each optimizer step -------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self._abandon()  # a forward still open never finished
        if self.active:
            if self.regularizer is not None:
                if self.regularizer.ready:
                    self.regularizer.step()
            elif self.method == "l2" and self.lam:
                for p in self.pruner.params.values():
                    p.mul_(1.0 - self.lam)
        self.pruner.apply()

    def prune(self, sparsity: float) -> None:
        self.pruner.prune_to(sparsity)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"version": 1}
        if self.pruner is not None:
            state["masks"] = self.pruner.state_dict()["masks"]
        if self.regularizer is not None:
            state["regularizer_steps"] = self.regularizer.steps
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.pruner is None:  # the framework restores callbacks before fit starts
            self._loaded = dict(state)
        else:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        masks = state.get("masks", {})
        unknown = [n for n in masks if n not in self.pruner.masks]
        if unknown:
            raise ConfigError(f"the checkpoint's pruning masks name parameters this model does "
                              f"not prune: {unknown[:3]}; resume with the same model and "
                              "regularize=")
        self.pruner.load_state_dict({"masks": masks})
        if self.regularizer is not None:
            self.regularizer.steps = int(state.get("regularizer_steps", 0))

    def masks_from_zeros(self) -> None:
        """Resuming from a checkpoint that holds only weights: its zero weights are pruned."""
        for name, p in self.pruner.params.items():
            self.pruner.prune(name, p.detach() != 0)



class CallbackBase:
    """What both framework callbacks expose and decide the same way: the pruner and the
    regularizer of their ``core`` (a :class:`SparseTraining`), and the schedule's pruning."""
    core: SparseTraining
    schedule: Schedule | None

    @property
    def pruner(self) -> Pruner | None:
        return self.core.pruner

    @property
    def regularizer(self) -> SensitivityRegularizer | None:
        return self.core.regularizer

    def _maybe_prune(self, done: int) -> None:
        """Prune to the schedule's fraction after ``done`` units, if one is due."""
        sparsity = self.schedule.sparsity_after(done)
        if sparsity is not None:
            self.core.prune(sparsity)
