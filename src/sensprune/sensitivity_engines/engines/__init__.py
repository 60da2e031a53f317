"""Per-sample sensitivity engines, registered by layer type.

An engine turns what one layer saw in a forward (recorded by a forward hook, one record per
call) and the output derivatives dy/d(probe) of each sample into S of the layer's parameters,
in closed form:
    hook(recorder, module)                 record the forward (may return a replaced output)
    probes(record)                         the tensors whose per-sample derivative it needs
    accumulate(module, record, deltas, w)  [(parameter, S contribution)], deltas per probe
    per_sample(module, record, deltas, sl) [(parameter, keys, rows)]: the signed per-sample
                                           gradients of the samples in slice sl as rows of
                                           the parameter seen as (shape[0], rest): key
                                           (k * n + i) * shape[0] + r is row r of sample i's
                                           gradient for output row k; rows not named are
                                           zero, a key named twice is summed (optional)
A parameter with one use takes ``accumulate``'s |.| directly. A tensor with several uses (a
tied embedding and output layer, a layer called twice) needs the sum of the uses' gradients
per sample before |.|: ``per_sample`` gives them; an engine without it sends such a tensor to
the generic path. Parameters no engine covers go to the exact generic path (``generic.py``),
so an engine is a speed-up, never a requirement. A new layer type is one engine file and one
``register`` line.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


class Engine:
    """The interface (see the module docstring); ``supports`` filters layer options the
    closed form does not cover (those layers go generic)."""

    def supports(self, module: nn.Module) -> bool:
        return True

    def hook(self, recorder, module: nn.Module):
        raise NotImplementedError

    def usable(self, records: list) -> list | None:
        """The records (calls) the closed form can use (None: the layer goes generic)."""
        return records or None

    def params(self, module: nn.Module) -> list:
        """The parameters one call of the layer uses (each once)."""
        return list(module.parameters(recurse=False))

    def graph_uses(self, module: nn.Module, record) -> dict[int, int]:
        """{id(parameter): edges of the autograd graph one call adds to it} (one each for a
        layer whose forward reads each parameter once)."""
        return {id(p): 1 for p in self.params(module)}

    def batch_size(self, record) -> int:
        """How many samples the record holds (a call on another batch is not usable)."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, record, deltas: list, samples: slice) -> list:
        raise NotImplementedError

    def probes(self, record) -> list:
        raise NotImplementedError

    def accumulate(self, module: nn.Module, record, deltas: list, weight: float) -> list:
        raise NotImplementedError


def parameter_uses(outputs, stop=()) -> dict[int, int]:
    """{id(leaf tensor): how many edges of the autograd graph behind ``outputs`` lead to it}:
    how many times the forward read each parameter. The walk does not go past the nodes in
    ``stop`` (a layer's inputs, to count the layer's own reads)."""
    counts: dict[int, int] = {}
    seen = set(stop)
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None and t.grad_fn not in seen]
    seen.update(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:  # AccumulateGrad: a leaf
                counts[id(var)] = counts.get(id(var), 0) + 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


ENGINES: dict[type[nn.Module], Engine] = {}
# Engines for layer types recognized by a test rather than a class (a class from an optional
# package, as transformers' Conv1D, that this package does not import).
MATCHED: list[tuple[Callable[[nn.Module], bool], Engine]] = []


def register(*types: type[nn.Module]):
    """Class decorator: the engine for these layer types (subclasses included)."""
    def wrap(cls):
        for t in types:
            ENGINES[t] = cls()
        return cls
    return wrap


def register_matching(test: Callable[[nn.Module], bool]):
    """Class decorator: the engine for the layers that pass ``test``."""
    def wrap(cls):
        MATCHED.append((test, cls()))
        return cls
    return wrap


def engine_for(module: nn.Module) -> Engine | None:
    for t in type(module).__mro__:
        eng = ENGINES.get(t)
        if eng is not None:
            return eng if eng.supports(module) else None
    for test, eng in MATCHED:
        if test(module):
            return eng if eng.supports(module) else None
    return None


from . import attention, conv, embedding, hf_conv1d, layernorm, linear, recurrent  # noqa: E402,F401  (each registers itself)
