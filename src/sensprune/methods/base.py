"""The interface every training method implements (the sensitivity rule and the baselines).

One batch meets a method at four points, in this order::

    with method.observe(targets):  model(x)        # share the forward (the sensitivity)
    (loss + method.penalty()).backward()           # a term of the loss (Sparse VD's KL)
    optimizer.step(); method.step()                # after each optimizer step (decay, pruning)
    method.epoch_end(EpochEnd(...))                # a sparsification epoch ends: its decision

and the run at four more: ``end_phase()`` when the sparsification phase ends,
``record_epoch()`` with each epoch's validation error, ``epoch_stats()`` for each epoch's
metrics line, and ``state_dict()`` / ``load_state_dict()`` with every checkpoint. A method
with ``uses_threshold`` gets the run's ``pruning.ThresholdPolicy`` as ``policy`` (fixed T,
automatic or a schedule, from the settings) and its epoch-end decision is that policy's; the
loop names neither. The class attributes tell ``reproduce`` what the method reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass
class MethodContext:
    """What a method may be built from, besides the run's settings."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    pruner: Any  # pruning.Pruner
    steps_per_epoch: int
    n_train: int
    is_main: bool = True  # rank 0 (or the only process): it takes the threshold decisions
    broadcast: Callable[[float], float] = lambda value: value  # rank 0's value to every rank


@dataclass
class EpochEnd:
    """What a method's decision at the end of a sparsification epoch may use."""
    state: dict  # the run's checkpointed state: what a decision remembers lives here
    index: int  # the sparsification epoch, 1-based
    last: bool  # the last one (the phase ends after it)
    evaluate: Callable[[], tuple[float, float]]  # (validation error %, validation loss)


class Method:
    name = "base"
    sparsifies = True  # False: no warm-up / sparsification / fine-tuning phases (dense training)
    uses_threshold = False  # the loop thresholds at the ends of sparsification epochs
    uses_lam = False  # the run's ``lam`` is this method's strength (tables report it)
    # the settings only this kind of method reads (beyond the loop's common ones: epochs, lr,
    # lam, regularize, seed, ...); config compares a resumed run's settings, and reports which
    # settings a run ignores, from these declarations
    reads: tuple[str, ...] = ()
    quick_settings: dict[str, Any] = {}  # overrides for ``reproduce --quick`` (a tiny budget)
    policy = None  # the run's ThresholdPolicy, given to methods with ``uses_threshold``

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "Method":
        return cls()

    def extra_params(self) -> list[nn.Parameter]:
        """Parameters the method adds to the model; the loop gives them to the optimizer."""
        return []

    def observe(self, targets=None):
        return contextlib.nullcontext()

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def step(self) -> None:
        pass

    def epoch_end(self, end: EpochEnd) -> float | None:
        """The decision at the end of a sparsification epoch: the threshold it applied, or
        None. By default the threshold policy's, if the method has one."""
        if self.policy is None:
            return None
        return self.policy.end_epoch(end.state, end.index, end.last, end.evaluate)

    def record_epoch(self, state: dict, val_error: float, sparsification_starts: bool) -> None:
        """Every epoch's validation error (rank 0), for decisions that compare with it."""
        if self.policy is not None:
            self.policy.record(state, val_error, sparsification_starts)

    def end_phase(self) -> None:
        pass

    def epoch_stats(self) -> dict[str, Any]:
        """Numbers about the method's state for this epoch's metrics line (empty: none)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
