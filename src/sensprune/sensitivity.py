"""Sensitivity of the network outputs to each parameter: S(w) = sum_k alpha_k |dy_k/dw|.

This module owns one thing: computing S exactly, fast where the layer type allows it.

Definitions (B samples, C outputs, alpha from ``kind``):
  reduction="sample": S(w) = (1/B) sum_n sum_k alpha_{n,k} |dy_{n,k}/dw|
  reduction="batch":  S(w) = sum_k |(1/B) sum_n alpha_{n,k} dy_{n,k}/dw|

Two engines, both exact:
  * fast path (reduction="sample", samples independent): temporary forward hooks record each
    Linear/Conv layer's input a and output z. One backward of the alpha-weighted outputs to
    the z's (C backwards, vmapped, for the unspecific kind) gives delta = dy/dz per sample;
    the per-sample weight gradient is delta a^T, so for a Linear layer
    sum_n |delta_n a_n^T| = |Delta|^T |A| is a single matmul. Conv layers use unfold + bmm or
    one grouped weight-gradient convolution, whichever is faster for the layer's shapes.
    nn.LSTM (unidirectional, no projection) runs unrolled inside the recorded forward, with
    a zero probe added to each step's gate pre-activations: the derivative to the probe is
    delta_t per sample and step, and the per-sample weight gradient sum_t delta_t a_t^T (a_t
    the step's input or previous hidden state) is one bmm, as for a Linear layer over a
    sequence.
  * generic path (torch.autograd with ``is_grads_batched``): one vmapped backward per
    (sample, output) row, chunked to bound memory. Used for every parameter the fast path
    does not cover (GRU, Embedding, normalization) and whenever samples are coupled
    (BatchNorm in training mode), and for reduction="batch".
The hooks live only for the duration of one forward; the user's model is never modified.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

KINDS = ("specific", "unspecific")
REDUCTIONS = ("sample", "batch")
OUTPUTS = ("logits", "probs")

# Upper bound on floats materialized at once by the generic engine (rows x parameters).
_GENERIC_BUDGET = 1 << 25
# Per-sample conv gradients are summed chunk by chunk; small chunks stay in cache.
_CONV_CHUNK_FLOATS = 1 << 20
# Up to this many backward rows, a loop of plain backward passes beats the vmapped one (measured
# on LeNet-300 and LeNet-5: max-pool and conv backward have no fast batching rule).
_LOOP_ROWS = 32
# Output rows handled per backward in the fast path (bounds memory for many classes).
_ROW_CHUNK = 64


def check_options(kind: str, reduction: str, outputs: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if outputs not in OUTPUTS:
        raise ConfigError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")


class LayerRecorder(contextlib.AbstractContextManager):
    """Records (input, output) of Linear/Conv layers and the model's output during one forward.

    The hooks are removed on exit. A layer called more than once, or whose output was later
    modified in place, is marked unusable for the fast path (its parameters go generic).
    """

    FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def __init__(self, model: nn.Module, record_layers: bool = True):
        self.model = model
        self.record_layers = record_layers
        self.calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.lstm_calls: dict[nn.Module, list[list[tuple]]] = {}
        self.output: torch.Tensor | None = None
        self.n_forward = 0
        self._handles: list = []

    def __enter__(self):
        if self.record_layers:
            for mod in self.model.modules():
                if isinstance(mod, self.FAST_TYPES) and _fast_supported(mod):
                    self._handles.append(mod.register_forward_hook(self._layer_hook))
                elif isinstance(mod, nn.LSTM) and _lstm_supported(mod):
                    self._handles.append(mod.register_forward_hook(self._lstm_hook))
        self._handles.append(self.model.register_forward_hook(self._root_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _layer_hook(self, mod, inputs, output):
        if torch.is_tensor(output) and output.requires_grad:
            self.calls.setdefault(mod, []).append((inputs[0].detach(), output, output._version))

    def _lstm_hook(self, mod, inputs, output):
        """Recompute the LSTM unrolled, with gate probes, and return that output instead:
        the same values, with the per-step gate derivatives reachable by autograd."""
        x = inputs[0]
        if not torch.is_tensor(x) or x.dim() != 3 or not torch.is_grad_enabled():
            return None  # a PackedSequence or an unbatched input: the generic engine
        hx = inputs[1] if len(inputs) > 1 else None
        out, state, records = _lstm_unrolled(mod, x, hx)
        self.lstm_calls.setdefault(mod, []).append(records)
        return out, state

    def _root_hook(self, mod, inputs, output):
        self.n_forward += 1
        self.inputs = inputs
        self.output = output

    def usable(self) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Layers recorded exactly once whose output tensor was not modified in place."""
        return {
            m: (c[0][0], c[0][1])
            for m, c in self.calls.items()
            if len(c) == 1 and c[0][1]._version == c[0][2]
        }

    def usable_lstms(self) -> dict[nn.Module, list[tuple]]:
        """LSTMs called exactly once: per layer (index, inputs, previous hidden states, probe)."""
        return {m: c[0] for m, c in self.lstm_calls.items() if len(c) == 1}


def _lstm_supported(mod: nn.LSTM) -> bool:
    return (not mod.bidirectional and mod.proj_size == 0
            and (mod.num_layers == 1 or mod.dropout == 0 or not mod.training))


def _lstm_unrolled(mod: nn.LSTM, x: torch.Tensor, hx=None):
    """nn.LSTM's forward written out step by step (gate order i, f, g, o, as PyTorch's), with
    a zero probe (B, T, 4H) added to the gate pre-activations of each layer. Returns the
    output, (h_n, c_n), and per layer (index, layer input (B, T, I), previous hidden states
    (B, T, H), probe)."""
    if not mod.batch_first:
        x = x.transpose(0, 1)
    b, t_len, _ = x.shape
    h_size, layers = mod.hidden_size, mod.num_layers
    if hx is None:
        zeros = x.new_zeros(layers, b, h_size)
        hx = (zeros, zeros)
    h0, c0 = hx
    layer_in, records, h_last, c_last = x, [], [], []
    for layer in range(layers):
        w_ih, w_hh = getattr(mod, f"weight_ih_l{layer}"), getattr(mod, f"weight_hh_l{layer}")
        # the input part of every step at once, both biases folded in; the probe added once
        # (its derivative is that of every step's gate pre-activations)
        bias = (getattr(mod, f"bias_ih_l{layer}") + getattr(mod, f"bias_hh_l{layer}")
                if mod.bias else None)
        gx = F.linear(layer_in, w_ih, bias)
        probe = torch.zeros(gx.shape, dtype=gx.dtype, device=gx.device, requires_grad=True)
        gx = gx + probe
        w_hh_t = w_hh.t()
        h, c = h0[layer].to(gx.dtype), c0[layer]
        outs, prev = [], []
        for step in range(t_len):  # few, fused ops per step: the loop's cost is per op
            prev.append(h)
            g = torch.addmm(gx[:, step], h, w_hh_t)
            i, f, _, o = g.sigmoid().chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g[:, 2 * h_size:3 * h_size].tanh())
            h = o * c.tanh()
            outs.append(h)
        out = torch.stack(outs, dim=1)
        records.append((layer, layer_in.detach(), torch.stack(prev, dim=1).detach(), probe))
        h_last.append(h)
        c_last.append(c)
        layer_in = out
        if mod.dropout and mod.training and layer < layers - 1:
            layer_in = F.dropout(out, mod.dropout)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    return out, (torch.stack(h_last), torch.stack(c_last)), records


def _fast_supported(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return (
        mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


BATCHNORM_MODES = ("frozen", "exact")


@contextlib.contextmanager
def frozen_batch_stats(model: nn.Module, enabled: bool = True):
    """Inside, every BatchNorm layer in training mode normalizes with the statistics of the
    current batch taken as constants: it runs in eval mode, and just before it runs its
    running statistics are set to its input's batch mean and (biased) variance. The forward
    values are those of training mode; only the gradient paths through the batch statistics
    are cut, so samples are independent and per-sample gradients are well defined (what
    per-sample-gradient libraries do for normalization). Modes and buffers are restored on
    exit. Layers without running statistics stay as they are (coupled)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats] if enabled else []
    saved = [(m, m.running_mean, m.running_var) for m in layers]

    def set_batch_stats(mod, inputs):
        x = inputs[0].detach().float()
        dims = [0] + list(range(2, x.dim()))
        # two passes (mean, then mean of squared deviations): as exact as torch.var and
        # 5x faster on CPU, where var's single-pass kernel was 13% of a ResNet-32 step
        mean = x.mean(dims, keepdim=True)
        dev = x - mean
        mod.running_mean = mean.flatten().to(mod.running_mean.dtype)
        mod.running_var = dev.mul_(dev).mean(dims).to(mod.running_var.dtype)

    handles = [m.register_forward_pre_hook(set_batch_stats) for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, mean, var in saved:
            m.running_mean, m.running_var = mean, var
            m.train()


def samples_coupled(model: nn.Module) -> bool:
    """True when one sample's output depends on other samples (BatchNorm using batch stats)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or not m.track_running_stats:
                return True
    return False


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


def _batched_grad(y, inputs, grad_outputs):
    """Vector-Jacobian products for a stack of grad_outputs (R, *y.shape), one per row.

    A loop of plain backward passes for a few rows; autograd's vmapped backward for many
    (with the loop as fallback where an op has no batching rule).
    Unused inputs get zeros.
    """
    grads = None
    if grad_outputs.shape[0] > _LOOP_ROWS:
        try:
            grads = torch.autograd.grad(y, inputs, grad_outputs, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            grads = None
    if grads is None:
        rows = [torch.autograd.grad(y, inputs, g, retain_graph=True, allow_unused=True)
                for g in grad_outputs]
        # one row (the specific kind): a view, not a copy of every layer's output gradient
        stack = (lambda ts: ts[0].unsqueeze(0)) if len(rows) == 1 else torch.stack
        grads = tuple(None if rows[0][i] is None else stack([r[i] for r in rows])
                      for i in range(len(inputs)))
    r = grad_outputs.shape[0]
    return [torch.zeros((r,) + t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, inputs)]


def _generic(y, alpha, params: list[torch.Tensor], reduction: str, denom: float,
             distributed: bool = False) -> list[torch.Tensor]:
    """Exact S for any parameter through per-row backward passes (rows chunked).

    ``denom`` is the global batch size. With ``distributed``, the batch reduction sums each
    chunk of per-class gradients over ranks before taking |.| (the sample reduction is summed
    over ranks by the caller)."""
    b, c = y.shape
    out = [torch.zeros_like(p) for p in params]
    if not params:
        return out
    if reduction == "batch":
        # Row k: d/dw (1/B) sum_n alpha_{n,k} y_{n,k}; S = sum_k |row_k|. Every rank must run
        # the same rows, so in DDP all classes are rows, present locally or not.
        ks = [k for k in range(c) if distributed or bool(alpha[:, k].any())]
        rows = []
        for k in ks:
            g = torch.zeros_like(y)
            g[:, k] = alpha[:, k] / denom
            rows.append(g)
        weights = [1.0] * len(rows)
    else:
        # Row (n, k): dy_{n,k}/dw with weight alpha_{n,k} / B.
        nz = alpha.nonzero(as_tuple=False)
        rows, weights = [], []
        for n, k in nz.tolist():
            g = torch.zeros_like(y)
            g[n, k] = 1.0
            rows.append(g)
            weights.append(float(alpha[n, k]) / denom)
    numel = sum(p.numel() for p in params)
    chunk = max(1, min(max(len(rows), 1), _GENERIC_BUDGET // max(numel, 1)))
    for start in range(0, len(rows), chunk):
        go = torch.stack(rows[start:start + chunk])
        w = torch.tensor(weights[start:start + chunk], dtype=y.dtype, device=y.device)
        grads = _batched_grad(y, params, go)
        if distributed and reduction == "batch":
            from .distributed import all_reduce_sum_
            all_reduce_sum_(grads)
        for acc, g in zip(out, grads):
            acc += torch.tensordot(w, g.abs(), dims=1)
    return out


def _fast_layer(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    """S of (weight, bias) of one Linear/Conv layer from its input a (B, ...) and the
    output derivatives delta (K, B, ...) of K output rows, each scaled by ``weight``."""
    k, b = delta.shape[:2]
    # under autocast a and delta are bf16/fp16: S is accumulated in float32
    a, delta = a.float(), delta.float()
    if isinstance(mod, nn.Linear):
        a = a.reshape(b, -1, a.shape[-1])
        d = delta.reshape(k, b, -1, delta.shape[-1])
        if a.shape[1] == 1:
            # Per-sample gradient is rank one: sum_n |d_n a_n^T| = (sum_k |d|)^T |a|.
            dsum = d[:, :, 0].abs().sum(0).mul_(weight)  # scale the small operand
            return dsum.t().mm(a[:, 0].abs()), dsum.sum(0)
        return _sequence_linear(a, d, weight)
    engine = _conv_engine(mod, a, delta, weight)
    return engine(mod, a, delta, weight)


def _sequence_linear(a: torch.Tensor, d: torch.Tensor, weight: float):
    """S of a weight W (out, in) used at every step t of a sequence, z_t = W a_t (+ b): the
    per-sample gradient is sum_t d_t a_t^T, one bmm over all K rows. a: (B, T, in), d: (K, B,
    T, out). Returns S of W and of the bias."""
    k, b, _, out = d.shape
    dk = d.permute(1, 0, 3, 2).reshape(b, k * out, -1)  # (B, K*out, T)
    s_w = torch.bmm(dk, a).abs_().sum(0).reshape(k, out, -1).sum(0)
    s_b = d.sum(2).abs_().sum((0, 1))
    return s_w.mul_(weight), s_b.mul_(weight)


def _conv_unfold(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    """Per-sample conv gradients as unfold + bmm (the im2col form, as per-sample-gradient
    libraries compute them), |.| and summed chunk by chunk."""
    k, b = delta.shape[:2]
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(2)
        ks, st, pd, dl = ((1, mod.kernel_size[0]), (1, mod.stride[0]),
                          (0, mod.padding[0]), (1, mod.dilation[0]))
    else:
        ks, st, pd, dl = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    cols_t = F.unfold(a, ks, dilation=dl, padding=pd, stride=st).transpose(1, 2)  # (B, P, Cin*kk)
    o = mod.out_channels
    d = delta.reshape(k, b, o, -1)  # (K, B, O, P)
    # Per-sample gradient of each row is d (O, P) @ cols (P, Cin*kk): one bmm per chunk of
    # samples with all K rows stacked, abs, then summed (bounded memory).
    s_w = torch.zeros(o, cols_t.shape[2], dtype=a.dtype, device=a.device)
    chunk = max(1, _CONV_CHUNK_FLOATS // max(1, k * o * cols_t.shape[2]))
    for start in range(0, b, chunk):
        dk = d[:, start:start + chunk].transpose(0, 1).reshape(-1, k * o, d.shape[-1])
        g = torch.bmm(dk, cols_t[start:start + chunk]).abs_()
        s_w += g.reshape(-1, k, o, cols_t.shape[2]).sum((0, 1))
    s_b = d.sum(-1).abs_().sum((0, 1))
    return s_w.reshape(mod.weight.shape).mul_(weight), s_b.mul_(weight)


def _conv_grouped(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    """Per-sample conv gradients as one grouped weight-gradient convolution: the samples of a
    chunk become groups (input (1, n*Cin, ...), grad_output (1, n*K*O, ...), groups=n), so
    the conv backward kernel itself computes every per-sample gradient."""
    k, b = delta.shape[:2]
    o, wshape = mod.out_channels, mod.weight.shape
    weight_grad = (torch.nn.grad.conv1d_weight if isinstance(mod, nn.Conv1d)
                   else torch.nn.grad.conv2d_weight)
    s_w = torch.zeros(wshape, dtype=a.dtype, device=a.device)
    chunk = max(1, 4 * _CONV_CHUNK_FLOATS // max(1, k * wshape.numel()))
    for start in range(0, b, chunk):
        x, d = a[start:start + chunk], delta[:, start:start + chunk]
        n = x.shape[0]
        g = weight_grad(x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * k * o, *wshape[1:]),
                        d.transpose(0, 1).reshape(1, n * k * o, *d.shape[3:]),
                        stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=n)
        s_w += g.abs_().reshape(n * k, *wshape).sum(0)
    s_b = delta.flatten(3).sum(-1).abs_().sum((0, 1))
    return s_w.mul_(weight), s_b.mul_(weight)


# Which of the two exact engines is faster (benchmarks/conv_engines.py, this 2-core CPU, one
# thread, results/conv_engines.json): with one output row (the specific kind) the grouped
# convolution, on every ResNet-32 and LeNet-5 layer shape (1.5-6x); with ten rows (the
# unspecific kind) mostly unfold. A fixed rule rather than a timing at run time: the choice,
# and so every bit of S, is the same in every process (resumed runs, DDP ranks).
def _conv_engine(mod: nn.Module, a: torch.Tensor, delta: torch.Tensor, weight: float):
    return _conv_grouped if delta.shape[0] == 1 else _conv_unfold


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
    autograd graph, and the alpha weights. ``recorder`` enables the fast path.

    With ``distributed`` (DDP), y holds this rank's slice of the global batch and the result
    is S of the global batch, identical on every rank."""
    b, c = y.shape
    denom = float(b)
    if distributed:
        from .distributed import all_reduce_sum_
        total = torch.tensor([denom], dtype=torch.float64)
        all_reduce_sum_([total])
        denom = float(total)
    result: dict[str, torch.Tensor] = {}
    id_to_name = {id(p): n for n, p in named_params.items()}
    fast_ok = (recorder is not None and reduction == "sample" and not samples_coupled(model))
    if fast_ok and b > 0:
        layers = {m: r for m, r in recorder.usable().items()
                  if any(id(p) in id_to_name for p in m.parameters(recurse=False))}
        lstm_layers = [(m, rec) for m, recs in recorder.usable_lstms().items()
                       if any(id(p) in id_to_name for p in m.parameters(recurse=False))
                       for rec in recs]
        if layers or lstm_layers:
            if kind == "specific":
                # one backward: alpha itself selects y_{n, t_n}
                out_rows, weight = [None], 1.0 / denom
            else:
                # unspecific: one backward per output k (alpha_{n,k} is the same for all n),
                # in chunks so that C = 1000 outputs never materialize at once
                ks = torch.nonzero(alpha[0] != 0).flatten().tolist()
                out_rows, weight = ks, float(alpha[0, ks[0]]) / denom
            mods = list(layers)
            zs = [layers[m][1] for m in mods] + [rec[3] for _, rec in lstm_layers]
            for start in range(0, len(out_rows), _ROW_CHUNK):
                chunk = out_rows[start:start + _ROW_CHUNK]
                if chunk == [None]:
                    go = alpha.unsqueeze(0)
                else:
                    go = torch.zeros((len(chunk), b, c), dtype=y.dtype, device=y.device)
                    go[torch.arange(len(chunk)), :, torch.tensor(chunk)] = 1.0
                deltas = _batched_grad(y, zs, go)
                found = []
                for m, delta in zip(mods, deltas):
                    s_w, s_b = _fast_layer(m, layers[m][0], delta, weight)
                    found += [(getattr(m, "weight", None), s_w), (getattr(m, "bias", None), s_b)]
                for (m, (layer, a_in, h_prev, _)), delta in zip(lstm_layers, deltas[len(mods):]):
                    delta = delta.float()
                    s_ih, s_bias = _sequence_linear(a_in.float(), delta, weight)
                    s_hh, _ = _sequence_linear(h_prev.float(), delta, weight)
                    found += [(getattr(m, f"weight_ih_l{layer}"), s_ih),
                              (getattr(m, f"weight_hh_l{layer}"), s_hh)]
                    if m.bias:  # b_ih and b_hh enter every gate the same way
                        found += [(getattr(m, f"bias_ih_l{layer}"), s_bias),
                                  (getattr(m, f"bias_hh_l{layer}"), s_bias.clone())]
                for p, s in found:
                    if p is not None and id(p) in id_to_name:
                        n = id_to_name[id(p)]
                        result[n] = s if n not in result else result[n].add_(s)
    rest = [n for n in named_params if n not in result]
    if rest:
        params = [named_params[n] for n in rest]
        for n, s in zip(rest, _generic(y, alpha, params, reduction, denom, distributed)):
            result[n] = s
    out = {n: result[n].detach().to(named_params[n].dtype) for n in named_params}
    if distributed and reduction == "sample":
        all_reduce_sum_(list(out.values()))  # each rank holds its share of the global mean
    return out


def _select(model: nn.Module, params: Iterable[str] | None) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is None:
        return named
    missing = [n for n in params if n not in named]
    if missing:
        raise ConfigError(f"unknown or frozen parameter(s) {missing}; see model.named_parameters()")
    return {n: named[n] for n in params}


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
    named = _select(model, params)
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


def unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv layers whose output units (neurons, channels) can be regularized as
    groups, by name, in definition order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LayerRecorder.FAST_TYPES) and m.weight.requires_grad}


def unit_sensitivity_from(y: torch.Tensor, alpha: torch.Tensor, recorder: LayerRecorder,
                          layers: dict[str, nn.Module], kind: str,
                          distributed: bool = False) -> dict[str, torch.Tensor]:
    """Neuron-level sensitivity (SeReNe) of every recorded layer in ``layers``: for each output
    unit n (a neuron, or a channel whose map holds P positions),
        S_n = (1/B) sum_i sum_k alpha_{i,k} sum_p |dy_{i,k} / dz_{i,n,p}|,
    z being the layer's output (before any activation). One backward (specific kind) or one
    per output (unspecific) gives every layer's dy/dz at once."""
    usable = recorder.usable()
    names = [n for n, m in layers.items() if m in usable]
    if not names:
        return {}
    zs = [usable[layers[n]][1] for n in names]
    b, c = y.shape
    denom = float(b)
    if kind == "specific":
        rows, weight = alpha.unsqueeze(0), 1.0
    else:
        ks = torch.nonzero(alpha[0] != 0).flatten()
        rows = torch.zeros((len(ks), b, c), dtype=y.dtype, device=y.device)
        rows[torch.arange(len(ks)), :, ks] = 1.0
        weight = float(alpha[0, ks[0]])
    out = [torch.zeros(z.shape[1], dtype=torch.float32, device=z.device) for z in zs]
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        deltas = _batched_grad(y, zs, rows[start:start + _ROW_CHUNK])
        for acc, d in zip(out, deltas):  # d: (R, B, units, *positions)
            acc += d.float().abs().transpose(0, 2).reshape(d.shape[2], -1).sum(1)
    if distributed:
        from .distributed import all_reduce_sum_
        total = torch.tensor([denom], dtype=torch.float64)
        all_reduce_sum_([total] + out)
        denom = float(total)
    return {n: s.mul_(weight / denom) for n, s in zip(names, out)}


def unit_sensitivity(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                     *, kind: str = "specific") -> dict[str, torch.Tensor]:
    """Neuron-level sensitivity S_n of every Linear/Conv layer's output units, by layer name
    (see :func:`unit_sensitivity_from`). Samples must be independent (no BatchNorm in
    training mode)."""
    check_options(kind, "sample", "logits")
    if samples_coupled(model):
        raise ConfigError("unit_sensitivity needs independent samples: put BatchNorm layers "
                          "in eval mode (model.eval()) first")
    with torch.enable_grad():
        with LayerRecorder(model) as rec:
            y = model(inputs).float()
        alpha = alpha_matrix(y, targets, kind)
        return unit_sensitivity_from(y, alpha, rec, unit_layers(model), kind)
