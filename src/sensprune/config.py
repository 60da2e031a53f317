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
from .methods.neuron import UNIT_DECAYS
from .models import SELECTIONS
from .regularizer import NORMALIZE, SOURCES
from .sensitivity_engines import BATCHNORM_MODES, KINDS, OUTPUTS, REDUCTIONS

RECIPES_DIR = Path(__file__).parent / "recipes"
# The allowed values of every setting that takes a name: validation and the CLI's choices
# both read this one table (the methods come from their registry; the sensitivity's and the
# regularizer's lists are the ones their own modules validate with).
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("none", "cosine", "step", "linear"),
    "kind": KINDS,
    "reduction": REDUCTIONS,
    "outputs": OUTPUTS,
    "regularize": SELECTIONS,
    "threshold_mode": ("global", "layer"),
    "normalize": NORMALIZE,
    "unit_decay": UNIT_DECAYS,
    "sens_source": SOURCES,
    "batchnorm": BATCHNORM_MODES,
    "threshold_ref": ("epoch", "start", "best"),
    "finetune_schedule": ("constant", "cosine"),
    "device": ("auto", "cpu", "cuda"),
}
# Learning rates that converge with the bundled models (SGD with momentum 0.9); Adam and AdamW
# use 1e-3 for every model. 0.1 diverged on LeNet-5 in its first epoch.
DEFAULT_LR = {"lenet300": 0.05, "lenet5": 0.02, "resnet32": 0.1, "vgg16": 0.01}
DEFAULT_LR_OTHER, DEFAULT_LR_ADAM = 0.05, 1e-3


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *,
            min: float | None = None, above: float | None = None, max: float | None = None,
            flag: str | None = None, metavar: str | None = None, cli: bool = True,
            default_factory: Any = None) -> Any:
    """One setting, declared once: its default, the help the CLI prints, its bounds (min: >=;
    above: >; max: <=), and how the CLI spells it (flag; cli=False keeps it library-only).
    `validate` and `cli.add_setting_options` both read this metadata."""
    meta = {"help": help, "min": min, "above": above, "max": max, "flag": flag,
            "metavar": metavar, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what
    model: str = setting("lenet300")
    dataset: str = setting("mnist")
    data_dir: str | None = setting(None, "directory with the IDX files (default: embedded "
                                   "MNIST, then $SENSPRUNE_DATA, then ~/.cache/sensprune)")
    val_size: int = setting(5000, "validation samples held out of train", min=0)
    limit_train: int | None = setting(None, "use only the first N training samples", min=1,
                                      metavar="N")
    shift_augment: int = setting(0, "translate each training image by a random offset of up "
                                 "to N pixels in x and y, filling with the background (image "
                                 "datasets; 0: none; CIFAR-10 is always cropped and flipped)",
                                 min=0, max=8, metavar="N")
    # how long, how
    epochs: int = setting(10, min=1)
    batch_size: int = setting(100, min=1)
    optimizer: str = setting("sgd")
    lr: float | None = setting(None, "learning rate (default: per model and optimizer, e.g. "
                               "0.05 for lenet300, 0.02 for lenet5 with SGD; 1e-3 with Adam)",
                               min=0, max=1e9)
    momentum: float = setting(0.9, min=0)
    nesterov: bool = setting(False, "Nesterov momentum (SGD with momentum > 0)")
    weight_decay: float = setting(0.0, "the optimizer's own weight decay", min=0)
    schedule: str = setting("none", "learning-rate schedule over all epochs (linear: to 0 at "
                            "the last epoch)")
    step_size: int = setting(10, "schedule step: epochs per step", min=1)
    gamma: float = setting(0.1, "schedule step: lr factor per step", above=0)
    seed: int = setting(0, "random seed (initialization, batch order, dropout)", min=0,
                        max=2**31 - 1)
    # the method
    method: str = setting("sensitivity", "sensitivity (default), a baseline, or none (dense)")
    kind: str = setting("specific", "specific (the target's output) or unspecific (all "
                        "outputs, 1/C each)")
    reduction: str = setting("sample", "S from per-sample |dy/dw| (sample) or from the "
                             "batch-summed derivative (batch)")
    outputs: str = setting("logits", "differentiate the logits or the softmax probabilities")
    lam: float = setting(1e-4, "regularization factor lambda", min=0, max=1e9)
    lam_lr_scaled: bool = setting(False, "multiply lambda by the current learning rate")
    sens_every: int = setting(1, "recompute S every N steps", min=1)
    output_samples: int = setting(0, "unspecific kind with many classes: estimate S from K "
                                  "outputs drawn per step (0: all, exact)", min=0)
    regularize: str = setting("weights", "which parameters are regularized and pruned: weights "
                              "(Linear, Conv, recurrent, attention projections), "
                              "weights+embeddings, weights+biases, all")
    normalize: str = setting("none", "divide S by a per-layer statistic norm in "
                             "max(decay_floor, 1 - beta*S/norm) (none: the paper's form)")
    beta: float = setting(1.0, "scale of S in the insensitivity "
                          "max(decay_floor, 1 - beta*S/norm)", above=0)
    quantile: float = setting(0.5, "normalize quantile: which quantile of S per layer (0-1]",
                              above=0, max=1)
    decay_floor: float = setting(0.0, "smallest decay factor max(decay_floor, 1 - S): 0 is the "
                                 "paper's rule max(0, 1 - S); above 0 the most sensitive "
                                 "weights still decay by decay_floor * lam (1: plain L2)",
                                 min=0, max=1)
    times_weight: bool = setting(False, "insensitivity of |w|*S (the weight's contribution) "
                                 "instead of S")
    batchnorm: str = setting("frozen", "BatchNorm in the sensitivity: batch statistics as "
                             "constants (frozen, fast) or differentiated through (exact, one "
                             "backward per sample)")
    sens_source: str = setting("outputs", "outputs: the paper's dy/dw; loss: |dL/dw| "
                               "(LOBSTER-style, no extra cost)")
    warmup_epochs: int = setting(0, "plain training before the sparsification phase", min=0)
    finetune_epochs: int = setting(0, "masks fixed, no regularization, at the end", min=0)
    finetune_lr: float = setting(0.0, "lr of the fine-tuning phase (0: keep the schedule's)",
                                 min=0)
    finetune_schedule: str = setting("constant", "fine-tuning lr: constant, or cosine from "
                                     "finetune-lr to 0 over the phase")
    init_from: str | None = setting(None, "start from a trained run (directory or model.pt); "
                                    "its zero weights stay zero (fine-tune a pruned model)",
                                    metavar="RUN")
    teacher: str | None = setting(None, "distil from a trained run (directory or model.pt): "
                                  "the loss mixes cross-entropy with the KL divergence to its "
                                  "softened outputs, in every phase", metavar="RUN")
    distill_weight: float = setting(0.5, "teacher: weight of the KL term (cross-entropy "
                                    "gets 1 - it)", min=0)
    distill_temperature: float = setting(2.0, "teacher: softmax temperature of both outputs "
                                         "(the KL term is scaled by its square)", above=0)
    threshold: str | float = setting("auto", "'auto' (largest T within the validation "
                                     "budget), 'schedule' (prune the smallest weights to "
                                     "target_sparsity along a cubic schedule), 'none', or a "
                                     "value T")
    threshold_mode: str = setting("global", "one threshold for all layers, or one per layer")
    val_budget: float = setting(0.1, "auto threshold: allowed validation error increase, in "
                                "points", min=0)
    threshold_ref: str = setting("epoch", "auto threshold's reference error: each epoch's own "
                                 "(epoch), the one measured when sparsification starts "
                                 "(start), or the lowest so far (best)")
    prune_patience: int = setting(0, "prune only once the validation loss has not improved "
                                  "for N epochs (0: every due epoch)", min=0)
    prune_every: int = setting(1, "threshold every N epochs of the sparsification phase",
                               min=1)
    # baselines
    target_sparsity: float = setting(0.95, "gmp and threshold 'schedule': final fraction "
                                     "of weights removed (0-1)",
                                     min=0)
    gmp_every: int = setting(100, "gmp: steps between pruning updates", min=1)
    unit_decay: str = setting("proportional", "neuron: how a unit's insensitivity d decays its "
                              "incoming weights w_n: proportional (w_n -= lam d w_n) or group "
                              "(the group-lasso step with lam d: small units reach exactly 0)")
    vd_kl_warmup_epochs: int = setting(5, "sparse_vd: epochs to anneal the KL weight from 0 "
                                       "to 1", min=0)
    vd_kl_delay_epochs: int = setting(0, "sparse_vd: epochs with KL weight 0 before the "
                                      "annealing starts", min=0)
    # where
    out: str = setting("runs/latest", "run directory (summary.json, checkpoint.pt, ...)")
    progress: bool = setting(True, "the progress bar (drawn only when stdout and stderr are "
                             "terminals)", flag="--no-progress")
    threads: int = setting(0, "torch CPU threads (0: torch's default)", min=0, max=1024)
    workers: int = setting(0, "DataLoader worker processes (ImageFolder datasets)", min=0)
    device: str = setting("auto", "auto (CUDA when available), cpu or cuda")
    amp: bool = setting(True, "bfloat16 autocast on CUDA", flag="--no-amp")

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
        for f in dataclasses.fields(self):  # the bounds declared with each setting
            v, meta = getattr(self, f.name), f.metadata
            if v is None or isinstance(v, (str, bool)):
                continue
            if isinstance(v, float) and abs(v) > 1e30:  # past float32's range: overflow later
                raise ConfigError(f"{f.name} must be at most 1e30 in size, got {v}")
            low, above, high = meta.get("min"), meta.get("above"), meta.get("max")
            if ((low is not None and v < low) or (above is not None and not v > above)
                    or (high is not None and v > high)):
                start = (f"[{low:g}" if low is not None else f"({above:g}" if above is not None
                         else "(-inf")
                bound = (f"in {start}, {high:g}]" if high is not None else
                         f">= {low:g}" if low is not None else f"> {above:g}")
                raise ConfigError(f"{f.name} must be {bound}, got {v}")
        if self.warmup_epochs + self.finetune_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs + finetune_epochs ({self.warmup_epochs} + "
                              f"{self.finetune_epochs}) exceed epochs ({self.epochs})")
        self.threshold = parse_threshold(self.threshold)
        if self.val_size == 0 and self.threshold == "auto" and self.method != "none":
            raise ConfigError("the automatic threshold needs a validation set: set --val-size "
                              "above 0 or give a fixed --threshold")
        if self.threshold == "schedule" and not self.target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be below 1 (the fraction of weights "
                              f"removed), got {self.target_sparsity}")
        if self.teacher is not None and not Path(self.teacher).exists():
            raise ConfigError(f"teacher: {self.teacher} does not exist; give a trained run "
                              "directory or its model.pt")
        if self.distill_weight > 1:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
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
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**31 - 1:
                raise ConfigError(f"{f.name} = {v} is out of range (at most {2**31 - 1})")

    @property
    def sparsify_epochs(self) -> int:
        """Epochs of the sparsification phase (between warm-up and fine-tuning)."""
        return self.epochs - self.warmup_epochs - self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings that do not change what a run computes: a run may be resumed, or reused by
# `reproduce`, with other values of these.
NOT_RESULT = ("threads", "progress", "workers", "data_dir", "out", "device")


# Settings whose default changed: a run saved before the setting existed has no key for it
# and ran with the value here, not with today's default. (decay_floor: 0 before the setting
# existed, 0.5 while it was the default, 0 again since; every run saved with the setting
# carries its value.)
EARLIER_DEFAULTS: dict[str, Any] = {"decay_floor": 0.0}
# Settings that no longer exist (saved runs still carry them; they never changed a result)
REMOVED_SETTINGS = ("extra",)


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config as it ran: keys it lacks take their earlier default, if one
    changed since, else today's."""
    return {**_defaults(), **EARLIER_DEFAULTS, **_current(saved)}


def _current(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings without the ones that no longer exist."""
    return {k: v for k, v in settings.items() if k not in REMOVED_SETTINGS}


def read_by() -> dict[str, tuple[str, ...]]:
    """Settings that only some methods read -> those methods' names, from each registered
    method's own declaration (``Method.reads``): for any other method they cannot change the
    result. Read at call time, so a method registered later counts."""
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in REGISTRY.items():
        for key in getattr(cls, "reads", ()):
            out[key] = out.get(key, ()) + (name,)
    return out


# Settings that only the loop's threshold policy reads
THRESHOLD_SETTINGS = ("threshold", "val_budget", "threshold_ref", "prune_patience",
                      "prune_every")


def _reads(method: str, key: str) -> bool:
    """Whether a run of ``method`` reads the setting ``key`` (unknown methods read all)."""
    by = read_by()
    if key in by:
        return method in by[key]
    cls = REGISTRY.get(method)
    if cls is None:
        return True
    if key in THRESHOLD_SETTINGS:
        return cls.uses_threshold
    if key == "lam":
        return cls.uses_lam
    return True


def differing_settings(now: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Names of the settings that change the result and differ between two configs (``saved``
    completed by :func:`saved_settings`); a setting the run's method does not read is not
    compared (L2's decay_floor, GMP's threshold)."""
    now = {**_defaults(), **_current(now)}
    saved = saved_settings(saved)
    same_method = now.get("method") == saved.get("method")
    return sorted(k for k in set(now) | set(saved) if k not in NOT_RESULT
                  and now.get(k) != saved.get(k)
                  and not (same_method and not _reads(now["method"], k)))


def parse_threshold(value: str | float) -> str | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"threshold must be >= 0, 'auto', 'schedule' or 'none'; got {value}")
        return float(value)
    if value in ("auto", "schedule", "none"):
        return value
    try:
        return parse_threshold(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be 'auto', 'schedule', 'none' or a number; "
                          f"got {value!r}") from None


MAX_RECIPE_BYTES = 1 << 20


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML (a file path, or the name of a bundled recipe such as 'lenet300')."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{path}.toml").exists():
        p = RECIPES_DIR / f"{path}.toml"
    try:
        if p.exists() and not p.is_dir() and not p.is_file():  # /dev/zero, a FIFO: no end
            raise ConfigError(f"recipe {p} is not a regular file; give a .toml recipe")
        with open(p, "rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe {p} is larger than {MAX_RECIPE_BYTES >> 10} KiB; a recipe "
                              "is a few lines of TOML")
        data = tomllib.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ConfigError(f"recipe {p}: values nested too deeply; a recipe holds flat "
                          "settings") from None
    except FileNotFoundError:
        bundled = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.toml")))
        raise ConfigError(f"recipe file {path} not found; give a TOML path or one of: {bundled}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {p} is a directory; give a .toml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {p} is not a text file; give a .toml recipe") from None
    except OSError as exc:
        raise ConfigError(f"recipe {p} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {p}: invalid TOML ({exc})") from None
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in data.items():  # tables ([train], [method]...) are flattened
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            section = f"[{key}]" if isinstance(value, dict) else "the top level"
            if k in flat:  # silently keeping the last would hide a mistake
                raise ConfigError(f"recipe {p}: {k} is set twice ({where[k]} and {section}); "
                                  "keep one")
            flat[k], where[k] = v, section
    return flat


def quick_overrides(recipe: str | Path | None = None) -> dict[str, Any]:
    """Settings for a quick try of a recipe (`train --quick`): 3 epochs on 5,000 training and
    1,000 validation images, each of the recipe's phases kept at one epoch (about 15 s for
    LeNet-300 on one core). The result says the pipeline works, not what the recipe reaches."""
    values = {**_defaults(), **(load_recipe(recipe) if recipe else {})}
    quick: dict[str, Any] = {"epochs": 3, "limit_train": 5000, "val_size": 1000}
    quick["warmup_epochs"] = 1 if values.get("warmup_epochs") else 0
    quick["finetune_epochs"] = 1 if values.get("finetune_epochs") else 0
    return quick


def make_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then ``overrides`` (None values are ignored)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        names = ", ".join(u[:40] for u in unknown[:5])
        raise ConfigError(f"unknown setting(s) {names}{more}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values).validate()
