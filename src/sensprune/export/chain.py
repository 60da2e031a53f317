"""A compacted chain as JSON and back: the layer list an export's header holds, so that a
file rebuilds its network from data, never from pickled code. Every field of a list read from
a file is checked (types, ranges) before a layer is built."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .compaction import NotCompactable, Select

_SIMPLE = {"relu": nn.ReLU, "relu6": nn.ReLU6, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
           "gelu": nn.GELU, "silu": nn.SiLU, "flatten": nn.Flatten}
_POOLS = {"maxpool1d": nn.MaxPool1d, "maxpool2d": nn.MaxPool2d, "avgpool1d": nn.AvgPool1d,
          "avgpool2d": nn.AvgPool2d}
_CONVS = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d}
_BNS = {"batchnorm1d": nn.BatchNorm1d, "batchnorm2d": nn.BatchNorm2d}


def _ints(v, n: int = 1) -> list[int]:
    """A size argument as a list of ``n`` ints (PyTorch accepts one int for every dimension)."""
    return [int(x) for x in (v if isinstance(v, (tuple, list)) else [v] * n)]


def chain_spec(chain: nn.Sequential) -> list[dict[str, Any]]:
    """The JSON description of a compacted chain (shapes and hyper-parameters, no weights)."""
    spec = []
    for m in chain:
        if isinstance(m, nn.Linear):
            s = {"type": "linear", "in": m.in_features, "out": m.out_features,
                 "bias": m.bias is not None}
        elif type(m) in _CONVS.values():
            s = {"type": type(m).__name__.lower(), "in": m.in_channels, "out": m.out_channels,
                 "kernel": _ints(m.kernel_size), "stride": _ints(m.stride),
                 "padding": _ints(m.padding), "dilation": _ints(m.dilation),
                 "bias": m.bias is not None}
        elif type(m) in _BNS.values():
            s = {"type": type(m).__name__.lower(), "features": m.num_features, "eps": m.eps,
                 "affine": m.affine}
        elif type(m) in _POOLS.values():
            n = 1 if type(m).__name__.endswith("1d") else 2
            s = {"type": type(m).__name__.lower(), "kernel": _ints(m.kernel_size, n),
                 "stride": _ints(m.stride, n), "padding": _ints(m.padding, n)}
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                if _ints(m.dilation, n) != [1] * n or m.ceil_mode:
                    raise NotCompactable("max pooling with dilation or ceil_mode")
            elif m.ceil_mode or not m.count_include_pad or getattr(m, "divisor_override", None):
                raise NotCompactable("average pooling with non-default options")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            s = {"type": "adaptive_avgpool2d", "output": _ints(m.output_size, 2)}
        elif isinstance(m, nn.LeakyReLU):
            s = {"type": "leaky_relu", "slope": float(m.negative_slope)}
        elif isinstance(m, nn.ELU):
            s = {"type": "elu", "alpha": float(m.alpha)}
        elif isinstance(m, Select):
            s = {"type": "select", "in": m.in_size, "count": int(m.index.numel())}
        elif isinstance(m, nn.Flatten):
            s = {"type": "flatten"}
        else:
            s = {"type": next(k for k, c in _SIMPLE.items() if type(m) is c)}
        spec.append(s)
    return spec


_MAX_WIDTH = 1 << 20


def _int_field(s: dict, key: str, lo: int = 0, hi: int = _MAX_WIDTH) -> int:
    v = s.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CheckpointError(f"layer {s.get('type')!r}: {key} = {v!r} is out of range")
    return v


def _int_list(s: dict, key: str, n: int, lo: int = 0, hi: int = 4096) -> list[int]:
    v = s.get(key)
    if not isinstance(v, list) or len(v) != n or not all(
            isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v):
        raise CheckpointError(f"layer {s.get('type')!r}: {key} = {v!r} is not {n} integers "
                              f"in [{lo}, {hi}]")
    return v


def build_chain(spec: Any) -> nn.Sequential:
    """The ``nn.Sequential`` a :func:`chain_spec` describes (untrusted: every field checked;
    weights uninitialized until a state_dict is loaded)."""
    if not isinstance(spec, list) or not 1 <= len(spec) <= 1024:
        raise CheckpointError("the export's layer list is malformed; export it again")
    layers: list[nn.Module] = []
    for s in spec:
        if not isinstance(s, dict) or not isinstance(s.get("type"), str):
            raise CheckpointError("the export's layer list is malformed; export it again")
        t = s["type"]
        if t == "linear":
            layers.append(nn.Linear(_int_field(s, "in", 1), _int_field(s, "out", 1),
                                    bias=s.get("bias") is True))
        elif t in _CONVS:
            n = 1 if t == "conv1d" else 2
            layers.append(_CONVS[t](_int_field(s, "in", 1, 65536), _int_field(s, "out", 1, 65536),
                                    _int_list(s, "kernel", n, 1, 64), _int_list(s, "stride", n, 1, 64),
                                    _int_list(s, "padding", n, 0, 64),
                                    _int_list(s, "dilation", n, 1, 64), bias=s.get("bias") is True))
        elif t in _BNS:
            eps = s.get("eps")
            if not isinstance(eps, float) or not 0 < eps < 1:
                raise CheckpointError(f"layer {t}: eps = {eps!r} is out of range")
            layers.append(_BNS[t](_int_field(s, "features", 1), eps=eps,
                                  affine=s.get("affine") is True))
        elif t in _POOLS:
            n = 1 if t.endswith("1d") else 2
            layers.append(_POOLS[t](_int_list(s, "kernel", n, 1, 256),
                                    _int_list(s, "stride", n, 1, 256),
                                    _int_list(s, "padding", n, 0, 128)))
        elif t == "adaptive_avgpool2d":
            layers.append(nn.AdaptiveAvgPool2d(_int_list(s, "output", 2, 1, 4096)))
        elif t == "leaky_relu" or t == "elu":
            key = "slope" if t == "leaky_relu" else "alpha"
            v = s.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise CheckpointError(f"layer {t}: {key} = {v!r} is not a number")
            layers.append(nn.LeakyReLU(float(v)) if t == "leaky_relu" else nn.ELU(float(v)))
        elif t == "select":
            n_in = _int_field(s, "in", 1, 1 << 26)
            count = _int_field(s, "count", 1, n_in)
            layers.append(Select(torch.arange(count), n_in))  # the real index: the state_dict
        elif t in _SIMPLE:
            layers.append(_SIMPLE[t](1) if t == "flatten" else _SIMPLE[t]())
        else:
            raise CheckpointError(f"the export holds a layer of unknown type {t!r}")
    return nn.Sequential(*layers).eval()


def check_select_index(chain: nn.Sequential) -> None:
    """Every Select's index (read from a file) is strictly increasing and within its input."""
    for m in chain:
        if isinstance(m, Select):
            idx = m.index
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m.in_size
                                or bool((idx[1:] <= idx[:-1]).any())):
                raise CheckpointError("the export's input selection is out of range or "
                                      "not increasing; export it again")
