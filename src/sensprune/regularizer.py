"""The sensitivity-driven update w <- w - lambda * w * max(decay_floor, 1 - S), for any optimizer.

Use it in any training loop::

    reg = SensitivityRegularizer(model, lam=1e-4)
    for x, t in loader:
        optimizer.zero_grad()
        with reg.observe(t):            # shares this forward with the sensitivity
            out = model(x)
        F.cross_entropy(out, t).backward()
        optimizer.step()
        reg.step()                      # the insensitivity decay, after the optimizer

The decay is applied after the optimizer's update (decoupled, as AdamW does with weight decay),
so it composes with SGD, momentum, Adam or anything else without touching their state.

How S becomes a decay (``insensitivity``): the paper's literal form is max(0, 1 - S). With
logit outputs S is far below 1 for almost every weight (LeNet-300: median 0.03), so that form
decays nearly every weight at the full rate, which is plain weight decay. ``normalize`` divides
S by a per-layer statistic (its mean, max or a quantile) before the clamp, and ``beta`` scales
it: max(0, 1 - beta * S / norm_l). With ``normalize="mean"`` a weight at least as sensitive as
its layer's average is not decayed at all and the least sensitive ones decay at the full rate.
``sens_source="loss"`` uses |dL/dw| of the batch (the authors' later loss-based sensitivity,
LOBSTER) instead of the output derivatives: it costs nothing beyond the ordinary backward.
``decay_floor`` (default 0: the paper's rule) keeps a least decay on the weights the paper's form
spares entirely: max(rho, 1 - S) = rho + (1 - rho) * max(0, 1 - S / (1 - rho)) with rho =
decay_floor: L2 at rho * lambda plus the paper's rule at the rest. Once the network is sparse,
the paper's form leaves up to a fifth of the survivors undecayed; a floor keeps them
regularized. Measured (docs/REPORT.md): on LeNet-5 at 150x, 3 seeds, floor 0.5 and floor 0
are level (0.98 and 0.99%); on LeNet-300 the best recipe uses 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from .distributed import active as dist_active
from .errors import ConfigError
from .models import ModelWatch, current_params, select_params  # noqa: F401  (select_params: re-exported)
from .sensitivity_engines import (BATCHNORM_MODES, LayerRecorder, check_options, compute,
                          samples_coupled)
from .sensitivity_engines.definition import outputs_and_alpha
from .sensitivity_engines.inputs import OutputSelector, model_output
from .sensitivity_engines import sensitivity as sensitivity_of

NORMALIZE = ("none", "mean", "max", "quantile")
SOURCES = ("outputs", "loss")


def insensitivity(s: torch.Tensor, normalize: str = "none", beta: float = 1.0,
                  quantile: float = 0.5, out: bool = False, decay_floor: float = 0.0) -> torch.Tensor:
    """max(decay_floor, 1 - beta * S / norm) for one parameter's S, with norm = 1 (``"none"``, the
    paper's form) or a statistic of this S (``"mean"``, ``"max"``, ``"quantile"``).
    ``decay_floor`` (0: the paper's max(0, .)) keeps a least decay on the most sensitive weights.
    ``out=True`` works in place on ``s``."""
    v = s if out else s.clone()
    if normalize == "none":
        norm = 1.0
    elif normalize == "mean":
        norm = float(v.mean())
    elif normalize == "max":
        norm = float(v.max()) if v.numel() else 0.0
    elif normalize == "quantile":
        flat = v.flatten().float()
        k = min(flat.numel(), max(1, int(round(quantile * flat.numel()))))
        norm = float(flat.kthvalue(k).values) if flat.numel() else 0.0
    else:
        raise ConfigError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if norm <= 0:  # no signal at all in this layer: every weight is insensitive
        return v.zero_().add_(1.0)
    return v.mul_(-beta / norm).add_(1.0).clamp_(min=decay_floor)


@dataclass(frozen=True)
class DecayForm:
    """How S becomes the decay factor d of each weight (its settings, checked once):
    d = max(decay_floor, 1 - beta * S' / norm), S' = |w| S with ``times_weight``, norm from
    ``normalize`` (see :func:`insensitivity`)."""
    normalize: str = "none"
    beta: float = 1.0
    quantile: float = 0.5
    decay_floor: float = 0.0
    times_weight: bool = False

    def __post_init__(self):
        if not 0 <= self.decay_floor <= 1:
            raise ConfigError(f"decay_floor must be in [0, 1], got {self.decay_floor}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"quantile must be in (0, 1], got {self.quantile}")

    def factor(self, s: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """d for one parameter (``weight``: needed with ``times_weight``), computed in place in
        ``s`` (a fresh tensor)."""
        if self.times_weight:  # |w| S: the weight's first-order contribution to the output
            s = s.mul_(weight.detach().abs())
        return insensitivity(s, self.normalize, self.beta, self.quantile, out=True,
                             decay_floor=self.decay_floor)


class SensitivityRegularizer:
    """Applies w <- w - lam_eff * w * max(decay_floor, 1 - S) to the selected parameters.

    Args:
        model: the network (left unmodified: no hooks stay, no parameters renamed).
        lam: the regularization factor lambda.
        kind, reduction, outputs: see :func:`sensprune.sensitivity`.
        regularize: which parameters (see :func:`select_params`): "weights" (Linear, Conv,
            recurrent, attention projections), "weights+embeddings", "weights+biases", "all",
            or a list of names.
        sens_every: recompute the sensitivity every N steps (the last value is reused between).
        optimizer: needed only with ``lam_lr_scaled=True``.
        lam_lr_scaled: use lam_eff = lam * current learning rate (else lam_eff = lam, the paper's).
        distributed: reduce the sensitivity over DDP ranks so it is that of the global batch
            (default: whenever torch.distributed is initialized with more than one rank).
        output_samples: unspecific kind with many classes: estimate S from K outputs drawn
            per step (unbiased; the draw is seeded by ``seed``, identical on every rank).
        normalize, beta, quantile, decay_floor: how S becomes the decay factor, see
            :func:`insensitivity`. Default max(0, 1 - S), the paper's rule; ``decay_floor=rho``
            keeps a least decay rho * lam on the most sensitive weights.
        sens_source: ``"outputs"`` (the paper's S = sum_k alpha_k |dy_k/dw|) or ``"loss"``
            (S = |dL/dw| of the batch, read from ``p.grad`` after the backward: no extra cost).
        batchnorm: see :func:`sensprune.sensitivity` (``"frozen"``: batch statistics as
            constants, a second forward per step when the model has BatchNorm in training mode).
        times_weight: use |w| * S (the weight's first-order contribution to the output, or
            to the loss) in place of S: a small weight the output is sensitive to is not
            protected, a large one that carries the output is.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        kind: str = "specific",
        reduction: str = "sample",
        outputs: str = "logits",
        regularize: str | Iterable[str] = "weights",
        sens_every: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        lam_lr_scaled: bool = False,
        distributed: bool | None = None,
        output_samples: int | None = None,
        seed: int = 0,
        normalize: str = "none",
        beta: float = 1.0,
        quantile: float = 0.5,
        sens_source: str = "outputs",
        times_weight: bool = False,
        batchnorm: str = "frozen",
        decay_floor: float = 0.0,
        output: OutputSelector | None = None,
    ):
        check_options(kind, reduction, outputs)
        self.decay = DecayForm(normalize, float(beta), quantile, float(decay_floor), times_weight)
        if sens_source not in SOURCES:
            raise ConfigError(f"sens_source must be one of {SOURCES}, got {sens_source!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")
        if sens_every < 1:
            raise ConfigError(f"sens_every must be >= 1, got {sens_every}")
        if lam_lr_scaled and optimizer is None:
            raise ConfigError("lam_lr_scaled=True needs the optimizer (pass optimizer=...)")
        self.model = model
        self.lam = float(lam)
        self.kind, self.reduction, self.outputs = kind, reduction, outputs
        self.params = select_params(model, regularize)
        if not self.params:
            raise ConfigError("the model has no parameter to regularize (no Linear, Conv, "
                              "recurrent or Embedding weight that requires grad); pass "
                              "regularize=")
        self.sens_every = sens_every
        self.optimizer = optimizer
        self.lam_lr_scaled = lam_lr_scaled
        self.distributed = distributed
        self.output_samples = output_samples
        self.sens_source = sens_source
        self.batchnorm = batchnorm
        self.output = output
        self.generator = torch.Generator().manual_seed(seed)
        self.insensitivity: dict[str, torch.Tensor] = {}
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None  # accumulate=True
        self.steps = 0
        self._watch = ModelWatch(model, self.params, "SensitivityRegularizer")

    # -- computing S ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether a sensitivity has been computed for ``step()`` to use."""
        return bool(self.insensitivity) or self._pending is not None

    def due(self) -> bool:
        """Whether this step recomputes the sensitivity."""
        return not self.insensitivity or self.steps % self.sens_every == 0

    @contextlib.contextmanager
    def observe(self, targets: torch.Tensor | None = None, accumulate: bool = False):
        """Wrap the training forward: the sensitivity is computed from that same forward
        (its outputs stay usable for the loss and its backward). The model may be called with
        any arguments and return a tensor, a tuple, a dict or a ``ModelOutput`` (see
        ``output=``); targets are (B,) class indices, or (B, T) for sequence outputs (B, T, C),
        -100 at positions to leave out.

        ``accumulate=True`` (gradient accumulation): the S of each micro-batch is kept, and
        the next ``step()`` uses their mean weighted by batch size, which is exactly S of the
        whole batch (S is a mean over samples of per-sample quantities)."""
        self._watch.check()
        if not self.due() or self.lam == 0 or self.sens_source == "loss":
            yield
            return
        # BatchNorm with batch statistics couples the samples of the training forward; the
        # frozen mode then takes S from a second forward with the statistics held constant
        refeed = (self.batchnorm == "frozen" and self.reduction == "sample"
                  and samples_coupled(self.model))
        with LayerRecorder(self.model, record_layers=self.reduction == "sample" and not refeed) as rec:
            yield
        if rec.n_forward != 1:
            raise RuntimeError(f"observe() expects exactly one model forward inside the block, "
                               f"saw {rec.n_forward}")
        if refeed:
            s = self._sensitivity(rec.call(), targets, distributed=self._distributed())
        else:
            s = self._from_output(rec.output, targets, rec)
        if accumulate:
            n = model_output(rec.output, self.output).shape[0]
            if self._pending is None:
                self._pending = ({k: v.mul_(n) for k, v in s.items()}, n)
            else:
                for k, v in s.items():
                    self._pending[0][k].add_(v, alpha=n)
                self._pending = (self._pending[0], self._pending[1] + n)
        else:
            self._pending = None
            self._set(s)

    def update(self, inputs, targets: torch.Tensor | None = None) -> None:
        """Compute the sensitivity from a separate forward on (inputs, targets); inputs as
        :func:`sensprune.sensitivity` takes them (a tensor, a tuple, a dict of keywords)."""
        self._set(self._sensitivity(inputs, targets))

    def _sensitivity(self, inputs, targets, distributed: bool = False):
        return sensitivity_of(self.model, inputs, targets, kind=self.kind, reduction=self.reduction,
                           outputs=self.outputs, params=list(self.params),
                           output_samples=self.output_samples, generator=self.generator,
                           batchnorm=self.batchnorm, distributed=distributed,
                           output=self.output)

    def _from_output(self, out, targets, rec):
        y, alpha = outputs_and_alpha(model_output(out, self.output), targets, self.kind,
                                     self.outputs, self.output_samples, self.generator)
        return compute(self.model, y, alpha, self.params, self.kind, self.reduction, rec,
                       distributed=self._distributed())

    def _distributed(self) -> bool:
        return dist_active() if self.distributed is None else self.distributed

    def _set(self, s: dict[str, torch.Tensor]) -> None:
        # in place: S is a fresh tensor, and large allocations cost more than the arithmetic
        self.insensitivity = {n: self.decay.factor(v, self.params[n]) for n, v in s.items()}

    @property
    def decay_floor(self) -> float:
        return self.decay.decay_floor

    @decay_floor.setter
    def decay_floor(self, value: float) -> None:  # checked like at construction
        self.decay = dataclasses.replace(self.decay, decay_floor=float(value))

    # -- the update ----------------------------------------------------------------------------
    def effective_lam(self) -> float:
        if self.lam_lr_scaled:
            return self.lam * float(self.optimizer.param_groups[0]["lr"])
        return self.lam

    @torch.no_grad()
    def step(self) -> None:
        """Apply the decay with the latest sensitivity; call after ``optimizer.step()``."""
        self.steps += 1
        if self._pending is not None:  # the micro-batches' S, weighted by their sizes
            total, n = self._pending
            self._pending = None
            self._set({k: v.div_(n) for k, v in total.items()})
        lam = self.effective_lam()
        if self.sens_source == "loss" and lam != 0 and (self.steps - 1) % self.sens_every == 0:
            # |dL/dw| of this batch (already reduced over DDP ranks by the backward)
            self._set({n: p.grad.detach().abs() for n, p in self.params.items()
                       if p.grad is not None})
        if lam == 0:
            return
        if not self.insensitivity:
            if self.sens_source == "loss":  # no gradient yet (step before any backward)
                raise RuntimeError("step() found no gradients: call it after loss.backward() "
                                   "and optimizer.step()")
            raise RuntimeError("step() before any sensitivity was computed: wrap the training "
                               "forward in `with reg.observe(targets):` (or call "
                               "reg.update(inputs, targets)) first")
        params = current_params(self.model, self.params)
        for name, p in params.items():
            d = self.insensitivity.get(name)
            if d is not None:
                if d.shape != p.shape:
                    raise RuntimeError(f"{name} changed shape since its sensitivity was "
                                       "computed; build a new SensitivityRegularizer")
                p.addcmul_(p, d.to(p.dtype), value=-lam)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "insensitivity": self.insensitivity, "lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        """A state from :meth:`state_dict`, checked against this model's regularized
        parameters (names and shapes) before anything is changed."""
        if not isinstance(state, dict) or not {"steps", "lam", "insensitivity"} <= set(state):
            raise ConfigError("a SensitivityRegularizer state has 'steps', 'lam' and "
                              "'insensitivity'; this is not one")
        ins = state["insensitivity"] or {}
        if not isinstance(ins, dict):
            raise ConfigError("the regularizer state's 'insensitivity' is not a dict")
        for n, t in ins.items():
            if n not in self.params:
                raise ConfigError(f"the regularizer state names {n!r}, which this regularizer "
                                  "does not regularize: the state is from another model")
            if t is not None and (not torch.is_tensor(t)
                                  or tuple(t.shape) != tuple(self.params[n].shape)):
                got = list(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ConfigError(f"the regularizer state's {n!r} has shape {got}, the "
                                  f"parameter {list(self.params[n].shape)}: the state is from "
                                  "another model")
        self.steps = int(state["steps"])
        self.lam = float(state["lam"])
        self.insensitivity = dict(ins)
