"""Models as users call them and outputs as models return them.

Inputs to :func:`sensprune.sensitivity`: a tensor (``model(x)``), a tuple of positional
arguments (``model(*x)``) or a dict of keyword arguments (``model(**x)``, as
``{"input_ids": ..., "attention_mask": ...}``). Outputs: a tensor; a tuple or list (its first
element); a dict or a ``transformers`` ``ModelOutput`` (its ``"logits"``); anything else
through an ``output=`` callable that returns the tensor to differentiate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from ..errors import ConfigError

OutputSelector = Callable[[Any], torch.Tensor]


class ModelCall(NamedTuple):
    """Positional and keyword arguments of one forward (a forward taken from a hook)."""
    args: tuple
    kwargs: dict


def call_model(model: nn.Module, inputs) -> Any:
    """Run ``model`` on inputs given as a tensor, a tuple of arguments or a dict of keywords."""
    if isinstance(inputs, ModelCall):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def first_tensor(inputs) -> torch.Tensor | None:
    """The first tensor among the inputs (its first dimension is the batch)."""
    if isinstance(inputs, ModelCall):
        inputs = (*inputs.args, *inputs.kwargs.values())
    elif isinstance(inputs, Mapping):
        inputs = tuple(inputs.values())
    if torch.is_tensor(inputs):
        return inputs
    for v in inputs if isinstance(inputs, (tuple, list)) else ():
        if torch.is_tensor(v):
            return v
    return None


def model_output(out: Any, output: OutputSelector | None = None) -> torch.Tensor:
    """The tensor y that S differentiates, from what the model returned."""
    if output is not None:
        y = output(out)
        if not torch.is_tensor(y):
            raise ConfigError(f"output= must return a tensor (the model's outputs y), "
                              f"got {type(y).__name__}")
        return y
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):  # a dict, or transformers' ModelOutput
        if torch.is_tensor(out.get("logits")):
            return out["logits"]
        raise ConfigError(f"the model returned a {type(out).__name__} without 'logits' (keys: "
                          f"{', '.join(map(str, out.keys())) or 'none'}); pass "
                          "output=lambda out: <the tensor of outputs>")
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        if out[0].dim() == 0:
            raise ConfigError("the model returned a tuple whose first element is a scalar (a "
                              "loss?); pass output=lambda out: out[1] (the logits)")
        return out[0]
    raise ConfigError(f"cannot find the outputs in a {type(out).__name__} returned by the "
                      "model; pass output=lambda out: <the tensor of outputs>")
