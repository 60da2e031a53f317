"""The definition: S(w) = sum_k alpha_k |dy_k/dw| and its options, and the dispatch of each
parameter to its layer's engine (closed form) or to the exact generic path.

Definitions (B samples, C outputs, alpha from ``kind``):
  reduction="sample": S(w) = (1/B) sum_n sum_k alpha_{n,k} |dy_{n,k}/dw|
  reduction="batch":  S(w) = sum_k |(1/B) sum_n alpha_{n,k} dy_{n,k}/dw|
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .engines.batchnorm import BATCHNORM_MODES, frozen_batch_stats, samples_coupled
from .generic import batched_grad, generic_sensitivity
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


def alpha_matrix(y: torch.Tensor, targets: torch.Tensor | None, kind: str,
                 output_samples: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The (B, C) weights alpha_{n,k}: one-hot targets (specific) or 1/C (unspecific).

    ``output_samples=K`` (unspecific only) draws K of the C outputs uniformly without
    replacement, each with weight 1/K: an unbiased estimate of the unspecific S at K/C of
    the cost, for networks with many classes."""
    if y.dim() != 2:
        raise ConfigError(
            f"model outputs must have shape (batch, classes), got {tuple(y.shape)}; "
            "flatten or select the classification outputs before computing the sensitivity"
        )
    b, c = y.shape
    if kind == "unspecific":
        if output_samples is None or output_samples >= c:
            return torch.full_like(y, 1.0 / c).detach()
        if output_samples < 1:
            raise ConfigError(f"output_samples must be >= 1, got {output_samples}")
        pick = torch.randperm(c, generator=generator)[:output_samples].to(y.device)
        alpha = torch.zeros_like(y).detach()
        alpha[:, pick] = 1.0 / output_samples
        return alpha
    if targets is None:
        raise ConfigError("kind='specific' needs targets (the correct class of each sample); "
                          "pass targets or use kind='unspecific'")
    targets = torch.as_tensor(targets, device=y.device)
    if targets.shape != (b,) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ConfigError(f"targets must be an integer tensor of shape ({b},), "
                          f"got {targets.dtype} {tuple(targets.shape)}")
    if b and (int(targets.min()) < 0 or int(targets.max()) >= c):
        raise ConfigError(f"targets out of range: values must be in [0, {c - 1}], "
                          f"got [{int(targets.min())}, {int(targets.max())}]")
    return F.one_hot(targets.long(), c).to(y.dtype)

def output_rows(alpha: torch.Tensor, kind: str, denom: float):
    """The backward rows of the closed forms: one (alpha itself selects y_{n,t_n}) for the
    specific kind; for the unspecific kind one per output k (alpha_{n,k} is the same for all
    n). Returns (rows: a list of None or class indices, weight per row)."""
    if kind == "specific":
        return [None], 1.0 / denom
    ks = torch.nonzero(alpha[0] != 0).flatten().tolist()
    return ks, float(alpha[0, ks[0]]) / denom


def row_grad_outputs(chunk: list, alpha: torch.Tensor) -> torch.Tensor:
    if chunk == [None]:
        return alpha.unsqueeze(0)
    b, c = alpha.shape
    go = torch.zeros((len(chunk), b, c), dtype=alpha.dtype, device=alpha.device)
    go[torch.arange(len(chunk)), :, torch.tensor(chunk)] = 1.0
    return go


def compute(
    model: nn.Module,
    y: torch.Tensor,
    alpha: torch.Tensor,
    named_params: dict[str, torch.Tensor],
    kind: str,
    reduction: str,
    recorder: LayerRecorder | None = None,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """S for ``named_params`` given the outputs y (B, C) of a forward that is still in the
    autograd graph, and the alpha weights. ``recorder`` enables the engines.

    With ``distributed`` (DDP), y holds this rank's slice of the global batch and the result
    is S of the global batch, identical on every rank."""
    b, c = y.shape
    denom = float(b)
    if distributed:
        from ..distributed import all_reduce_sum_
        total = torch.tensor([denom], dtype=torch.float64)
        all_reduce_sum_([total])
        denom = float(total)
    result: dict[str, torch.Tensor] = {}
    id_to_name = {id(p): n for n, p in named_params.items()}
    if recorder is not None and reduction == "sample" and not samples_coupled(model) and b > 0:
        layers = [(m, eng, rec) for m, (eng, rec) in recorder.usable().items()
                  if any(id(p) in id_to_name for p in m.parameters(recurse=False))]
        probes, spans = [], []
        for m, eng, rec in layers:
            ps = eng.probes(rec)
            spans.append((m, eng, rec, len(probes), len(ps)))
            probes += ps
        rows, weight = output_rows(alpha, kind, denom) if layers else ([], 0.0)
        for start in range(0, len(rows), ROW_CHUNK):
            deltas = batched_grad(y, probes, row_grad_outputs(rows[start:start + ROW_CHUNK], alpha))
            for m, eng, rec, first, n in spans:
                for p, s in eng.accumulate(m, rec, deltas[first:first + n], weight):
                    if p is not None and id(p) in id_to_name:
                        name = id_to_name[id(p)]
                        result[name] = s if name not in result else result[name].add_(s)
    rest = [n for n in named_params if n not in result]
    if rest:
        params = [named_params[n] for n in rest]
        for n, s in zip(rest, generic_sensitivity(y, alpha, params, reduction, denom, distributed)):
            result[n] = s
    out = {n: result[n].detach().to(named_params[n].dtype) for n in named_params}
    if distributed and reduction == "sample":
        all_reduce_sum_(list(out.values()))  # each rank holds its share of the global mean
    return out


def sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
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
) -> dict[str, torch.Tensor]:
    """Sensitivity S of the outputs to every parameter that requires grad.

    Args:
        model: any ``nn.Module`` whose forward maps ``inputs`` to (B, C) outputs.
        inputs: a batch of B inputs.
        targets: (B,) class indices; required for ``kind="specific"``.
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
                logits = model(inputs)
            logits = logits.float()  # under autocast: alpha, softmax and S in float32
            y = torch.softmax(logits, dim=-1) if outputs == "probs" and logits.dim() == 2 else logits
            alpha = alpha_matrix(y, targets, kind, output_samples, generator)
            return compute(model, y, alpha, named, kind, reduction, rec, distributed=distributed)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                # only what this forward changed: an in-place write to an untouched buffer
                # would break the backward of a training forward that saved it
                if n in buffers and not torch.equal(b, buffers[n]):
                    b.copy_(buffers[n])


