"""What one forward leaves for the closed forms: each layer's records (through its engine's
forward hook, one per call) and the model's inputs and output. The hooks live only inside the
``with`` block."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .engines import Engine, engine_for
from .inputs import ModelCall
from .engines.linear import InputOutput


class LayerRecorder(contextlib.AbstractContextManager):
    """Records every layer that has an engine (and the model's call and output) in one forward.

    A layer called several times leaves one record per call (a use each); a call whose output
    was later modified in place makes the layer unusable for its engine (its parameters go to
    the generic path)."""

    def __init__(self, model: nn.Module, record_layers: bool = True):
        self.model = model
        self.record_layers = record_layers
        self.calls: dict[nn.Module, list] = {}
        self.output = None
        self.inputs: tuple = ()
        self.kwargs: dict = {}
        self.batch_dims: dict[nn.Module, int] = {}
        self.n_forward = 0
        self._handles: list = []

    def __enter__(self):
        if self.record_layers:
            self.batch_dims = time_major_layers(self.model)
            for mod in self.model.modules():
                eng = engine_for(mod)
                if eng is not None:
                    self._handles.append(eng.hook(self, mod))
        self._handles.append(self.model.register_forward_hook(self._root_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _root_hook(self, mod, inputs, kwargs, output):
        self.n_forward += 1
        self.inputs, self.kwargs = inputs, kwargs
        self.output = output

    def call(self) -> ModelCall:
        """The root forward's arguments, to run it again (:func:`sensitivity` takes them)."""
        return ModelCall(tuple(self.inputs), dict(self.kwargs))

    def usable(self) -> dict[nn.Module, tuple[Engine, list]]:
        """{layer: (its engine, the records of its calls the engine can use)}."""
        out = {}
        for m, records in self.calls.items():
            eng = engine_for(m)
            recs = eng.usable(records) if eng is not None else None
            if recs:
                out[m] = (eng, recs)
        return out

    def outputs(self) -> dict[nn.Module, torch.Tensor]:
        """The output z of every Linear/Conv layer called once (neuron-level sensitivity)."""
        return {m: recs[0][1] for m, (eng, recs) in self.usable().items()
                if isinstance(eng, InputOutput) and len(recs) == 1}


def time_major_layers(model: nn.Module) -> dict[nn.Module, int]:
    """{layer: 1} for the layers that see (T, B, ...) inputs: those inside a
    ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` with ``batch_first=False``."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
                and not mod.self_attn.batch_first:
            for child in mod.modules():
                out[child] = 1
    return out
