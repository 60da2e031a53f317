"""What one forward leaves for the closed forms: each layer's record (through its engine's
forward hook) and the model's output. The hooks live only inside the ``with`` block."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .engines import Engine, engine_for
from .engines.linear import InputOutput


class LayerRecorder(contextlib.AbstractContextManager):
    """Records every layer that has an engine (and the model's output) during one forward.

    A layer called more than once, or whose output was later modified in place, is unusable
    for its engine (its parameters go to the generic path)."""

    def __init__(self, model: nn.Module, record_layers: bool = True):
        self.model = model
        self.record_layers = record_layers
        self.calls: dict[nn.Module, list] = {}
        self.output: torch.Tensor | None = None
        self.inputs: tuple = ()
        self.n_forward = 0
        self._handles: list = []

    def __enter__(self):
        if self.record_layers:
            for mod in self.model.modules():
                eng = engine_for(mod)
                if eng is not None:
                    self._handles.append(eng.hook(self, mod))
        self._handles.append(self.model.register_forward_hook(self._root_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _root_hook(self, mod, inputs, output):
        self.n_forward += 1
        self.inputs = inputs
        self.output = output

    def usable(self) -> dict[nn.Module, tuple[Engine, object]]:
        """{layer: (its engine, the record the engine can use)}."""
        out = {}
        for m, records in self.calls.items():
            eng = engine_for(m)
            rec = eng.usable(records) if eng is not None else None
            if rec is not None:
                out[m] = (eng, rec)
        return out

    def outputs(self) -> dict[nn.Module, torch.Tensor]:
        """The output z of every usable Linear/Conv layer (neuron-level sensitivity)."""
        return {m: rec[1] for m, (eng, rec) in self.usable().items()
                if isinstance(eng, InputOutput)}
