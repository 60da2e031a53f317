"""Neuron-level sensitivity (SeReNe, Tartaglione et al. 2021, the authors' follow-up): the
sensitivity of a neuron's (or channel's) output z_n,
    S_n = (1/B) sum_i sum_k alpha_{i,k} sum_p |dy_{i,k} / dz_{i,n,p}|,
decays the unit's incoming weights and bias as one group,
    w_n <- w_n - lam * w_n * max(decay_floor, 1 - S_n / norm_l),
(norm_l = 1, the paper's form, or ``normalize="mean"``: the layer's mean S_n, since with
logit outputs S_n is far below 1 and the literal form decays nearly every unit alike),
or, with ``unit_decay="group"``, the group-lasso step scaled by the insensitivity,
    w_n <- w_n * max(0, 1 - lam * d_n * sqrt(fan_in) / ||w_n||)
(a proportional decay never empties a unit by itself; the group step does), so a unit the
output does not depend on shrinks as a whole, the threshold zeroes all of it,
and compaction (``export.compact``) removes it. The last layer's units are the network's
outputs and are never decayed as groups (the threshold still prunes their weights)."""

from __future__ import annotations

import contextlib

import torch

from ..distributed import active as dist_active
from ..errors import ConfigError
from ..regularizer import DecayForm
from ..sensitivity_engines import LayerRecorder, alpha_matrix, unit_layers, unit_sensitivity_from
from .base import Method, MethodContext


UNIT_DECAYS = ("proportional", "group")


def _hidden_layers(model) -> dict:
    """Every unit layer but the last one defined (the output layer)."""
    layers = unit_layers(model)
    if len(layers) < 2:
        raise ConfigError("neuron-level regularization needs at least two Linear/Conv layers "
                          "(the last one's units are the outputs)")
    return dict(list(layers.items())[:-1])


def _group_scale_(module, factor: torch.Tensor) -> None:
    """Multiply each output unit's incoming weights (and bias) by its factor, in place."""
    w = module.weight
    w.mul_(factor.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
    if module.bias is not None:
        module.bias.mul_(factor.to(module.bias.dtype))


def _group_lasso_factor(weight: torch.Tensor, amount) -> torch.Tensor:
    """Per unit: max(0, 1 - amount * sqrt(fan_in) / ||w_n||), the proximal step of the group
    lasso (amount: a number, or one per unit)."""
    w = weight.flatten(1)
    norm = w.norm(dim=1).clamp(min=1e-30)
    return (1.0 - amount * w.shape[1] ** 0.5 / norm).clamp_(min=0.0)


class NeuronSensitivity(Method):
    name = "neuron"
    uses_threshold = True
    uses_lam = True
    reads = ("kind", "decay_floor", "normalize", "unit_decay")

    def __init__(self, model, lam: float, kind: str = "specific", decay_floor: float = 0.0,
                 normalize: str = "none", unit_decay: str = "proportional"):
        self.decay = DecayForm(normalize=normalize, decay_floor=float(decay_floor))
        if unit_decay not in UNIT_DECAYS:
            raise ConfigError(f"unit_decay must be one of {UNIT_DECAYS}, got {unit_decay!r}")
        self.unit_decay = unit_decay
        self.model, self.lam, self.kind = model, float(lam), kind
        self.layers = _hidden_layers(model)
        self.insensitivity: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "NeuronSensitivity":
        return cls(ctx.model, cfg.lam, kind=cfg.kind, decay_floor=cfg.decay_floor,
                   normalize=cfg.normalize, unit_decay=cfg.unit_decay)

    @contextlib.contextmanager
    def observe(self, targets=None):
        if self.lam == 0:
            yield
            return
        with LayerRecorder(self.model) as rec:
            yield
        y = rec.output.float()
        alpha = alpha_matrix(y, targets, self.kind)
        s = unit_sensitivity_from(y, alpha, rec, self.layers, self.kind,
                                  distributed=dist_active())
        self.insensitivity = {n: self.decay.factor(v) for n, v in s.items()}

    @torch.no_grad()
    def step(self) -> None:
        if self.lam == 0:
            return
        if not self.insensitivity:
            raise RuntimeError("step() before any sensitivity was computed: wrap the training "
                               "forward in `with method.observe(targets):` first")
        for name, d in self.insensitivity.items():
            m = self.layers[name]
            if self.unit_decay == "group":  # shrink the unit's norm by lam * d * sqrt(fan_in)
                factor = _group_lasso_factor(m.weight, self.lam * d)
            else:
                factor = 1.0 - self.lam * d
            _group_scale_(m, factor)

    @torch.no_grad()
    def epoch_stats(self) -> dict:
        """Units still alive (any nonzero incoming weight) per hidden layer."""
        return {"units_alive": {n: int((m.weight.flatten(1) != 0).any(1).sum())
                                for n, m in self.layers.items()}}

    def state_dict(self) -> dict:
        return {"insensitivity": self.insensitivity}

    def load_state_dict(self, state: dict) -> None:
        self.insensitivity = dict(state.get("insensitivity", {}))


class GroupLasso(Method):
    """Group lasso on each hidden unit's incoming weights (Wen et al. 2016, structured
    sparsity), as a decoupled proximal step after the optimizer like the other regularizers:
        w_n <- w_n * max(0, 1 - lam * sqrt(fan_in) / ||w_n||_2)
    (a whole group reaches exactly zero; sqrt(fan_in) weighs groups of different sizes
    alike). Biases are left alone: a unit with no incoming weight is a constant, which
    compaction folds into the next layer."""

    name = "group_lasso"
    uses_threshold = True
    uses_lam = True

    def __init__(self, model, lam: float):
        self.lam = float(lam)
        self.layers = _hidden_layers(model)

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "GroupLasso":
        return cls(ctx.model, cfg.lam)

    @torch.no_grad()
    def step(self) -> None:
        if self.lam == 0:
            return
        for m in self.layers.values():
            shrink = _group_lasso_factor(m.weight, self.lam)
            m.weight.mul_(shrink.view(-1, *([1] * (m.weight.dim() - 1))))

    epoch_stats = NeuronSensitivity.epoch_stats
