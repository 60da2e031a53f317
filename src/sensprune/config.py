"""Run configuration: one dataclass, filled from defaults, then a recipe TOML, then the CLI."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .methods import REGISTRY

RECIPES_DIR = Path(__file__).parent / "recipes"
# The allowed values of every setting that takes a name: validation and the CLI's choices
# both read this one table (the methods come from their registry).
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("none", "cosine", "step"),
    "kind": ("specific", "unspecific"),
    "reduction": ("sample", "batch"),
    "outputs": ("logits", "probs"),
    "regularize": ("weights", "weights+biases", "all"),
    "threshold_mode": ("global", "layer"),
    "normalize": ("none", "mean", "max", "quantile"),
    "sens_source": ("outputs", "loss"),
    "batchnorm": ("frozen", "exact"),
    "threshold_ref": ("epoch", "start", "best"),
    "finetune_schedule": ("constant", "cosine"),
    "device": ("auto", "cpu", "cuda"),
}
# Learning rates that converge with the bundled models (SGD with momentum 0.9); Adam and AdamW
# use 1e-3 for every model. 0.1 diverged on LeNet-5 in its first epoch.
DEFAULT_LR = {"lenet300": 0.05, "lenet5": 0.02, "resnet32": 0.1, "vgg16": 0.01}
DEFAULT_LR_OTHER, DEFAULT_LR_ADAM = 0.05, 1e-3


@dataclass
class TrainConfig:
    # what
    model: str = "lenet300"
    dataset: str = "mnist"
    data_dir: str | None = None
    val_size: int = 5000
    limit_train: int | None = None
    # how long, how
    epochs: int = 10
    batch_size: int = 100
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float | None = None  # None: DEFAULT_LR for the model and optimizer
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"  # none | cosine | step
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    # the method
    method: str = "sensitivity"  # none | sensitivity | l2 | l1 | magnitude | gmp | sparse_vd
    kind: str = "specific"
    reduction: str = "sample"
    outputs: str = "logits"
    lam: float = 1e-4
    lam_lr_scaled: bool = False
    sens_every: int = 1
    output_samples: int = 0  # unspecific with many classes: outputs drawn per step (0: all)
    regularize: str = "weights"  # weights | weights+biases | all
    normalize: str = "none"  # S / per-layer norm before max(0, 1 - beta*S): none | mean | max | quantile
    beta: float = 1.0  # scale of S in the insensitivity max(0, 1 - beta * S / norm)
    quantile: float = 0.5  # normalize = "quantile": which quantile of S per layer
    times_weight: bool = False  # insensitivity of |w|*S (contribution) instead of S
    batchnorm: str = "frozen"  # BatchNorm in the sensitivity: frozen (batch stats as constants) | exact
    sens_source: str = "outputs"  # outputs (the paper's dy/dw) | loss (|dL/dw|, LOBSTER-style)
    warmup_epochs: int = 0  # plain training before the sparsification phase
    finetune_epochs: int = 0  # masks fixed, no regularization, at the end
    finetune_lr: float = 0.0  # learning rate of the fine-tuning phase (0: keep the schedule's)
    finetune_schedule: str = "constant"  # constant | cosine (finetune_lr annealed to 0 over the phase)
    init_from: str | None = None  # start from a trained run (directory or model.pt); its zeros stay zero
    threshold: str | float = "auto"  # auto | none | a fixed value T
    threshold_mode: str = "global"  # global | layer
    val_budget: float = 0.1  # auto threshold: allowed val error increase, in points
    threshold_ref: str = "epoch"  # auto threshold's reference error: epoch (that epoch's own) | start (once, when sparsification starts) | best (lowest so far)
    prune_patience: int = 0  # prune only once the val loss has not improved for N epochs (0: every due epoch)
    prune_every: int = 1  # threshold at every N-th epoch end of the sparsification phase
    # baselines
    target_sparsity: float = 0.95  # gmp: final fraction of weights removed
    gmp_every: int = 100  # gmp: steps between pruning updates
    vd_kl_warmup_epochs: int = 5  # sparse_vd: epochs to anneal the KL weight from 0 to 1
    # where
    out: str = "runs/latest"
    progress: bool = True
    threads: int = 0  # torch threads; 0 = torch's default
    workers: int = 0  # DataLoader worker processes (ImageFolder datasets)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    amp: bool = True  # CUDA only: bfloat16 autocast
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        self._check_types()
        if self.lr is None:
            self.lr = DEFAULT_LR_ADAM if self.optimizer in ("adam", "adamw") else \
                DEFAULT_LR.get(self.model, DEFAULT_LR_OTHER)
        # the registry is read now: a method registered at run time counts
        choices = {**CHOICES, "method": tuple(REGISTRY)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "sens_every", "prune_every", "gmp_every", "step_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "lam", "weight_decay", "val_budget", "momentum"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.beta > 0 or not 0 < self.quantile <= 1:
            raise ConfigError(f"beta must be > 0 and quantile in (0, 1]; got beta={self.beta}, "
                              f"quantile={self.quantile}")
        if not self.gamma > 0:
            raise ConfigError(f"gamma must be > 0, got {self.gamma}")
        if self.vd_kl_warmup_epochs < 0:
            raise ConfigError(f"vd_kl_warmup_epochs must be >= 0, got {self.vd_kl_warmup_epochs}")
        if self.prune_patience < 0:
            raise ConfigError(f"prune_patience must be >= 0, got {self.prune_patience}")
        if self.warmup_epochs < 0 or self.finetune_epochs < 0:
            raise ConfigError("warmup_epochs and finetune_epochs must be >= 0")
        if self.warmup_epochs + self.finetune_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs + finetune_epochs ({self.warmup_epochs} + "
                              f"{self.finetune_epochs}) exceed epochs ({self.epochs})")
        self.threshold = parse_threshold(self.threshold)
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")
        if self.val_size == 0 and self.threshold == "auto" and self.method != "none":
            raise ConfigError("the automatic threshold needs a validation set: set --val-size "
                              "above 0 or give a fixed --threshold")
        if self.init_from is not None and not Path(self.init_from).exists():
            raise ConfigError(f"init_from: {self.init_from} does not exist; give a run directory "
                              "or its model.pt")
        if self.threads < 0 or self.workers < 0:
            raise ConfigError(f"threads and workers must be >= 0, got {self.threads}, {self.workers}")
        return self

    def _check_types(self) -> None:
        """Every value of the declared type (a recipe can hold anything), numbers finite."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
            declared = [k.strip() for k in str(f.type).split("|")]
            if v is None and "None" in declared:
                continue
            allowed = tuple(t for k in declared for t in kinds.get(k, ()))
            if not allowed:  # dicts and mixed fields (threshold) are checked where they are read
                continue
            if isinstance(v, bool) and bool not in allowed or not isinstance(v, allowed):
                raise ConfigError(f"{f.name} must be {' or '.join(declared)}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings that do not change what a run computes: a run may be resumed, or reused by
# `reproduce`, with other values of these.
NOT_RESULT = ("threads", "progress", "workers", "data_dir", "out", "device")


def differing_settings(now: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Names of the settings that change the result and differ between two configs; a
    setting missing from an older run's config had its default then."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    return sorted(k for k in set(now) | set(saved) if k not in NOT_RESULT
                  and now.get(k, defaults.get(k)) != saved.get(k, defaults.get(k)))


def parse_threshold(value: str | float) -> str | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"threshold must be >= 0, 'auto' or 'none'; got {value}")
        return float(value)
    if value in ("auto", "none"):
        return value
    try:
        return parse_threshold(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be 'auto', 'none' or a number; got {value!r}") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML (a file path, or the name of a bundled recipe such as 'lenet300')."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{path}.toml").exists():
        p = RECIPES_DIR / f"{path}.toml"
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        bundled = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.toml")))
        raise ConfigError(f"recipe file {path} not found; give a TOML path or one of: {bundled}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {p}: invalid TOML ({exc})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():  # tables ([train], [method]...) are flattened
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def make_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then ``overrides`` (None values are ignored)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values).validate()
