"""Magnitude pruning with retraining (Han et al. 2015, "Learning both weights and
connections"): prune by magnitude with per-layer thresholds T_l = q * std(w_l), retrain,
repeat. No regularizer: the loop's threshold policy prunes at the epoch ends of the
sparsification phase (recipes set ``threshold_mode = "layer"``; q is chosen automatically
under the validation budget) and the epochs in between retrain the survivors."""

from __future__ import annotations

from .base import Method


class MagnitudeRetrain(Method):
    name = "magnitude"
    uses_threshold = True
