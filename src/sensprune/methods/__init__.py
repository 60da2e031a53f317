"""Every training method behind one small interface (``base.Method``), and the registry.

The training loop never names a method: it builds one with :func:`make_method` and calls the
interface. A new method is a ``Method`` subclass registered with :func:`register_method`
(docs/GUIDE.md, "Writing a new method").
"""

from __future__ import annotations

from ..pruning import ThresholdPolicy
from .base import EpochEnd, Method, MethodContext
from .gmp import GradualMagnitude
from .l1 import L1Decay
from .l2 import L2Decay
from .magnitude import MagnitudeRetrain
from .neuron import GroupLasso, NeuronSensitivity
from .none import Dense
from .sensitivity import Sensitivity
from .sparse_vd import SparseVD

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (
    Dense, Sensitivity, L2Decay, L1Decay, MagnitudeRetrain, GradualMagnitude, SparseVD,
    NeuronSensitivity, GroupLasso)}


def register_method(cls: type[Method]) -> type[Method]:
    """Make a ``Method`` subclass known by its ``name`` to the loop, ``--method``, recipes and
    ``reproduce`` (usable as a class decorator). A name already taken by another class is an
    error: a method is replaced only by unregistering it first (``REGISTRY.pop(name)``)."""
    from ..errors import ConfigError
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"register_method takes a subclass of sensprune.methods.Method, "
                          f"got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == Method.name:
        raise ConfigError(f"{cls.__name__} needs its own name = '...' (the --method value)")
    if REGISTRY.get(name, cls) is not cls:
        raise ConfigError(f"method name {name!r} is taken by {REGISTRY[name].__name__}")
    REGISTRY[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    return REGISTRY[name]


def make_method(cfg, ctx: MethodContext) -> Method:
    """The method named by ``cfg.method``, built for the model and optimizer in ``ctx``; a
    method that thresholds gets the policy the settings describe."""
    method = REGISTRY[cfg.method].from_config(cfg, ctx)
    if method.uses_threshold and method.policy is None:
        method.policy = ThresholdPolicy(
            ctx.pruner, cfg.threshold, cfg.threshold_mode, cfg.val_budget, cfg.threshold_ref,
            cfg.prune_patience, cfg.prune_every, is_main=ctx.is_main, broadcast=ctx.broadcast,
            target_sparsity=cfg.target_sparsity, sparsify_epochs=cfg.sparsify_epochs)
    return method


__all__ = ["EpochEnd", "Method", "MethodContext", "REGISTRY", "method_class", "make_method",
           "register_method",
           "Dense", "Sensitivity", "L2Decay", "L1Decay", "MagnitudeRetrain", "GradualMagnitude",
           "SparseVD", "NeuronSensitivity", "GroupLasso"]
