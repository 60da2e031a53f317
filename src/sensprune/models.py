"""Model registry: the paper's networks, the CIFAR/ImageNet networks, and generality models.

``build_model(name, num_classes, input_shape)`` returns a plain ``nn.Module``; nothing here
knows about pruning. ``prunable_weights(model)`` names the parameters the paper counts
(weights of Linear / Conv / recurrent layers, not biases or normalization parameters).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10, ReLU (266,610 parameters)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant: conv 20@5x5, pool, conv 50@5x5, pool, fc 800-500, fc 500-10
    (431,080 parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]


def _vgg_features(batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(nn.Conv2d(c, int(v), 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
    return nn.Sequential(*layers)


class VGG16(nn.Module):
    """VGG-16 for ImageNet (224x224), 138,357,544 parameters, same layout as torchvision's."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.features = _vgg_features(False, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class VGG16CIFAR(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (CIFAR-10): 13 convs, fc 512-512-10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = _vgg_features(True, in_channels)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """ResNet-32 for CIFAR-10 (He et al. 2016): 3 stages x 5 basic blocks, 16/32/64 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        c = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(c, cout, stride if i == 0 else 1))
                c = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvBNNet(nn.Module):
    """Generality test model: convs with BatchNorm, a non-ReLU activation, a residual add."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, act: str = "tanh"):
        super().__init__()
        self.act = {"tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid,
                    "relu": F.relu}[act]
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn1(self.conv1(x))), 2)
        x = x + self.act(self.bn2(self.conv2(x)))  # residual connection
        x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


@functools.cache
def cpu_bf16_lstm_supported() -> bool:
    """Whether this CPU runs ``nn.LSTM`` under bfloat16 autocast.

    oneDNN has no bf16 LSTM primitive on x86-64 CPUs without AVX-512 and raises "could not
    create a primitive descriptor"; the answer is probed once, on a tiny LSTM, not guessed
    from CPU flags (``ONEDNN_MAX_CPU_ISA`` can lower what a capable CPU offers)."""
    lstm = nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 2))
    except RuntimeError:
        return False
    return True


class LSTMClassifier(nn.Module):
    """Generality test model: an LSTM reading a 28x28 image row by row, then a Linear head.

    Under CPU bf16 autocast on a CPU without a bf16 LSTM kernel, the LSTM runs in float32
    (autocast off for it alone) instead of failing."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 64,
                 row_size: int = 28):
        super().__init__()
        self.lstm = nn.LSTM(row_size * in_channels, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        b, c, h, w = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, rows, features)
        if (seq.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and not cpu_bf16_lstm_supported()):
            with torch.autocast("cpu", enabled=False):
                out, _ = self.lstm(seq.float())
        else:
            out, _ = self.lstm(seq)
        return self.fc(out[:, -1])


ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "lenet300": lambda num_classes, input_shape: LeNet300(
        num_classes, int(torch.Size(input_shape).numel())),
    "lenet5": lambda num_classes, input_shape: LeNet5(num_classes, input_shape[0]),
    "vgg16": lambda num_classes, input_shape: VGG16(num_classes, input_shape[0]),
    "vgg16_cifar": lambda num_classes, input_shape: VGG16CIFAR(num_classes, input_shape[0]),
    "resnet32": lambda num_classes, input_shape: ResNet32(num_classes, input_shape[0]),
    "convbn": lambda num_classes, input_shape: ConvBNNet(num_classes, input_shape[0]),
    "lstm": lambda num_classes, input_shape: LSTMClassifier(num_classes, input_shape[0],
                                                            row_size=input_shape[2]),
}


def build_model(name: str, num_classes: int = 10,
                input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Module:
    """Instantiate a registered model by name."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes, tuple(input_shape))


def use_channels_last(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Put a conv net (image inputs) in channels_last memory format, in place: oneDNN's native
    layout, ~1.5x faster LeNet-5 steps and ~3x faster evaluation on CPU. Parameter names and
    shapes are unchanged; conv layers convert their inputs themselves."""
    if len(input_shape) == 3:
        model.to(memory_format=torch.channels_last)
    return model


_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)
# nn.MultiheadAttention's own weights (its out_proj is a Linear of its own)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers``' Conv1D (GPT-2's projections: a Linear with its weight stored (in, out)),
    recognized without importing transformers."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def _layer_weights(mod: nn.Module, include_biases: bool, embeddings: bool):
    """The (name, parameter) pairs of one layer that count as weights (biases on request)."""
    if isinstance(mod, _WEIGHT_LAYERS) or is_hf_conv1d(mod) or (
            embeddings and isinstance(mod, nn.Embedding)):
        for n, p in mod.named_parameters(recurse=False):
            if include_biases or not n.startswith("bias"):
                yield n, p
    elif isinstance(mod, nn.MultiheadAttention):
        for n, p in mod.named_parameters(recurse=False):
            if n in _ATTENTION_WEIGHTS or (include_biases and n in ("in_proj_bias",)):
                yield n, p


def prunable_weights(model: nn.Module, include_biases: bool = False,
                     embeddings: bool = False) -> dict[str, nn.Parameter]:
    """Parameters that count as the network's weights (the paper's |theta|), by name.

    Weights of Linear, Conv, recurrent layers, ``nn.MultiheadAttention``'s packed in-projection
    (Q, K, V) and ``transformers``' Conv1D; with ``include_biases`` their biases too; with
    ``embeddings`` the tables of every ``nn.Embedding`` (token, position, token-type), which are
    left out by default: a lookup table is not a layer the pruning literature counts (BERT
    pruning keeps them dense). A tied tensor (GPT-2's ``lm_head`` and ``wte``) counts once, under
    its ``model.named_parameters()`` name. Normalization parameters are never included.
    """
    chosen = {id(p) for mod in model.modules()
              for _, p in _layer_weights(mod, include_biases, embeddings)}
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


SELECTIONS = ("weights", "weights+embeddings", "weights+biases", "all")


def select_params(model: nn.Module, which: str | Iterable[str] = "weights") -> dict[str, nn.Parameter]:
    """Parameters the method regularizes: 'weights' (the default: Linear, Conv, recurrent and
    attention-projection weights, see :func:`prunable_weights`), 'weights+embeddings' (and every
    nn.Embedding table), 'weights+biases', 'all' (normalization parameters and embeddings too)
    or explicit names. Each tensor appears once, under its ``named_parameters()`` name."""
    # a frozen parameter (requires_grad=False) is the user's to keep: never decayed or pruned
    if which in SELECTIONS[:3]:
        return {n: p for n, p in prunable_weights(
            model, include_biases=which == "weights+biases",
            embeddings=which == "weights+embeddings").items() if p.requires_grad}
    if which == "all":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(which, str):
        raise ConfigError(f"params must be one of {', '.join(map(repr, SELECTIONS))} or a list "
                          f"of names, got {which!r}")
    named = dict(model.named_parameters())
    missing = [n for n in which if n not in named]
    if missing:
        raise ConfigError(f"unknown parameter(s) {missing}; see model.named_parameters()")
    return {n: named[n] for n in which}


def current_params(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """``params`` looked up again by name in ``model``: after ``model.double()``, ``.to()`` or a
    replaced layer the tensors held since may be stale; the model's own are the ones to change.
    A parameter that is gone is an error, not a silent no-op."""
    named = dict(model.named_parameters())
    out = {}
    for n, p in params.items():
        q = named.get(n)
        if q is None:
            raise RuntimeError(f"parameter {n!r} is no longer in the model; build the "
                               "regularizer or pruner again for the changed model")
        out[n] = q
    return out


class ModelWatch:
    """Notices a layer added to the model after a regularizer or pruner was built on it (the
    module count changes; counting costs microseconds), and warns once, naming the prunable
    parameters that the object does not act on."""

    def __init__(self, model: nn.Module, known: Iterable[str], what: str):
        self.model, self.known, self.what = model, set(known), what
        self.count = sum(1 for _ in model.modules())
        self.warned = False

    def check(self) -> None:
        if self.warned:
            return
        count = sum(1 for _ in self.model.modules())
        if count == self.count:
            return
        self.count = count
        new = [n for n in prunable_weights(self.model) if n not in self.known]
        if new:
            import warnings
            self.warned = True
            warnings.warn(f"{self.what} was built before {', '.join(new[:3])}"
                          f"{' and more' if len(new) > 3 else ''} existed and leaves "
                          f"{'them' if len(new) > 1 else 'it'} alone; build a new {self.what} "
                          "after changing the model", UserWarning, stacklevel=3)

