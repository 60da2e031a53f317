"""Thresholding and masks: |w| < T -> 0, and pruned weights stay exactly zero afterwards.

Masks are plain boolean tensors held here, not in the model: after each optimizer step,
``Pruner.apply()`` zeroes the pruned weights in place and the optimizer's per-parameter state
at those positions (momentum buffers, Adam moments), so ``state_dict``, ``deepcopy``,
``torch.compile`` and DDP see an ordinary model with ordinary parameter names.

``auto_threshold`` answers "how do I choose T?": the largest T (global, or one scale for
per-layer thresholds T_l = s * std(w_l)) whose validation error stays within a budget.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .errors import ConfigError
from .models import ModelWatch, current_params, prunable_weights, select_params


def cubic_sparsity(target: float, progress: float) -> float:
    """Zhu & Gupta's schedule: the pruned fraction target * (1 - (1 - progress)^3), progress
    the share of the sparsification phase done (clipped to 1)."""
    return target * (1.0 - (1.0 - min(1.0, progress)) ** 3)


class Pruner:
    """Holds masks (True = kept) for the prunable parameters of ``model``."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.params = params if params is not None else select_params(model)
        if not self.params:
            raise ConfigError("the model has no prunable weight (no Linear, Conv, recurrent or "
                              "Embedding weight that requires grad)")
        self.optimizer = optimizer
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        # parameters with at least one pruned entry: apply() skips the others, so the
        # per-step cost is zero until the first threshold
        self.pruned: set[str] = set()
        # each pruned mask as 0/1 in its parameter's dtype, built once per mask change:
        # multiplying by it is ~9x faster than by a boolean tensor (which is converted on
        # every call), at the memory of one copy of the pruned parameters
        self._factors: dict[str, torch.Tensor] = {}
        self._watch = ModelWatch(model, self.params, "Pruner")

    def refresh(self) -> None:
        """Follow the model: after ``model.double()``, ``.to()`` or a replaced layer, act on the
        model's current parameters (same names), never on stale tensors."""
        self._watch.check()
        current = current_params(self.model, self.params)
        for n, p in current.items():
            if p is not self.params[n]:
                if p.shape != self.masks[n].shape:
                    raise RuntimeError(f"{n} changed shape ({list(self.masks[n].shape)} -> "
                                       f"{list(p.shape)}); build a new Pruner")
                self.masks[n] = self.masks[n].to(p.device)
                self._factors.pop(n, None)
        self.params = current

    def masks_changed(self) -> None:
        """Call after writing into ``masks`` directly (a DDP broadcast): the cached factors
        and the set of pruned parameters follow."""
        self._factors.clear()
        self.pruned = {n for n, m in self.masks.items() if not bool(m.all())}

    def prune(self, name: str, keep: torch.Tensor) -> None:
        """Remove the entries of parameter ``name`` where ``keep`` is False (masks only grow)."""
        self.masks[name] &= keep
        self._factors.pop(name, None)
        if not bool(self.masks[name].all()):
            self.pruned.add(name)

    # -- thresholds ----------------------------------------------------------------------------
    def layer_thresholds(self, t: float, mode: str = "global",
                         criterion: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Per-parameter thresholds: T itself (global) or T * std of the kept weights (layer;
        of the kept criterion values when a ``criterion`` is given)."""
        if mode == "global":
            return {n: float(t) for n in self.params}
        if mode == "layer":
            out = {}
            for n, p in self.params.items():
                kept = (p.detach() if criterion is None else criterion[n])[self.masks[n]]
                out[n] = float(t) * (float(kept.std()) if kept.numel() > 1 else 0.0)
            return out
        raise ConfigError(f"threshold mode must be 'global' or 'layer', got {mode!r}")

    def _criterion(self, scores: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The pruning criterion per parameter: |w| by default, or the given ``scores`` (any
        tensor of the parameter's shape, larger = keep: S, |w| * S, a saliency of your own)."""
        if scores is None:
            return {n: p.detach().abs() for n, p in self.params.items()}
        missing = [n for n in self.params if n not in scores]
        if missing:
            raise ConfigError(f"scores has no entry for {missing[:3]}; give one tensor per "
                              "pruned parameter (Pruner.params)")
        out = {}
        for n, p in self.params.items():
            sc = torch.as_tensor(scores[n]).detach()
            if sc.shape != p.shape:
                raise ConfigError(f"scores[{n!r}] has shape {tuple(sc.shape)}, the parameter "
                                  f"{tuple(p.shape)}")
            out[n] = sc.to(p.device)
        return out

    @torch.no_grad()
    def threshold(self, t: float, mode: str = "global",
                  scores: dict[str, torch.Tensor] | None = None) -> int:
        """Prune every kept weight whose criterion is below T (per ``mode``): |w| < T, or
        ``scores[name] < T`` (see :meth:`prune_to`); returns how many were pruned."""
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"threshold must be a finite number >= 0, got {t!r}")
        self.refresh()
        crit = self._criterion(scores)
        before = self.nonzero()
        for n, tn in self.layer_thresholds(t, mode, None if scores is None else crit).items():
            self.prune(n, crit[n] >= tn)
        self.apply()
        return before - self.nonzero()

    @torch.no_grad()
    def prune_to(self, sparsity: float, mode: str = "global",
                 scores: dict[str, torch.Tensor] | None = None) -> float:
        """Prune the smallest-magnitude kept weights until the fraction ``sparsity`` of all
        weights (of each layer, in 'layer' mode) is pruned; returns the (largest) magnitude
        cut, 0.0 when nothing had to go. Weights tied with the cut go too (the fraction can
        overshoot by the tied count); masks only grow, so a larger pruned fraction stays.

        ``scores``: the place for another pruning criterion, ``{name: tensor}`` for every
        pruned parameter, larger = keep (the sensitivity S, |w| * S, any saliency); the
        lowest-scored kept weights go instead of the smallest. Default: |w|."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
        if mode not in ("global", "layer"):
            raise ConfigError(f"threshold mode must be 'global' or 'layer', got {mode!r}")
        self.refresh()
        crit = self._criterion(scores)
        groups = [list(self.params)] if mode == "global" else [[n] for n in self.params]
        cut = 0.0
        for names in groups:
            total = sum(self.params[n].numel() for n in names)
            kept = torch.cat([crit[n][self.masks[n]].float() for n in names])
            remove = int(sparsity * total) - (total - kept.numel())
            if remove <= 0:
                continue
            t = float(kept.kthvalue(remove).values)
            for n in names:
                self.prune(n, crit[n] > t)
            cut = max(cut, t)
        self.apply()
        return cut

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights and the optimizer state at pruned positions (call after each
        optimizer step: momentum or Adam moments would otherwise revive them). It runs every
        step, so it does not look the parameters up again: thresholding does (``refresh``);
        after changing the model in between, call ``refresh()``."""
        for n in self.pruned:
            p = self.params[n]
            f = self._factors.get(n)
            if f is None or f.dtype != p.dtype or f.device != p.device:
                f = self._factors[n] = self.masks[n].to(device=p.device, dtype=p.dtype)
            p.mul_(f)
            if self.optimizer is not None:
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(f if v.dtype == f.dtype else self.masks[n])

    @torch.no_grad()
    def auto_threshold(
        self,
        evaluate: Callable[[], float],
        max_error: float,
        mode: str = "global",
        steps: int = 14,
        scores: dict[str, torch.Tensor] | None = None,
    ) -> float:
        """Largest T whose error (``evaluate()``, e.g. validation error in %) is <= max_error.

        Bisects over the fraction of currently kept weights to remove (each candidate fraction
        maps to the magnitude at that quantile), evaluating each candidate with the weights
        temporarily zeroed. Only candidates that were measured within budget are accepted, so
        the result respects the budget even where error is not monotone in T. Returns 0.0
        when no candidate qualifies. Does not change the model or the masks. ``scores``: the
        criterion to threshold instead of |w| (see :meth:`prune_to`); then apply the result
        with ``threshold(T, mode, scores=scores)``.
        """
        self.refresh()
        crit = None if scores is None else self._criterion(scores)
        ranked = self._scores(mode, crit)
        if ranked.numel() == 0:
            return 0.0
        sorted_scores = ranked.sort().values

        def t_at(frac: float) -> float:
            if frac <= 0:
                return 0.0
            i = min(int(frac * len(sorted_scores)), len(sorted_scores) - 1)
            return float(sorted_scores[i])

        lo, hi, best = 0.0, 1.0, 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            t = t_at(mid)
            if self._error_with(t, mode, evaluate, crit) <= max_error:
                lo, best = mid, t
            else:
                hi = mid
        return best

    def _scores(self, mode: str, crit: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Kept weights' magnitudes (or criterion values), divided by their layer's std in
        'layer' mode, so that pruning 'score < T' equals the thresholds of
        ``layer_thresholds``."""
        per_layer = self.layer_thresholds(1.0, mode, crit)
        parts = []
        for n, p in self.params.items():
            kept = (p.detach().abs() if crit is None else crit[n].float())[self.masks[n]]
            scale = per_layer[n]
            parts.append(kept / scale if scale > 0 else kept)
        return torch.cat(parts) if parts else torch.empty(0)

    def _error_with(self, t: float, mode: str, evaluate: Callable[[], float],
                    crit: dict[str, torch.Tensor] | None = None) -> float:
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, tn in self.layer_thresholds(t, mode, crit).items():
                    p = self.params[n]
                    p.mul_((p.abs() if crit is None else crit[n]) >= tn)
            return float(evaluate())
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # -- reports -------------------------------------------------------------------------------
    def nonzero(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def state_dict(self) -> dict:
        return {"masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Masks from :meth:`state_dict`; every mask is checked (name, shape, a tensor) before
        any is applied, so a state from another model changes nothing."""
        masks = state.get("masks") if isinstance(state, dict) else None
        if not isinstance(masks, dict):
            raise ConfigError("a Pruner state is {'masks': {name: bool tensor}}; got "
                              f"{type(state).__name__}")
        for n, m in masks.items():
            if n not in self.masks:
                raise ConfigError(f"mask for unknown parameter {n!r}: the state is from "
                                  "another model (or another selection of parameters)")
            if not torch.is_tensor(m) or tuple(m.shape) != tuple(self.masks[n].shape):
                got = list(m.shape) if torch.is_tensor(m) else type(m).__name__
                raise ConfigError(f"mask for {n!r} has shape {got}, the parameter "
                                  f"{list(self.masks[n].shape)}: the state is from another model")
        for n, m in masks.items():
            self.masks[n] = torch.ones_like(self.masks[n])
            self.prune(n, m.to(torch.bool))
        self._factors.clear()


class ThresholdPolicy:
    """The loop's pruning decision at the end of each sparsification epoch: whether to
    threshold, and at which T.

    threshold: ``"auto"`` (the largest T whose validation error stays within ``val_budget``
    points of a reference), ``"schedule"`` (the smallest-magnitude weights, up to the pruned
    fraction ``target * (1 - (1 - i/n)^3)`` after sparsification epoch i of n: Zhu & Gupta's
    cubic schedule at epoch ends, for any regularizer; the error is not looked at),
    ``"none"``, or a fixed T. reference (auto only): ``"epoch"``, that
    epoch's own error before thresholding (the threshold removes only what the network no
    longer needs, but the accepted losses add up epoch after epoch); ``"start"``, the warmed-up
    network's error, fixed (the error can never drift past it plus the budget); ``"best"``,
    the lowest validation error of any epoch so far. ``every``: threshold every N-th epoch
    (and always at the last); ``patience``: only once the validation loss has not improved for
    N epochs. Under DDP rank 0 decides (``is_main``) and ``broadcast`` shares its T.
    Everything it remembers lives in the run's ``state`` dict, so it is checkpointed.
    """

    def __init__(self, pruner: Pruner, threshold: "str | float | ThresholdRule" = "auto",
                 mode: str = "global", val_budget: float = 0.1, reference: str = "epoch",
                 patience: int = 0, every: int = 1, is_main: bool = True,
                 broadcast: Callable[[float], float] = lambda t: t,
                 target_sparsity: float = 0.95, sparsify_epochs: int = 1):
        self.pruner, self.mode = pruner, mode
        self.rule = threshold_rule(threshold, target_sparsity=target_sparsity,
                                   sparsify_epochs=sparsify_epochs, val_budget=val_budget,
                                   reference=reference)
        self.threshold = threshold if not isinstance(threshold, ThresholdRule) else self.rule.name
        self.reference = reference
        self.patience, self.every = patience, every
        self.is_main, self.broadcast = is_main, broadcast

    def record(self, state: dict, val_error: float, sparsification_starts: bool) -> None:
        """Remember an epoch's validation error (rank 0): the lowest so far (reference
        "best"), and the warmed-up network's, before any regularization (reference "start")."""
        state["best_val_error"] = _lowest(val_error, state.get("best_val_error"))
        if self.reference == "start" and sparsification_starts:
            state["reference_val_error"] = val_error

    def end_epoch(self, state: dict, index: int, last: bool,
                  evaluate: Callable[[], tuple[float, float]]) -> float | None:
        """Threshold after sparsification epoch ``index`` (1-based) if due; returns the T
        applied, or None. ``evaluate()`` gives (validation error %, validation loss)."""
        due = index % self.every == 0 or last
        before = None  # this epoch's (val error, val loss) before thresholding, measured once
        if self.patience and not last:
            before = evaluate()
            due = due and _plateaued(state, before[1], self.patience)
        if not due:
            return None
        t = self.rule.apply(self, state, index, last, before, evaluate)
        if t is not None:
            state["thresholds"].append(t)
        return t


class ThresholdRule:
    """How T is chosen when a threshold is due (the choice behind ``threshold =``): a small
    object per policy. ``apply`` prunes and returns the T it applied (None: nothing done)."""
    name = "rule"

    def apply(self, policy: ThresholdPolicy, state: dict, index: int, last: bool,
              before: tuple[float, float] | None,
              evaluate: Callable[[], tuple[float, float]]) -> float | None:
        raise NotImplementedError


class NoThreshold(ThresholdRule):
    """``threshold = "none"``: never prune (the method prunes by itself, or not at all)."""
    name = "none"

    def apply(self, policy, state, index, last, before, evaluate):
        return None


class FixedThreshold(ThresholdRule):
    """``threshold = T``: prune every kept weight with |w| < T (per ``mode``)."""
    name = "fixed"

    def __init__(self, t: float):
        self.t = float(t)

    def apply(self, policy, state, index, last, before, evaluate):
        policy.pruner.threshold(self.t, policy.mode)
        return self.t


class ScheduledThreshold(ThresholdRule):
    """``threshold = "schedule"``: after sparsification epoch i of n, the smallest weights
    go until ``target * (1 - (1 - i/n)^3)`` are pruned (Zhu & Gupta's cubic schedule)."""
    name = "schedule"

    def __init__(self, target_sparsity: float, sparsify_epochs: int):
        self.target, self.sparsify_epochs = target_sparsity, max(1, sparsify_epochs)

    def apply(self, policy, state, index, last, before, evaluate):
        progress = 1.0 if last else index / self.sparsify_epochs
        return policy.pruner.prune_to(cubic_sparsity(self.target, progress), policy.mode)


class AutoThreshold(ThresholdRule):
    """``threshold = "auto"``: the largest T whose validation error stays within
    ``val_budget`` points of the reference (``"epoch"``, ``"start"`` or ``"best"``); rank 0
    searches, ``policy.broadcast`` shares its T."""
    name = "auto"

    def __init__(self, val_budget: float, reference: str):
        self.val_budget, self.reference = val_budget, reference

    def apply(self, policy, state, index, last, before, evaluate):
        t = 0.0
        if policy.is_main:
            if self.reference != "start" or state["reference_val_error"] is None:
                now = before[0] if before is not None else evaluate()[0]
                state["reference_val_error"] = (
                    _lowest(now, state.get("best_val_error"))
                    if self.reference == "best" else now)
            budget = state["reference_val_error"] + self.val_budget
            t = policy.pruner.auto_threshold(lambda: evaluate()[0], budget, policy.mode)
        t = policy.broadcast(t)
        policy.pruner.threshold(t, policy.mode)
        return t


def threshold_rule(threshold: "str | float | ThresholdRule", *, target_sparsity: float = 0.95,
                   sparsify_epochs: int = 1, val_budget: float = 0.1,
                   reference: str = "epoch") -> ThresholdRule:
    """The rule object for a ``threshold`` setting (already checked by the config): 'auto',
    'schedule', 'none', a number, or a :class:`ThresholdRule` of your own."""
    if isinstance(threshold, ThresholdRule):
        return threshold
    if threshold == "none":
        return NoThreshold()
    if threshold == "schedule":
        return ScheduledThreshold(target_sparsity, sparsify_epochs)
    if threshold == "auto":
        return AutoThreshold(val_budget, reference)
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return FixedThreshold(threshold)
    raise ConfigError(f"threshold must be 'auto', 'schedule', 'none', a number or a "
                      f"ThresholdRule; got {threshold!r}")


def _lowest(value: float, best: float | None) -> float:
    return value if best is None else min(value, best)


def _plateaued(state: dict, val_loss: float, patience: int) -> bool:
    """True once the validation loss has not improved for ``patience`` epochs; the count
    restarts after each pruning (the caller prunes when this is True)."""
    best = state.get("best_val_loss")
    if best is None or val_loss < best - 1e-4:
        state["best_val_loss"], state["epochs_since_best"] = val_loss, 0
    else:
        state["epochs_since_best"] = state.get("epochs_since_best", 0) + 1
    if state["epochs_since_best"] >= patience:
        state["best_val_loss"], state["epochs_since_best"] = None, 0
        return True
    return False


def sparsity_report(model: nn.Module, include_biases: bool = False) -> dict:
    """Counts of the prunable weights that are exactly zero, per layer and in total."""
    layers = {}
    total = nonzero = 0
    for n, p in prunable_weights(model, include_biases).items():
        t, nz = p.numel(), int(torch.count_nonzero(p.detach()))
        layers[n] = {"total": t, "nonzero": nz, "remaining_percent": 100.0 * nz / t}
        total += t
        nonzero += nz
    return {
        "layers": layers,
        "total_params": total,
        "nonzero_params": nonzero,
        "compression_ratio": total / max(nonzero, 1),
        "remaining_percent": 100.0 * nonzero / max(total, 1),
    }
