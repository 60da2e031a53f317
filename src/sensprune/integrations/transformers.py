"""``SensitivityPruningCallback``: the sensitivity rule, masks kept outside the model and the
cubic schedule, as a ``transformers.TrainerCallback`` for a plain ``Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SensitivityPruningCallback(lam=1e-3, target=0.8)])

S comes from the Trainer's own training forward with the batch's ``labels`` (a causal LM's
labels shifted to the next token, as the model's loss does; -100 positions left out); the
decay and the masks act once per optimizer step (after all micro-batches of a gradient
accumulation), and the pruned fraction follows the cubic schedule over optimizer steps to
``target``. Evaluation forwards are not observed. A ``trainer.train(resume_from_checkpoint=...)``
resume takes the checkpoint's zero weights as the masks (a pruned weight is exactly zero in
every saved model) and continues the schedule from the checkpoint's step.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sensprune.integrations.transformers needs transformers: "
                      "pip install 'sensprune[transformers]'") from e

from ..errors import ConfigError
from .core import CallbackBase, Schedule, SparseTraining

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class SensitivityPruningCallback(CallbackBase, TrainerCallback):
    """Prune a ``Trainer``'s model to ``target`` with the sensitivity rule.

    Args:
        lam: the regularization factor lambda.
        target: the fraction of the weights removed at the end of the schedule.
        start, end: the schedule's window in optimizer steps (default: the whole run,
            ``state.max_steps``); the regularizer acts inside it, the masks hold after it.
        every: prune every N optimizer steps (default: 20 times over the window) and at its end.
        method: ``"sensitivity"``, ``"l2"`` or ``"gmp"`` (see the Lightning callback).
        shift_labels: use labels[:, t + 1] as the target of logits[:, t] (default: for a causal
            language model, recognized by its class name, as its own loss does).
        targets: ``targets(inputs)`` returns the class indices from the Trainer's inputs dict
            (default: ``inputs["labels"]``).
        regularize, decay_floor, kind, sens_every, output, **regularizer_options: as for
            :class:`sensprune.SensitivityRegularizer`.
    """

    def __init__(self, lam: float, target: float, *, start: int = 0, end: int | None = None,
                 every: int | None = None, method: str = "sensitivity",
                 shift_labels: bool | None = None,
                 targets: Callable[[dict], torch.Tensor] | None = None,
                 regularize: str | list[str] = "weights", decay_floor: float = 0.0,
                 kind: str = "specific", sens_every: int = 1, output: Callable | None = None,
                 **regularizer_options):
        self.core = SparseTraining(lam, target, method=method, regularize=regularize,
                                   decay_floor=decay_floor, kind=kind, sens_every=sens_every,
                                   output=output, **regularizer_options)
        self.start, self.end, self.every = start, end, every
        self.shift_labels, self.targets_of = shift_labels, targets
        self.schedule: Schedule | None = None
        self._state = None
        self._label_hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ConfigError("the Trainer passed no model to the callback")
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ConfigError("SensitivityPruningCallback does not support FSDP or DeepSpeed: "
                              "the masks and S need whole parameters on every rank")
        end = self.end if self.end is not None else state.max_steps
        every = self.every or max(1, (end - self.start) // 20)
        self.schedule = Schedule(self.core.target, self.start, end, every)
        if self.shift_labels is None:
            self.shift_labels = type(model).__name__.endswith(_CAUSAL_SUFFIXES)
        self._state = state
        self.core.attach(model, optimizer)
        if state.global_step > 0:  # resumed: the checkpoint's zeros are the masks
            self.core.masks_from_zeros()
            self.core.pruner.apply()
        # the labels reach the model as a keyword: read them just before observe() opens
        self._label_hook = model.register_forward_pre_hook(self._read_targets, with_kwargs=True,
                                                           prepend=True)

    def _read_targets(self, module, args, kwargs):
        self.core.active = self.schedule.active(self._state.global_step)
        if not (self.core.active and module.training):
            self.core.targets = None
            return
        t = self.targets_of(kwargs) if self.targets_of else kwargs.get("labels")
        if t is not None and self.shift_labels and t.dim() == 2:
            t = torch.cat([t[:, 1:], t.new_full((t.shape[0], 1), -100)], dim=1)
        self.core.targets = t

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.core.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_prune(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.core.detach()
        if self._label_hook is not None:
            self._label_hook.remove()
            self._label_hook = None
