"""The definition: S(w) = sum_k alpha_k |dy_k/dw| and its options, and the dispatch of each
parameter to its layer's engine (closed form) or to the exact generic path.

Definitions (B samples, C outputs, alpha from ``kind``; a sequence's outputs y_{n,t,k} enter
summed over its kept positions t, see :func:`sensitivity`):
  reduction="sample": S(w) = (1/B) sum_n sum_k alpha_{n,k} |dy_{n,k}/dw|
  reduction="batch":  S(w) = sum_k |(1/B) sum_n alpha_{n,k} dy_{n,k}/dw|
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .engines import parameter_uses
from .engines.batchnorm import BATCHNORM_MODES, frozen_batch_stats, samples_coupled
from .generic import batched_grad, generic_sensitivity
from .inputs import OutputSelector, call_model, model_output
from .recorder import LayerRecorder

KINDS = ("specific", "unspecific")
REDUCTIONS = ("sample", "batch")
OUTPUTS = ("logits", "probs")
# Output rows handled per backward in the fast path (bounds memory for many classes).
ROW_CHUNK = 64


def check_options(kind: str, reduction: str, outputs: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if outputs not in OUTPUTS:
        raise ConfigError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")


IGNORE_INDEX = -100  # PyTorch's cross_entropy convention: positions left out


def alpha_matrix(y: torch.Tensor, targets: torch.Tensor | None, kind: str,
                 output_samples: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The weights alpha of y's entries, y (B, C) or a sequence (B, T, C) (any positions
    between the batch and the classes): one-hot targets (specific) or 1/C (unspecific).

    Sequence targets (B, T) may hold -100 (``IGNORE_INDEX``, padding) at positions to leave
    out; per sample the selected outputs are summed over the kept positions before |.|.
    ``output_samples=K`` (unspecific only) draws K of the C outputs uniformly without
    replacement, each with weight 1/K: an unbiased estimate of the unspecific S at K/C of
    the cost, for networks with many classes."""
    if y.dim() < 2:
        raise ConfigError(
            f"model outputs must have shape (batch, classes) or (batch, positions, classes), "
            f"got {tuple(y.shape)}; select the outputs with output=")
    lead, c = y.shape[:-1], y.shape[-1]
    sequence = y.dim() > 2
    keep = None
    if targets is not None or kind == "specific":
        if targets is None:
            raise ConfigError("kind='specific' needs targets (the correct class of each "
                              "sample); pass targets or use kind='unspecific'")
        targets = torch.as_tensor(targets, device=y.device)
        if tuple(targets.shape) != tuple(lead) or targets.dtype.is_floating_point \
                or targets.dtype == torch.bool:
            raise ConfigError(f"targets must be an integer tensor of shape {tuple(lead)} (the "
                              f"outputs' shape without the classes), got {targets.dtype} "
                              f"{tuple(targets.shape)}")
        keep = targets != IGNORE_INDEX if sequence else None
        valid = targets[keep] if keep is not None else targets
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= c):
            extra = " (or -100 for a position to leave out)" if sequence else ""
            raise ConfigError(f"targets out of range: values must be in [0, {c - 1}]{extra}, "
                              f"got [{int(valid.min())}, {int(valid.max())}]")
    if kind == "unspecific":
        if output_samples is not None and output_samples < 1:
            raise ConfigError(f"output_samples must be >= 1, got {output_samples}")
        if output_samples is None or output_samples >= c:
            alpha = torch.full_like(y, 1.0 / c).detach()
        else:
            pick = torch.randperm(c, generator=generator)[:output_samples].to(y.device)
            alpha = torch.zeros_like(y).detach()
            alpha[..., pick] = 1.0 / output_samples
    else:
        alpha = F.one_hot(targets.long().clamp(min=0), c).to(y.dtype)
    if keep is not None:
        alpha = alpha * keep.unsqueeze(-1).to(alpha.dtype)
    return alpha


def output_rows(alpha: torch.Tensor, kind: str, denom: float):
    """The backward rows of the closed forms: one (alpha itself selects y_{n,t_n}) for the
    specific kind; for the unspecific kind one per output k (alpha_{n,k} is the same for all
    n). Returns (rows: a list of None or class indices, weight per row)."""
    if kind == "specific":
        return [None], 1.0 / denom
    flat = alpha.reshape(-1, alpha.shape[-1])
    ks = torch.nonzero((flat != 0).any(0)).flatten().tolist()
    return ks, (float(flat.max()) if ks else 0.0) / denom


def row_grad_outputs(chunk: list, alpha: torch.Tensor) -> torch.Tensor:
    """The grad_outputs of one chunk of rows: alpha (specific), or for output k the indicator
    of y[..., k] at every kept position."""
    if chunk == [None]:
        return alpha.unsqueeze(0)
    c = alpha.shape[-1]
    flat = alpha.reshape(-1, c)
    idx = torch.tensor(chunk, device=alpha.device)
    go = torch.zeros((len(chunk), flat.shape[0], c), dtype=alpha.dtype, device=alpha.device)
    go[torch.arange(len(chunk), device=alpha.device), :, idx] = (flat[:, idx] != 0).t().to(alpha.dtype)
    return go.reshape(len(chunk), *alpha.shape)


def compute(
    model: nn.Module,
    y: torch.Tensor,
    alpha: torch.Tensor,
    named_params: dict[str, torch.Tensor],
    kind: str,
    reduction: str,
    recorder: LayerRecorder | None = None,
    distributed: bool = False,
    paths: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """S for ``named_params`` given the outputs y (B, C) or (B, T, C) of a forward that is
    still in the autograd graph, and the alpha weights. ``recorder`` enables the engines;
    ``paths``, when given, receives each name's path ("engine" or "generic").

    With ``distributed`` (DDP), y holds this rank's slice of the global batch and the result
    is S of the global batch, identical on every rank."""
    b = y.shape[0]
    denom = float(b)
    if distributed:
        from ..distributed import all_reduce_sum_
        total = torch.tensor([denom], dtype=torch.float64)
        all_reduce_sum_([total])
        denom = float(total)
    result: dict[str, torch.Tensor] = {}
    id_to_name = {id(p): n for n, p in named_params.items()}
    if recorder is not None and reduction == "sample" and not samples_coupled(model) and b > 0:
        result = _engine_sensitivity(y, alpha, kind, denom, recorder, id_to_name)
    rest = [n for n in named_params if n not in result]
    if paths is not None:
        paths.update({n: "generic" if n in rest else "engine" for n in named_params})
    if rest:
        params = [named_params[n] for n in rest]
        for n, s in zip(rest, generic_sensitivity(y, alpha, params, reduction, denom, distributed,
                                                      kind)):
            result[n] = s
    out = {n: result[n].detach().to(named_params[n].dtype) for n in named_params}
    if distributed and reduction == "sample":
        all_reduce_sum_(list(out.values()))  # each rank holds its share of the global mean
    return out


# Per-sample gradients of a tensor with several uses are materialized for this many floats
# at most at once (samples are taken in chunks).
_SHARED_BUDGET = 1 << 24


def _engine_sensitivity(y, alpha, kind, denom, recorder, id_to_name) -> dict[str, torch.Tensor]:
    """S of every wanted parameter the engines cover exactly: one use, |.| of the closed form;
    several uses (tied tensors, layers called twice), the uses' per-sample gradients summed
    before |.|. A parameter the autograd graph uses more often than the engines saw (a tied
    weight also read outside a layer, ``F.linear(h, emb.weight)``) is left to the generic path."""
    b = y.shape[0]
    calls = []  # (module, engine, record): one per usable call of a wanted layer
    for m, (eng, recs) in recorder.usable().items():
        if any(id(p) in id_to_name for p in eng.params(m)):
            calls += [(m, eng, r) for r in recs if eng.batch_size(r) == b]
    if not calls:
        return {}
    uses: dict[int, int] = {}  # graph reads the engines account for
    calls_of: dict[int, int] = {}  # layer calls that use each tensor
    for m, eng, rec in calls:
        for pid, n in eng.graph_uses(m, rec).items():
            uses[pid] = uses.get(pid, 0) + n
            calls_of[pid] = calls_of.get(pid, 0) + 1
    graph_uses = parameter_uses(y)
    exact = {pid for pid, n in uses.items() if graph_uses.get(pid, 0) == n}
    shared = {pid for pid in exact if calls_of[pid] > 1}
    probes, spans = [], []
    for m, eng, rec in calls:
        ps = eng.probes(rec)
        spans.append((m, eng, rec, len(probes), len(ps)))
        probes += ps
    rows, weight = output_rows(alpha, kind, denom)
    result: dict[str, torch.Tensor] = {}
    unsupported: set[int] = set()
    for start in range(0, len(rows), ROW_CHUNK):
        deltas = batched_grad(y, probes, row_grad_outputs(rows[start:start + ROW_CHUNK], alpha))
        per_call = [(m, eng, rec, deltas[first:first + n]) for m, eng, rec, first, n in spans]
        for m, eng, rec, d in per_call:
            if not any(id(p) in exact and id(p) not in shared and id(p) in id_to_name
                       for p in eng.params(m)):
                continue
            for p, s in eng.accumulate(m, rec, d, weight):
                if p is not None and id(p) in id_to_name and id(p) in exact \
                        and id(p) not in shared:
                    name = id_to_name[id(p)]
                    result[name] = s if name not in result else result[name].add_(s)
        wanted = {pid for pid in shared if pid in id_to_name} - unsupported
        if wanted:
            unsupported |= _shared_sensitivity(per_call, wanted, id_to_name, weight, b, result)
    for pid in unsupported:
        result.pop(id_to_name[pid], None)
    return result


def _shared_sensitivity(per_call, wanted: set[int], id_to_name, weight: float, b: int,
                        result: dict) -> set[int]:
    """Add S of the tensors with several uses: per chunk of samples, each use's signed
    per-sample gradient rows (``Engine.per_sample``) summed by key, then |.|. Returns the
    tensors some use's engine cannot give per-sample gradients for (they go generic)."""
    params = {}
    for m, eng, _, _ in per_call:
        for p in eng.params(m):
            if id(p) in wanted:
                params[id(p)] = p
    unsupported: set[int] = set()
    for pid, p in params.items():
        users = [(m, eng, rec, d) for m, eng, rec, d in per_call
                 if any(q is p for q in eng.params(m))]
        k = users[0][3][0].shape[0] if users[0][3] else 1
        rows = p.shape[0] if p.dim() else 1
        chunk = max(1, _SHARED_BUDGET // max(1, k * p.numel()))
        total = torch.zeros((rows, p.numel() // rows), dtype=torch.float32, device=p.device)
        try:
            for s0 in range(0, b, chunk):
                sl = slice(s0, min(b, s0 + chunk))
                keys, values = [], []
                for m, eng, rec, d in users:
                    for q, kq, vq in eng.per_sample(m, rec, d, sl):
                        if q is p:
                            keys.append(kq)
                            values.append(vq.reshape(kq.numel(), -1))
                keys, values = torch.cat(keys), torch.cat(values)
                uniq, inverse = torch.unique(keys, return_inverse=True)
                summed = values.new_zeros(uniq.numel(), values.shape[1]).index_add_(0, inverse, values)
                total.index_add_(0, uniq % rows, summed.abs_())
        except NotImplementedError:
            unsupported.add(pid)
            continue
        name = id_to_name[pid]
        s = total.reshape(p.shape).mul_(weight)
        result[name] = s if name not in result else result[name].add_(s)
    return unsupported


def sensitivity(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    *,
    kind: str = "specific",
    reduction: str = "sample",
    outputs: str = "logits",
    params: Iterable[str] | None = None,
    output_samples: int | None = None,
    generator: torch.Generator | None = None,
    batchnorm: str = "frozen",
    distributed: bool = False,
    output: OutputSelector | None = None,
) -> dict[str, torch.Tensor]:
    """Sensitivity S of the outputs to every parameter that requires grad.

    For B samples with outputs y_n (C classes, or T positions x C classes for a sequence):
        reduction="sample": S(w) = (1/B) sum_n sum_k alpha_{n,k} |d(sum_t y_{n,t,k}) / dw|
        reduction="batch":  S(w) = sum_k |(1/B) sum_n alpha_{n,k} d(sum_t y_{n,t,k}) / dw|
    where the sums over t run over the kept positions (target != -100). Specific: alpha is
    the one-hot target (for a sequence, y_{n,t,target[n,t]} summed over t); unspecific:
    alpha_k = 1/C. A tensor used several times (tied weights, a layer called twice) gets one
    S: per sample, its uses' derivatives are summed before |.|.

    Args:
        model: any ``nn.Module``.
        inputs: a batch of B inputs: a tensor (``model(x)``), a tuple of positional arguments
            or a dict of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``).
        targets: (B,) class indices, or (B, T) for sequence outputs (-100: left out);
            required for ``kind="specific"``.
        kind: ``"specific"`` (alpha = one-hot target) or ``"unspecific"`` (alpha = 1/C).
        reduction: ``"sample"`` (|.| per sample, then mean) or ``"batch"`` (|.| of the mean).
        outputs: ``"logits"`` (y = model output) or ``"probs"`` (y = softmax of it).
        params: restrict to these parameter names (default: all that require grad).
        output_samples: unspecific kind only: an unbiased estimate from K outputs drawn
            uniformly (``generator`` seeds the draw); default: all C outputs, exact.
        batchnorm: BatchNorm layers in training mode: ``"frozen"`` takes the batch statistics
            as constants (:func:`frozen_batch_stats`; per-sample gradients, the fast path)
            or ``"exact"`` differentiates through them (one backward per sample and output).
        distributed: inputs are this rank's slice; return S of the global batch (DDP).
        output: picks the outputs y from what the model returns; by default a tensor as it
            is, a tuple's first element, a dict's or ``ModelOutput``'s ``"logits"``.

    Returns:
        ``{name: S}`` with each S of its parameter's shape. The model's mode, gradients and
        buffers (BatchNorm running statistics) are left as they were.
    """
    check_options(kind, reduction, outputs)
    if batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is not None:
        missing = [n for n in params if n not in named]
        if missing:
            raise ConfigError(f"unknown or frozen parameter(s) {missing}; see "
                              "model.named_parameters()")
        named = {n: named[n] for n in params}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.enable_grad(), frozen_batch_stats(model, batchnorm == "frozen"):
            with LayerRecorder(model, record_layers=reduction == "sample") as rec:
                y = model_output(call_model(model, inputs), output)
            y, alpha = outputs_and_alpha(y, targets, kind, outputs, output_samples, generator)
            return compute(model, y, alpha, named, kind, reduction, rec, distributed=distributed)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                # only what this forward changed: an in-place write to an untouched buffer
                # would break the backward of a training forward that saved it
                if n in buffers and not torch.equal(b, buffers[n]):
                    b.copy_(buffers[n])


def coverage(model: nn.Module, inputs, targets: torch.Tensor | None = None, *,
             kind: str = "specific", params: Iterable[str] | None = None,
             output: OutputSelector | None = None) -> dict[str, str]:
    """Which path computes each parameter's S for this model and batch: ``"engine"`` (a
    closed form by layer type, the fast path) or ``"generic"`` (exact, through one backward
    row per sample). A parameter on the generic path is a layer type without an engine, a
    layer option an engine does not cover, or a tensor used outside its layer."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is not None:
        named = {n: named[n] for n in params}
    paths: dict[str, str] = {}
    with torch.enable_grad(), frozen_batch_stats(model):
        with LayerRecorder(model) as rec:
            y = model_output(call_model(model, inputs), output)
        y, alpha = outputs_and_alpha(y, targets, kind, "logits")
        compute(model, y, alpha, named, kind, "sample", rec, paths=paths)
    return paths


def outputs_and_alpha(logits: torch.Tensor, targets, kind: str, outputs: str,
                      output_samples: int | None = None, generator=None):
    """y (float32: under autocast alpha, softmax and S are float32) and its alpha weights."""
    logits = logits.float()
    y = torch.softmax(logits, dim=-1) if outputs == "probs" else logits
    return y, alpha_matrix(y, targets, kind, output_samples, generator)
