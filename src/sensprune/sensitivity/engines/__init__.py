"""Per-sample sensitivity engines, registered by layer type.

An engine turns what one layer saw in a forward (recorded by a forward hook) and the output
derivatives dy/d(probe) of each sample into S of the layer's parameters, in closed form:
    hook(recorder, module)                 record the forward (may return a replaced output)
    probes(record)                         the tensors whose per-sample derivative it needs
    accumulate(module, record, deltas, w)  [(parameter, S contribution)], deltas per probe
Parameters no engine covers go to the exact generic path (``generic.py``), so an engine is a
speed-up, never a requirement. A new layer type is one engine file and one ``register`` line.
"""

from __future__ import annotations

import torch.nn as nn


class Engine:
    """The interface (see the module docstring); ``supports`` filters layer options the
    closed form does not cover (those layers go generic)."""

    def supports(self, module: nn.Module) -> bool:
        return True

    def hook(self, recorder, module: nn.Module):
        raise NotImplementedError

    def usable(self, records: list):
        """The one record the closed form can use (None: the layer goes generic)."""
        return records[0] if len(records) == 1 else None

    def probes(self, record) -> list:
        raise NotImplementedError

    def accumulate(self, module: nn.Module, record, deltas: list, weight: float) -> list:
        raise NotImplementedError


ENGINES: dict[type[nn.Module], Engine] = {}


def register(*types: type[nn.Module]):
    """Class decorator: the engine for these layer types (subclasses included)."""
    def wrap(cls):
        for t in types:
            ENGINES[t] = cls()
        return cls
    return wrap


def engine_for(module: nn.Module) -> Engine | None:
    for t in type(module).__mro__:
        eng = ENGINES.get(t)
        if eng is not None:
            return eng if eng.supports(module) else None
    return None


from . import conv, linear, lstm  # noqa: E402,F401  (each registers itself)
