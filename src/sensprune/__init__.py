"""sensprune: sparse neural networks through sensitivity-driven regularization
(Tartaglione, Lepsøy, Fiandrotti, Francini, NeurIPS 2018).

Public API:
    sensitivity(model, inputs, targets, kind=..., reduction=..., outputs=...) -> {name: S}
    coverage(model, inputs, targets) -> {name: "engine" | "generic"}, each parameter's path
    compact                 a pruned chain network as a smaller dense one, same outputs
    SensitivityRegularizer  the update w <- w - lam * w * max(floor, 1 - S), any optimizer
    Pruner                  thresholds, masks kept in place, automatic threshold search
    sparsity_report         per-layer zero counts of a model
    load / export           compact sparse files and sparse inference
    build_model, load_dataset, make_config, train, evaluate, reproduce
"""

from ._version import __version__
from .config import TrainConfig, make_config
from .data import load_dataset
from .errors import SensPruneError
from .export import compact_model as compact
from .export import export, load
from .models import build_model, prunable_weights
from .pruning import Pruner, cubic_sparsity, sparsity_report
from .regularizer import SensitivityRegularizer
from .sensitivity_engines import coverage, sensitivity
from .reproduce import reproduce
from .results import RunSummary
from .train import evaluate, train

__all__ = [
    "sensitivity", "coverage", "SensitivityRegularizer", "Pruner", "cubic_sparsity",
    "sparsity_report", "build_model", "prunable_weights", "load_dataset", "make_config", "TrainConfig", "train", "evaluate",
    "SensPruneError", "compact", "export", "load", "reproduce", "RunSummary", "__version__",
]
