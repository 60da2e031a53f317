"""Sensitivity of the network outputs to each parameter: S(w) = sum_k alpha_k |dy_k/dw|.

This package owns one thing: computing S exactly, fast where the layer type allows it.
  definition.py   the kinds and reductions, alpha, ``sensitivity()``, ``coverage()`` and the
                  dispatch (tied and shared tensors, the graph check)
  inputs.py       models as users call them, outputs as models return them
  recorder.py     one forward's records, through each layer type's engine hook
  engines/        closed forms by layer type (linear, conv, embedding, attention,
                  transformers' Conv1D, layernorm, LSTM/GRU) and frozen BatchNorm
  generic.py      the exact fallback for every other parameter (batched autograd)
  units.py        neuron-level sensitivity (a unit's output, SeReNe)
The hooks live only for the duration of one forward; the user's model is never modified.
``sensprune.sensitivity`` is :func:`sensitivity` itself, a plain function.
"""

from __future__ import annotations

from .definition import (KINDS, OUTPUTS, REDUCTIONS, alpha_matrix, check_options, compute,
                         coverage, sensitivity)
from .engines import ENGINES, Engine, engine_for, register
from .engines.batchnorm import BATCHNORM_MODES, frozen_batch_stats, samples_coupled
from .recorder import LayerRecorder
from .units import UNIT_TYPES, unit_layers, unit_sensitivity, unit_sensitivity_from

__all__ = ["BATCHNORM_MODES", "ENGINES", "Engine", "KINDS", "LayerRecorder", "OUTPUTS",
           "REDUCTIONS", "UNIT_TYPES", "alpha_matrix", "check_options", "compute", "coverage",
           "engine_for", "frozen_batch_stats", "register", "samples_coupled", "sensitivity",
           "unit_layers", "unit_sensitivity", "unit_sensitivity_from"]

