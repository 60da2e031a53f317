"""Sparse inference: an exported file back as an nn.Module whose Linear layers run a CSR or a
dense kernel, whichever is faster here, and the latency benchmark behind `bench-infer`."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from .container import read


# -- inference -------------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """A Linear layer that runs a CSR kernel, the dense kernel, or picks per batch size.

    ``use_sparse`` maps a batch-size bound to the choice: the first bound >= the batch size
    decides (measured once by :func:`choose_kernels`, or fixed by density).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it works here
            warnings.simplefilter("ignore", UserWarning)
            self.weight_csr = weight.to_sparse_csr()
        self.use_sparse: list[tuple[int, bool]] = [(1 << 30, weight.count_nonzero() <
                                                    0.3 * weight.numel())]

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        # y^T = W x^T (+ b) with W in CSR: one sparse-dense matmul. The result is returned as
        # a transposed view, so the next SparseLinear's x.t().contiguous() costs nothing.
        xt = x.reshape(-1, self.in_features).t().contiguous()
        if self.bias is None:
            y = torch.sparse.mm(self.weight_csr, xt)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight_csr, xt)
        return y.t().reshape(*x.shape[:-1], self.out_features)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        b = x.shape[0] if x.dim() > 1 else 1
        for bound, sparse in self.use_sparse:
            if b <= bound:
                return self.sparse_forward(x) if sparse else self.dense_forward(x)
        return self.dense_forward(x)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, density="
                f"{float(self.weight.count_nonzero()) / self.weight.numel():.4f}, "
                f"sparse={self.use_sparse}")


def _median_time(fn, x, reps: int = 30) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def choose_kernels(model: nn.Module, batch_sizes=(1, 64), reps: int = 30) -> dict:
    """Time dense vs CSR for each SparseLinear at each batch size and keep the faster; a batch
    size between two measured ones uses the choice of the larger one."""
    sizes = sorted(batch_sizes)
    report = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            choice = []
            for b in sizes:
                x = torch.randn(b, m.in_features)
                td = _median_time(m.dense_forward, x, reps)
                ts = _median_time(m.sparse_forward, x, reps)
                choice.append(ts < td)
                report[f"{name}@{b}"] = {"dense_s": td, "sparse_s": ts, "sparse": ts < td}
            m.use_sparse = [(b if i < len(sizes) - 1 else 1 << 30, c)
                            for i, (b, c) in enumerate(zip(sizes, choice))]
    return report


def build_from_export(header: dict, state: dict[str, torch.Tensor],
                      model: nn.Module | None = None) -> nn.Module:
    """The exported network as an nn.Module: a bundled architecture is rebuilt from the
    header; any other (the user's own model) is filled into ``model``, an instance of it."""
    from ..models import MODELS, build_model

    arch = header.get("arch") if isinstance(header.get("arch"), dict) else {}
    if model is None and arch.get("model") not in MODELS:
        raise CheckpointError(f"the export holds a {arch.get('model', 'model')!r}, which is not a "
                              "bundled architecture: pass an instance of it, "
                              "sensprune.load(path, model=YourModel())")
    try:
        if model is None:
            model = build_model(arch["model"], arch["num_classes"], tuple(arch["input_shape"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in dict(model.named_parameters())]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except Exception as exc:  # missing keys, shapes that do not fit
        raise CheckpointError(f"the export's tensors do not fit the model "
                              f"({type(exc).__name__}: {str(exc)[:100]})") from None
    return model.eval()


def to_sparse_inference(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Replace every nn.Linear by a SparseLinear (same weights); ``kernels`` = 'auto' (one
    timing per layer), 'density' (CSR below 30 % density) or 'dense' / 'sparse'."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                sl = SparseLinear(child.weight.detach(), None if child.bias is None
                                  else child.bias.detach())
                if kernels in ("dense", "sparse"):
                    sl.use_sparse = [(1 << 30, kernels == "sparse")]
                setattr(parent, child_name, sl)
    if kernels == "auto":
        choose_kernels(model)
    return model.eval()


def load(path: str | Path, kernels: str = "auto", model: nn.Module | None = None) -> nn.Module:
    """An exported file as an ``nn.Module`` ready for inference (eval mode, no grad needed).

    ``kernels``: 'auto' (per-layer timing at batch 1 and 64), 'density', 'dense', 'sparse'.
    ``model``: for an export of your own architecture, an instance of it to fill (the bundled
    ones are rebuilt from the file's header).
    """
    header, state = read(path)
    model = build_from_export(header, state, model)
    for p in model.parameters():
        p.requires_grad_(False)
    return to_sparse_inference(model, kernels)


def bench_inference(path: str | Path, batch_sizes=(1, 64), reps: int = 200) -> dict:
    """Latency of dense vs sparse kernels, per Linear layer and for the whole model."""
    header, state = read(path)
    rows = []
    whole = {}
    variants = {k: to_sparse_inference(build_from_export(header, state), k)
                for k in ("dense", "sparse", "auto")}
    shape = tuple(header["arch"]["input_shape"])
    for b in batch_sizes:
        for name, m in variants["dense"].named_modules():
            if isinstance(m, SparseLinear):
                x = torch.randn(b, m.in_features)
                td = _median_time(m.dense_forward, x, reps)
                ts = _median_time(m.sparse_forward, x, reps)
                rows.append({"layer": name, "batch": b, "density":
                             float(m.weight.count_nonzero()) / m.weight.numel(),
                             "dense_us": td * 1e6, "sparse_us": ts * 1e6, "speedup": td / ts})
        x = torch.randn(b, *shape)
        for k, model in variants.items():
            whole[f"{k}@{b}"] = _median_time(model, x, reps) * 1e6
    return {"file": str(path), "layers": rows, "model_us": whole, "reps": reps,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
