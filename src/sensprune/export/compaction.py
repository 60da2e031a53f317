"""Exact compaction: a pruned network rebuilt as a smaller dense one, with the same outputs.

A unit (a neuron of a Linear layer, a channel of a Conv layer) is removed when
  * no later layer reads it (every outgoing weight is zero), or
  * nothing feeds it (every incoming weight is zero): its output is then its bias, a constant,
    and so is whatever the channel-wise layers after it (BatchNorm in eval mode, activations,
    pooling, flatten) make of it; that constant's contribution is folded into the next
    layer's bias (exactly; only where the next layer adds no zero padding around it).
Inputs no first-layer weight reads are dropped by a ``Select`` in front of the first layer.
The passes repeat until nothing changes (folding can empty the next layer's units in turn).

The network must be a chain (each layer feeds only the next): the model is traced with
``torch.fx`` into ``nn.Sequential`` of standard layers, and the chain is checked to give the
model's outputs before anything is removed. Residual adds and concatenations are not chains:
:func:`compact` refuses them with the reason (:class:`NotCompactable`) and the caller keeps
the model as it is. The output layer's units are the network's outputs and always stay.

The result is a plain ``nn.Sequential`` (Linear, Conv, BatchNorm, activations, pooling,
Flatten, and ``Select``, an index_select), described by ``chain.chain_spec`` as a JSON list so
that an export can rebuild it without pickled code (``chain.build_chain``).
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F



class NotCompactable(ValueError):
    """The model is not a chain of supported layers (the message says where and why)."""


class Select(nn.Module):
    """Keeps the listed entries of dimension 1 (the features or channels a compacted network
    still reads): ``x.index_select(1, index)``."""

    def __init__(self, index: torch.Tensor, in_size: int):
        super().__init__()
        self.in_size = int(in_size)
        self.register_buffer("index", index.to(torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.in_size}"


UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# layers that act on each channel (feature) separately: a unit can be removed across them
CHANNELWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh,
               nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
               nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.Flatten, nn.Identity)
_FUNCTIONS = {
    F.relu: lambda a, k: nn.ReLU(), torch.relu: lambda a, k: nn.ReLU(),
    torch.tanh: lambda a, k: nn.Tanh(), torch.sigmoid: lambda a, k: nn.Sigmoid(),
    F.gelu: lambda a, k: nn.GELU(), F.silu: lambda a, k: nn.SiLU(),
    F.max_pool2d: lambda a, k: nn.MaxPool2d(*a, **k), F.avg_pool2d: lambda a, k: nn.AvgPool2d(*a, **k),
    F.max_pool1d: lambda a, k: nn.MaxPool1d(*a, **k), F.avg_pool1d: lambda a, k: nn.AvgPool1d(*a, **k),
    F.adaptive_avg_pool2d: lambda a, k: nn.AdaptiveAvgPool2d(*a, **k),
    F.dropout: lambda a, k: nn.Identity(), torch.flatten: lambda a, k: _flatten(a, k),
}
_METHODS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _flatten(args, kwargs) -> nn.Module:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    if start != 1 or end != -1:
        raise NotCompactable(f"flatten({start}, {end}) is not a flatten of each sample")
    return nn.Flatten(1)


def to_chain(model: nn.Module, example: torch.Tensor) -> nn.Sequential:
    """The model as ``nn.Sequential`` of standard layers (copies), checked on ``example`` to
    give the model's outputs; raises :class:`NotCompactable` where it is not a chain."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise NotCompactable(f"the model cannot be traced by torch.fx ({type(exc).__name__}: "
                             f"{str(exc)[:80]})") from None
    modules = dict(gm.named_modules())
    aux = {n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("size", "dim")}
    aux |= {n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
            and isinstance(n.args[0], fx.Node) and n.args[0] in aux}
    layers: list[nn.Module] = []
    prev = None
    for node in gm.graph.nodes:
        if node in aux:
            continue
        if node.op == "placeholder":
            if prev is not None:
                raise NotCompactable("the model takes more than one input")
            prev = node
            continue
        inputs = [a for a in node.all_input_nodes if a not in aux]
        if inputs != [prev] or len([u for u in prev.users if u not in aux]) != 1:
            where = node.target if node.op != "output" else "the output"
            raise NotCompactable(f"{where} is not part of a chain (a residual add, a "
                                 "concatenation or a branch): not compacted")
        if node.op == "output":
            break
        layers.append(_as_layer(node, modules))
        prev = node
    chain = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
    chain.eval()
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(example), chain(example)
    finally:
        model.train(was)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
        raise NotCompactable("the traced chain does not reproduce the model's outputs "
                             "(an operation sensprune does not model): not compacted")
    return chain


def _as_layer(node, modules: dict[str, nn.Module]) -> nn.Module:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Dropout):
            return nn.Identity()
        if isinstance(m, UNIT_TYPES) and (isinstance(m, nn.Linear) or m.groups == 1) \
                or isinstance(m, CHANNELWISE):
            return copy.deepcopy(m)
        raise NotCompactable(f"{node.target} ({type(m).__name__}) is a layer compaction does "
                             "not model")
    args = [a for a in node.args[1:]]
    if node.op == "call_function" and node.target in _FUNCTIONS:
        if any(hasattr(a, "op") for a in args) or any(hasattr(v, "op") for v in node.kwargs.values()):
            raise NotCompactable(f"{node.name}: arguments computed at run time")
        return _FUNCTIONS[node.target](args, dict(node.kwargs))
    if node.op == "call_method":
        if node.target in _METHODS and not args:
            return _METHODS[node.target]()
        if node.target == "flatten":
            return _flatten(args, dict(node.kwargs))
        if node.target in ("view", "reshape"):
            return nn.Flatten(1)  # checked with the whole chain (outputs must match)
    raise NotCompactable(f"{node.name} ({node.target}) is an operation compaction does not "
                         "model")


# -- the compaction passes ---------------------------------------------------------------------
def _shapes(chain: nn.Sequential, input_shape) -> list[tuple[int, ...]]:
    """Each layer's input shape for one sample (index i: the input of chain[i])."""
    x = torch.zeros(1, *input_shape)
    shapes = []
    with torch.no_grad():
        for m in chain:
            shapes.append(tuple(x.shape[1:]))
            x = m(x)
    shapes.append(tuple(x.shape[1:]))
    return shapes


def _incoming_alive(m: nn.Module) -> torch.Tensor:
    return (m.weight.detach().flatten(1) != 0).any(1)


def _new_like(m: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None,
              bias: torch.Tensor | None) -> nn.Module:
    """A copy of unit layer ``m`` keeping the output units ``rows`` and input ``cols``."""
    w = m.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    if isinstance(m, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    else:
        cls = type(m)
        new = cls(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                  bias=bias is not None, padding_mode=m.padding_mode)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(w.dtype)


def _slice_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(bn)
    new.num_features = int(keep.sum())
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(new, name, nn.Parameter(p.detach()[keep].clone()))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name)
        if b is not None:
            setattr(new, name, b[keep].clone())
    return new


def _pair_pass(chain: nn.Sequential, p_idx: int, q_idx: int, shapes) -> dict | None:
    """Remove the units of chain[p_idx] that chain[q_idx] (the next unit layer) does not read
    or that are constants (folded into chain[q_idx]'s bias). None: nothing removed."""
    P, Q = chain[p_idx], chain[q_idx]
    units = P.weight.shape[0]
    between = list(chain)[p_idx + 1:q_idx]
    if not all(isinstance(m, CHANNELWISE) for m in between):
        return None
    q_in = Q.weight.shape[1]
    per = q_in // units if isinstance(Q, nn.Linear) else 1
    if per * units != q_in or (not isinstance(Q, nn.Linear) and q_in != units):
        return None  # the layers between do not map units to Q's inputs one to one
    wq = Q.weight.detach()
    reads = (wq.reshape(wq.shape[0], units, -1) != 0).any(2).any(0) if isinstance(Q, nn.Linear) \
        else (wq != 0).flatten(2).any(2).any(0)
    dead_in = ~_incoming_alive(P)
    # the constant each unit becomes downstream when nothing feeds it (its bias)
    z_shape = shapes[p_idx + 1]
    b = P.bias.detach() if P.bias is not None else torch.zeros(units, dtype=P.weight.dtype)
    z = b.view(1, units, *([1] * (len(z_shape) - 1))).expand(1, *z_shape).clone()
    with torch.no_grad():
        v = nn.Sequential(*between).eval()(z)
    v = v.reshape(units, -1)
    constant = (v == v[:, :1]).all(1)
    value = v[:, 0]
    padded = not isinstance(Q, nn.Linear) and any(p != 0 for p in Q.padding)
    foldable = dead_in & constant & (~torch.tensor(padded) | (value == 0))
    remove = ~reads | foldable
    if bool(remove.all()):  # a layer keeps one unit (read as it is, not folded)
        remove[0] = False
    if not bool(remove.any()):
        return None
    fold = remove & reads  # constants someone reads: into Q's bias
    q_bias = Q.bias.detach().clone() if Q.bias is not None else None
    if bool(fold.any()):
        if isinstance(Q, nn.Linear):
            contrib = (wq.reshape(wq.shape[0], units, per)[:, fold] * value[fold].view(1, -1, 1)).sum((1, 2))
        else:
            contrib = (wq[:, fold].flatten(2).sum(2) * value[fold].view(1, -1)).sum(1)
        q_bias = contrib if q_bias is None else q_bias + contrib
    keep = ~remove
    cols = keep.repeat_interleave(per) if isinstance(Q, nn.Linear) else keep
    chain[p_idx] = _new_like(P, keep, None, None if P.bias is None else P.bias.detach()[keep])
    for i in range(p_idx + 1, q_idx):
        if isinstance(chain[i], (nn.BatchNorm1d, nn.BatchNorm2d)):
            chain[i] = _slice_bn(chain[i], keep)
    chain[q_idx] = _new_like(Q, None, cols, q_bias)
    return {"unread": int((~reads).sum()), "constant": int((remove & reads).sum())}


def compact(model: nn.Module, input_shape) -> tuple[nn.Sequential, dict[str, Any]]:
    """(a smaller plain ``nn.Sequential`` with the same outputs, a report). Raises
    :class:`NotCompactable` for a model that is not a chain (keep the model as it is)."""
    input_shape = tuple(int(d) for d in input_shape)
    example = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    chain = to_chain(model, example)
    before = _describe(chain, input_shape)
    removed: dict[int, dict[str, int]] = {}
    for _ in range(64):  # each pass empties at least one unit; folding can cascade
        changed = False
        shapes = _shapes(chain, input_shape)
        idx = [i for i, m in enumerate(chain) if isinstance(m, UNIT_TYPES)]
        for p_idx, q_idx in zip(idx, idx[1:]):
            got = _pair_pass(chain, p_idx, q_idx, shapes)
            if got:
                changed = True
                r = removed.setdefault(p_idx, {"unread": 0, "constant": 0})
                for k in r:
                    r[k] += got[k]
        if not changed:
            break
    idx = [i for i, m in enumerate(chain) if isinstance(m, UNIT_TYPES)]
    selected = None
    if idx:
        first = chain[idx[0]]
        used = (first.weight.detach() != 0).flatten(2).any(2).any(0) if first.weight.dim() > 2 \
            else (first.weight.detach() != 0).any(0)
        if not bool(used.all()) and bool(used.any()):
            selected = int(used.sum())
            chain[idx[0]] = _new_like(first, None, used, None if first.bias is None
                                      else first.bias.detach())
            layers = list(chain)
            layers.insert(idx[0], Select(torch.nonzero(used).flatten(), used.numel()))
            chain = nn.Sequential(*layers)
    chain.eval()
    with torch.no_grad():
        model_was = model.training
        model.eval()
        want = model(example)
        model.train(model_was)
        got = chain(example)
    err = float((want - got).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not err <= 1e-4 * max(1.0, scale):  # a bug here, never the user's: say so loudly
        raise RuntimeError(f"compaction changed the outputs (max difference {err:.3g}); "
                           "please report this model")
    after = _describe(chain, input_shape)
    return chain, {"before": before, "after": after, "inputs_kept": selected,
                   "max_output_difference": err,
                   "removed": {f"{i}": v for i, v in removed.items()}}


def _describe(chain: nn.Sequential, input_shape) -> dict[str, Any]:
    """Unit layers' shapes and multiply-adds per sample (dense, and over nonzero weights)."""
    shapes = _shapes(chain, input_shape)
    layers, macs, nz_macs = [], 0, 0
    for i, m in enumerate(chain):
        if not isinstance(m, UNIT_TYPES):
            continue
        positions = math.prod(shapes[i + 1]) // m.weight.shape[0]  # each weight used this often
        macs += m.weight.numel() * positions
        nz_macs += int(m.weight.count_nonzero()) * positions
        layers.append({"index": i, "type": type(m).__name__, "shape": list(m.weight.shape),
                       "nonzero": int(m.weight.count_nonzero())})
    return {"layers": layers, "macs": macs, "nonzero_macs": nz_macs}
