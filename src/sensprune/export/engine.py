"""The inference engine of a compacted chain: each layer's kernel chosen by measurement, and
the chain run in one pass with no module dispatch between layers.

Kernels (all exact: the same sums as the plain layers, in another order):
  dense      ``F.linear`` on (batch, features) rows, or ``addmm`` on the feature-major
             (features, batch) layout, where a previous kernel left it
  csr        a Linear layer's nonzeros in CSR, multiplied by ``torch.embedding_bag`` (one bag
             per output unit: the sum of its inputs' rows weighted by the nonzeros) on the
             feature-major layout; it reads a Select's inputs in place (below 30% density)
  pool2      a 2x2 max pooling as two elementwise maxima of strided views (torch's CPU
             max_pool2d kernel is ~8x slower on one thread)
  module     the layer's own forward, for everything else
  vector     at batch size 1, a chain of Flatten, Select, Linear and elementwise layers run
             on one 1-D activation (``addmv``, ``index_select``): per call, torch's 2-D
             matrix path costs more than the small products themselves (timed against the
             layer-by-layer plan; the faster is kept)
A layout change costs one transpose (numpy's, about twice as fast as torch's on the CPU).
The timing (``interleaved_medians``) is shared with ``inference`` and the benchmarks.
"""

from __future__ import annotations

import math

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .chain import _ints
from .compaction import Select

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
               nn.Identity)
_ROUNDS = 15
CSR_MAX_DENSITY = 0.3  # above it a dense GEMM always won here: CSR is not a candidate
_BUDGET_S = 5.0  # planning a larger batch size that would take longer is skipped


def interleaved_medians(fns: dict, x, rounds: int = 15,
                        inner: int | dict = 10) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds (machine
    noise hits every candidate alike); ``inner``: calls per round, or a count per function."""
    times = {k: [] for k in fns}
    counts = inner if isinstance(inner, dict) else dict.fromkeys(fns, inner)
    with torch.inference_mode():
        for f in fns.values():
            for _ in range(3):
                f(x)
        for _ in range(rounds):
            for k, f in fns.items():
                n = counts[k]
                t0 = time.perf_counter()
                for _ in range(n):
                    f(x)
                times[k].append((time.perf_counter() - t0) / n)
    return {k: float(np.median(v)) for k, v in times.items()}


def budgeted_medians(fns: dict, x, rounds: int = 15) -> dict[str, float]:
    """:func:`interleaved_medians` with fewer rounds where one call is slow (about 50 ms of
    timing per candidate at most, 3 rounds at least): what planning at load can afford."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        next(iter(fns.values()))(x)
        once = time.perf_counter() - t0
    inner = 5 if once < 1e-3 else 1
    rounds = max(3, min(rounds, int(0.05 / max(once * inner, 1e-9))))
    return interleaved_medians(fns, x, rounds, inner)


def feature_major(x: torch.Tensor) -> torch.Tensor:
    """(batch, features) -> contiguous (features, batch), and back (the same operation)."""
    xt = x.t()
    if xt.is_contiguous():
        return xt
    if (x.numel() >= 4096 and x.device.type == "cpu" and not x.requires_grad
            and x.dtype in (torch.float32, torch.float64)):  # numpy's call costs ~4 us
        return torch.from_numpy(np.ascontiguousarray(x.numpy().T))
    return xt.contiguous()


def csr_arrays(weight: torch.Tensor, index: torch.Tensor | None = None):
    """(column indices, row offsets, values) of a weight's nonzeros, row by row; with ``index``
    the columns are those of the input before that selection. (Built from ``nonzero``:
    ``to_sparse_csr`` takes seconds on a large dense matrix.)"""
    w = weight.detach()
    rows, cols = w.nonzero(as_tuple=True)  # row-major order
    values = w[rows, cols]
    counts = torch.bincount(rows, minlength=w.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    if index is not None:
        cols = index.to(torch.int64)[cols]
    return cols.contiguous(), offsets.contiguous(), values.contiguous()


def csr_matmul(xt: torch.Tensor, col: torch.Tensor, offsets: torch.Tensor,
               values: torch.Tensor) -> torch.Tensor:
    """W xt for W in CSR and xt feature-major (in, batch): (out, batch)."""
    if col.numel() == 0:
        return xt.new_zeros(offsets.numel(), xt.shape[1])
    return torch.embedding_bag(xt, col, offsets, False, 0, False, values)[0]


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` (floor mode) as two elementwise maxima."""
    b, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    a = x.unflatten(3, (w // 2, 2))
    a = torch.maximum(a[..., 0], a[..., 1])
    a = a.unflatten(2, (h // 2, 2))
    return torch.maximum(a[:, :, :, 0], a[:, :, :, 1])


def _is_pool2x2(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and _ints(m.kernel_size, 2) == _ints(m.stride, 2) == [2, 2]
            and _ints(m.padding, 2) == [0, 0] and _ints(m.dilation, 2) == [1, 1]
            and not m.ceil_mode and not m.return_indices)


# -- the steps a plan is made of: (kind, layer position) ---------------------------------------
# Each step reads what it needs from its layer's entry in ``InferenceChain._entries``
# (module; for a Linear its weight, bias, bias column, CSR arrays), built once from the weights.
def _module(e, x):
    return e["module"](x)


def _relu_(e, x):  # on a tensor this pass made (never the caller's input)
    return torch.relu_(x)


def _transpose(e, x):
    return feature_major(x)


def _window_fm(e, x):  # only the input columns from the first to the last one selected
    lo, hi = e["window"]
    return feature_major(x[:, lo:hi])


def _flat(x):  # Flatten(1, -1), skipped on input that is flat already (a view costs ~1 us)
    return x if x.dim() == 2 else x.flatten(1)


def _flatten_fm(e, x):  # Flatten(1, -1) then feature-major, as one step
    return feature_major(_flat(x))


def _flatten_window_fm(e, x):
    return _window_fm(e, _flat(x))


def _dense_rows(e, x):
    return F.linear(x, e["weight"], e["bias"])


def _dense_fm(e, x):
    b = e["bias_col"]
    return torch.mm(e["weight"], x) if b is None else torch.addmm(b, e["weight"], x)


def _dense_fm_to_rows(e, x):  # the last layer: BLAS reads the transposed operands in place
    return F.linear(x.t(), e["weight"], e["bias"])


def _select_rows(e, x):
    return x.index_select(1, e["module"].index)


def _select_fm(e, x):
    return x.index_select(0, e["module"].index)


def _csr_plus_bias(e, x, arrays):
    y = csr_matmul(x, *arrays)
    return y if e["bias_col"] is None else y.add_(e["bias_col"])


def _csr_fm(e, x):
    return _csr_plus_bias(e, x, e["csr"])


def _csr_window(e, x):  # x: the window's columns, feature-major
    return _csr_plus_bias(e, x, e["csr_window"])


def _to_vector(e, x):  # (1, ...) -> (n,)
    return x.reshape(-1)


def _from_vector(e, x):
    return x.unsqueeze(0)


def _select_vector(e, x):
    return x.index_select(0, e["module"].index)


def _dense_vector(e, x):
    return torch.mv(e["weight"], x) if e["bias"] is None else torch.addmv(e["bias"], e["weight"], x)


def _flatten(e, x):
    m = e["module"]
    return x.flatten(m.start_dim, m.end_dim)


def _pool2(e, x):
    return max_pool2x2(x)


STEPS = {"module": _module, "relu_": _relu_, "to_fm": _transpose, "to_rows": _transpose,
         "dense": _dense_rows, "dense_fm": _dense_fm, "dense_t": _dense_fm_to_rows,
         "select": _select_rows, "select_fm": _select_fm, "csr": _csr_fm, "pool2": _pool2,
         "flatten": _flatten, "to_vec": _to_vector, "from_vec": _from_vector,
         "select_vec": _select_vector, "dense_vec": _dense_vector, "to_fm_window": _window_fm,
         "csr_window": _csr_window, "flatten_fm": _flatten_fm,
         "flatten_fm_window": _flatten_window_fm}


class InferenceChain(nn.Sequential):
    """A compacted chain (its layers, names and state_dict unchanged) that runs each layer on
    the kernel measured fastest here, per batch size (:meth:`plan`). Training mode, another
    device, an input of another rank, or parameters that require grad run the plain
    ``nn.Sequential`` forward. ``load_state_dict`` and ``.to()`` rebuild the kernels' copies
    of the weights; call :meth:`plan` again to re-time them."""

    def __init__(self, chain: nn.Sequential):
        super().__init__(*chain)
        # per torch thread count: [(largest batch size, steps)]; kernels time differently
        # with more threads (embedding_bag slows down on two), so each count has its own plan
        self.plans: dict[int, list[tuple[int, list[tuple[str, int]]]]] = {}
        self.kernel_report: dict[str, dict] = {}
        self.input_dim = -1
        self._flat_input, self._input_numel = False, -1
        self._plan_args: tuple = ()
        self._entries: list[dict] = []
        self._compiled: dict = {}

    def _prepare(self) -> None:
        """Each layer's entry: the module, and for a Linear its weight, bias, bias column and
        CSR arrays (reading a Select's inputs in place)."""
        self._entries, self._params = [], list(self.parameters())
        for i, m in enumerate(self):
            e = {"module": m}
            if isinstance(m, nn.Linear):
                prev = self[i - 1] if i > 0 else None
                index = prev.index if isinstance(prev, Select) else None
                bias = None if m.bias is None else m.bias.detach()
                nnz = int(m.weight.count_nonzero())
                sparse = 0 < nnz < CSR_MAX_DENSITY * m.weight.numel()
                e.update(weight=m.weight.detach(), bias=bias,
                         bias_col=None if bias is None else bias[:, None].contiguous(),
                         csr=csr_arrays(m.weight, index) if sparse else None,
                         csr_window=None)
                if sparse and index is not None and index.numel():
                    # rows in: transpose only the columns from the first selected to the last
                    lo, hi = int(index.min()), int(index.max()) + 1
                    col, offsets, values = e["csr"]
                    e.update(window=(lo, hi), csr_window=(col - lo, offsets, values))
            self._entries.append(e)
        self._compile()

    def _compile(self) -> None:
        self._compiled = {t: [(bound, [(STEPS[k], i) for k, i in self._fuse(steps)])
                              for bound, steps in p] for t, p in self.plans.items()}

    def _fuse(self, steps: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The plan as run: a Flatten(1, -1) followed by the transpose to feature-major
        becomes one step (a plan reads the same either way; a Python step costs ~1 us)."""
        out: list[tuple[str, int]] = []
        for kind, i in steps:
            if (kind in ("to_fm", "to_fm_window") and out and out[-1][0] == "flatten"
                    and self[out[-1][1]].start_dim == 1 and self[out[-1][1]].end_dim == -1):
                out[-1] = ("flatten_fm" if kind == "to_fm" else "flatten_fm_window", i)
            else:
                out.append((kind, i))
        return out

    def _run(self, steps, x):
        entries = self._entries
        for kind, i in steps:
            x = STEPS[kind](entries[i], x)
        return x

    def _candidates(self, i: int, fm: bool) -> tuple[int, dict[str, list[tuple[str, int]]]]:
        """(layers covered, {name: steps}) for the layer at ``i`` reached in layout ``fm``."""
        m = self[i]
        to_rows = [("to_rows", i)] if fm else []
        nxt = self[i + 1] if i + 1 < len(self) else None
        selected = isinstance(m, Select) and isinstance(nxt, nn.Linear)
        if selected or isinstance(m, nn.Linear):
            j = i + selected  # the Linear; the CSR kernel reads the Select's inputs in place
            select = [("select_fm" if fm else "select", i)] if selected else []
            cands = {"dense": select + [("dense_fm" if fm else "dense", j)]}
            if self._entries[j]["csr_window"] is not None and not fm:
                cands["csr"] = [("to_fm_window", j), ("csr_window", j)]
            elif self._entries[j]["csr"] is not None:
                cands["csr"] = ([] if fm else [("to_fm", j)]) + [("csr", j)]
            if j == len(self) - 1:  # the output goes back to rows: count that transpose
                cands = {k: v + [("to_rows", j)] if v[-1][0] in _FM_OUT else v
                         for k, v in cands.items()}
                if fm and not selected:
                    cands["dense_t"] = [("dense_t", j)]
            return 1 + selected, cands
        if isinstance(m, Select):
            return 1, {"module": [("select_fm", i)] if fm else [("select", i)]}
        if _is_pool2x2(m):
            return 1, {"module": to_rows + [("module", i)], "pool2": to_rows + [("pool2", i)]}
        if isinstance(m, ELEMENTWISE):
            return 1, {"module": [("module", i)]}
        if type(m) is nn.Flatten:
            return 1, {"module": to_rows + [("flatten", i)]}
        return 1, {"module": to_rows + [("module", i)]}

    @torch.no_grad()
    def plan(self, input_shape: tuple[int, ...], batch_sizes=(1, 64), rounds: int = _ROUNDS,
             prefer: tuple[str, ...] = ()) -> InferenceChain:
        """Choose each layer's kernel at each batch size by timing the candidates on the
        activation that reaches it (interleaved rounds); a batch between two measured sizes
        uses the larger one's plan. This plans for torch's current thread count; another count
        is planned at its first call. The timings are kept in ``kernel_report`` (keys: layer
        position @ batch size / threads; 'chain@1' compares the vector plan with the layers').
        ``prefer`` (of 'dense', 'csr', 'pool2', 'dense_t', 'vector'): take the first of these
        kernels that applies, untimed (tests reach every kernel so)."""
        self.eval()
        self.plans, self.kernel_report = {}, {}
        self._plan_args = (tuple(input_shape), tuple(batch_sizes), rounds, tuple(prefer))
        self.input_dim = len(input_shape) + 1
        # a chain that begins by flattening accepts its inputs flat as well: they are viewed
        # in the planned shape and take the same kernels
        first = self[0] if len(self) else None
        self._flat_input = (len(input_shape) > 1 and type(first) is nn.Flatten
                            and first.start_dim == 1 and first.end_dim == -1)
        self._input_numel = math.prod(input_shape)
        self._prepare()
        return self._plan_threads()

    @torch.no_grad()
    @torch.inference_mode(False)  # planned at a first call under inference_mode: plain tensors
    def _plan_threads(self) -> InferenceChain:
        input_shape, batch_sizes, rounds, prefer = self._plan_args
        threads = torch.get_num_threads()
        plans = self.plans[threads] = []
        sizes = sorted(batch_sizes)
        for n, b in enumerate(sizes):
            steps = self._plan_batch(b, threads)
            plans.append((b if n < len(sizes) - 1 else 1 << 62, steps))
            if n + 1 < len(sizes):  # planning costs about 15 plain passes at the next size
                x = torch.randn(b, *input_shape, dtype=self._dtype())
                t0 = time.perf_counter()
                nn.Sequential.forward(self, x)
                if 15 * (time.perf_counter() - t0) * sizes[n + 1] / b > _BUDGET_S:
                    plans[-1] = (1 << 62, steps)  # a large network: this plan for every size
                    break
        self._compile()
        return self

    def _plan_batch(self, b: int, threads: int) -> list[tuple[str, int]]:
        """The steps at batch size ``b``: layer by layer, the fastest candidate on the
        activation that reaches the layer."""
        input_shape, _, rounds, prefer = self._plan_args
        x = torch.randn(b, *input_shape, dtype=self._dtype())
        steps: list[tuple[str, int]] = []
        fm, owned, i = False, False, 0
        while i < len(self):
            width, cands = self._candidates(i, fm)
            if isinstance(self[i], nn.ReLU) and owned:
                cands = {"module": [("relu_", i)]}
            if any(k in cands for k in prefer):
                best = next(k for k in prefer if k in cands)
            elif len(cands) > 1:
                t = self._time(cands, x, rounds)
                best = min(t, key=t.get)
                self.kernel_report[f"{i}@{b}/{threads}t"] = {
                    "layer": _describe(self[i + width - 1]), "kernel": best,
                    "us": {k: v * 1e6 for k, v in t.items()}}
            else:
                best = next(iter(cands))
            x = self._run(cands[best], x)
            steps += cands[best]
            for kind, j in cands[best]:
                fm = _layout_after(kind, self[j], fm)
                owned = _owned_after(kind, self[j], owned)
            i += width
        if fm:
            steps.append(("to_rows", len(self) - 1))
        vector = self._vector_steps() if b == 1 else None
        if vector is not None and "vector" in prefer:
            return vector
        if vector is not None and not prefer:
            x = torch.randn(b, *input_shape, dtype=self._dtype())
            t = self._time({"layers": steps, "vector": vector}, x, rounds)
            self.kernel_report[f"chain@{b}/{threads}t"] = {
                "layer": "whole chain", "kernel": min(t, key=t.get),
                "us": {k: v * 1e6 for k, v in t.items()}}
            if t["vector"] < t["layers"]:
                return vector
        return steps

    def _vector_steps(self) -> list[tuple[str, int]] | None:
        """The whole chain on one 1-D activation (batch size 1), where every layer allows it:
        Flatten from dim 1, Select, Linear and elementwise layers; else None."""
        steps, owned = [("to_vec", 0)], False
        flat = len(self._plan_args[0]) == 1  # a Linear must see the whole sample as features
        for i, m in enumerate(self):
            if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
                flat = True
                continue
            if isinstance(m, (Select, nn.Linear)) and not flat:
                return None
            if isinstance(m, Select):
                steps.append(("select_vec", i))
            elif isinstance(m, nn.Linear):
                steps.append(("dense_vec", i))
            elif isinstance(m, nn.ReLU) and owned:
                steps.append(("relu_", i))
            elif isinstance(m, ELEMENTWISE):
                steps.append(("module", i))
            else:
                return None
            owned = owned or not isinstance(m, ELEMENTWISE)
        return steps + [("from_vec", len(self) - 1)] if len(self) else None

    def _time(self, cands: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
        fns = {k: (lambda v, s=s: self._run(s, v)) for k, s in cands.items()}
        return budgeted_medians(fns, x, rounds)

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters()), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = x.dim()
        # (N, C*H*W) input to a chain that begins by flattening runs the same steps: the
        # Flatten is a no-op on it, so no reshape is needed
        flat = (ndim == 2 and self._flat_input and ndim != self.input_dim
                and x.shape[1] == self._input_numel)
        if (self.training or not x.is_cpu or (ndim != self.input_dim and not flat)
                or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return super().forward(x)  # tracers and compilers see the plain layers
        if torch.is_grad_enabled():  # gradients reach the weights only through the layers
            for p in self._params:
                if p.requires_grad:
                    return super().forward(x)
        compiled = self._compiled.get(torch.get_num_threads())
        if compiled is None:
            if not self._plan_args:
                return super().forward(x)
            compiled = self._plan_threads()._compiled[torch.get_num_threads()]
        entries, b = self._entries, x.shape[0]
        for bound, steps in compiled:
            if b <= bound:
                for step, i in steps:
                    x = step(entries[i], x)
                return x
        return super().forward(x)

    def __prepare_scriptable__(self) -> nn.Sequential:
        """``torch.jit.script`` compiles the plain layers (the engine is Python)."""
        return nn.Sequential(*self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._entries:  # the CSR arrays are copies of the weights: rebuild them
            self._prepare()
        return out

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_entries", None):  # .to(), .double(): the entries follow the weights
            self._prepare()
        return out


_FM_OUT = ("to_fm", "csr", "dense_fm", "select_fm", "to_fm_window", "csr_window")
_ROWS_OUT = ("to_rows", "dense", "dense_t", "select", "pool2", "flatten")


def _layout_after(kind: str, layer: nn.Module, fm: bool) -> bool:
    """Whether the activation is feature-major after a step."""
    if kind in _FM_OUT:
        return True
    if kind in _ROWS_OUT or (kind == "module" and not isinstance(layer, ELEMENTWISE)):
        return False
    return fm


def _owned_after(kind: str, layer: nn.Module, owned: bool) -> bool:
    """Whether the activation is a tensor the pass made (safe to change in place): a
    transpose or a flatten may return a view of the caller's input."""
    if kind in ("to_fm", "to_fm_window", "to_rows", "relu_", "flatten") or (
            kind == "module" and isinstance(layer, (nn.Flatten, nn.Identity))):
        return owned
    return True


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}->{m.out_features})"
    return type(m).__name__
