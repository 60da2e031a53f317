"""sensprune: sparse neural networks through sensitivity-driven regularization
(Tartaglione, Lepsøy, Fiandrotti, Francini, NeurIPS 2018).

Public API:
    sensitivity(model, inputs, targets, kind=..., reduction=..., outputs=...) -> {name: S}
    SensitivityRegularizer  the update w <- w - lam * w * max(0, 1 - S), any optimizer
    Pruner                  thresholds, masks kept in place, automatic threshold search
    sparsity_report         per-layer zero counts of a model
    load / export           compact sparse files and sparse inference
    build_model, load_dataset, make_config, train, evaluate, reproduce
"""

__version__ = "0.1.0"

from .config import TrainConfig, make_config  # noqa: E402
from .data import load_dataset  # noqa: E402
from .errors import SensPruneError  # noqa: E402
from .export import export, load  # noqa: E402
from .models import build_model, prunable_weights  # noqa: E402
from .pruning import Pruner, sparsity_report  # noqa: E402
from .regularizer import SensitivityRegularizer  # noqa: E402
from .sensitivity import sensitivity  # noqa: E402
from .reproduce import reproduce  # noqa: E402
from .train import evaluate, train  # noqa: E402

__all__ = [
    "sensitivity", "SensitivityRegularizer", "Pruner", "sparsity_report", "build_model",
    "prunable_weights", "load_dataset", "make_config", "TrainConfig", "train", "evaluate",
    "SensPruneError", "export", "load", "reproduce", "__version__",
]
