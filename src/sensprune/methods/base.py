"""The interface every training method implements (the sensitivity rule and the baselines).

One batch meets a method at four points, in this order::

    with method.observe(targets):  model(x)        # share the forward (the sensitivity)
    (loss + method.penalty()).backward()           # a term of the loss (Sparse VD's KL)
    optimizer.step(); method.step()                # after each optimizer step (decay, pruning)
    ... epoch ends: the loop's ThresholdPolicy thresholds if ``uses_threshold``

and the run at three more: ``end_phase()`` when the sparsification phase ends,
``epoch_stats()`` for each epoch's metrics line, and ``state_dict()`` / ``load_state_dict()``
with every checkpoint. The class attributes tell the
loop and ``reproduce`` what the method needs, so neither has to know it by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

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


class Method:
    name = "base"
    sparsifies = True  # False: no warm-up / sparsification / fine-tuning phases (dense training)
    uses_threshold = False  # the loop thresholds at the ends of sparsification epochs
    uses_lam = False  # the run's ``lam`` is this method's strength (tables report it)
    quick_settings: dict[str, Any] = {}  # overrides for ``reproduce --quick`` (a tiny budget)

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

    def end_phase(self) -> None:
        pass

    def epoch_stats(self) -> dict[str, Any]:
        """Numbers about the method's state for this epoch's metrics line (empty: none)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
