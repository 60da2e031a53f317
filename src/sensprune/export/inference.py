"""Sparse inference: an exported file back as an nn.Module whose Linear layers run a CSR or a
dense kernel, whichever is faster here, and the latency benchmark behind `bench-infer`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from .container import read
from .engine import (CSR_MAX_DENSITY, InferenceChain, budgeted_medians, csr_arrays, csr_matmul,
                     feature_major, interleaved_medians)


# -- inference -------------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """A Linear layer that runs a CSR kernel, the dense kernel, or picks per batch size.

    ``use_sparse`` maps a bound on the rows to the choice: the first bound >= the number of
    rows the layer multiplies (every leading dimension: batch x sequence for a transformer)
    decides (measured once by :func:`choose_kernels`, or fixed by density). ``index``: the
    layer reads only these input features (a compacted chain's ``Select`` in front of it):
    the dense kernel selects them first, the CSR kernel reads them in place (its columns are
    the original input's), so the selection costs nothing there.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 index: torch.Tensor | None = None, in_size: int | None = None):
        super().__init__()
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] if index is None else int(in_size)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.register_buffer("index", None if index is None else index.to(torch.int64))
        self.csr = csr_arrays(weight, self.index)  # its columns: the original input's
        self.bias_col = None if bias is None else bias.detach()[:, None].contiguous()
        self.use_sparse: list[tuple[int, bool]] = [(1 << 30, weight.count_nonzero() <
                                                    CSR_MAX_DENSITY * weight.numel())]

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        # y^T = W x^T (+ b): the CSR product on the feature-major layout (engine.csr_matmul)
        x2 = x.reshape(-1, self.in_features)
        y = csr_matmul(feature_major(x2), *self.csr)
        if self.bias_col is not None:
            y = y.add_(self.bias_col)
        return feature_major(y).reshape(*x.shape[:-1], self.out_features)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            x = x.index_select(-1, self.index)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() > 1 else 1
        for bound, sparse in self.use_sparse:
            if rows <= bound:
                return self.sparse_forward(x) if sparse else self.dense_forward(x)
        return self.dense_forward(x)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, density="
                f"{float(self.weight.count_nonzero()) / self.weight.numel():.4f}, "
                f"sparse={self.use_sparse}")


def choose_kernels(model: nn.Module, batch_sizes=(1, 64, 1024), rounds: int = 15) -> dict:
    """Time dense vs CSR for each SparseLinear at each number of rows (interleaved rounds) and
    keep the faster; a row count between two measured ones uses the choice of the larger one.
    Fewer rounds where one call is slow (``budgeted_medians``), so a large layer at 1,024 rows
    costs a fraction of a second to plan."""
    sizes = sorted(batch_sizes)
    report = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            choice = []
            for b in sizes:
                x = torch.randn(b, m.in_features, dtype=m.weight.dtype)
                t = budgeted_medians({"dense": m.dense_forward, "sparse": m.sparse_forward},
                                     x, rounds)
                choice.append(t["sparse"] < t["dense"])
                report[f"{name}@{b}"] = {"dense_s": t["dense"], "sparse_s": t["sparse"],
                                         "sparse": t["sparse"] < t["dense"],
                                         "kernel": "csr" if t["sparse"] < t["dense"] else "dense"}
            m.use_sparse = [(b if i < len(sizes) - 1 else 1 << 30, c)
                            for i, (b, c) in enumerate(zip(sizes, choice))]
    return report


def build_from_export(header: dict, state: dict[str, torch.Tensor],
                      model: nn.Module | None = None) -> nn.Module:
    """The exported network as an nn.Module: a bundled architecture is rebuilt from the
    header; any other (the user's own model) is filled into ``model``, an instance of it."""
    from ..models import MODELS, build_model
    from .chain import build_chain, check_select_index

    arch = header.get("arch") if isinstance(header.get("arch"), dict) else {}
    if model is None and arch.get("model") == "chain":  # a compacted network: plain layers
        model = build_chain(arch.get("layers"))
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise CheckpointError(f"the export's tensors do not fit its layer list "
                                  f"({type(exc).__name__}: {str(exc)[:100]})") from None
        check_select_index(model)
        return model.eval()
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


def _sparse_layers(model: nn.Module) -> list[tuple[nn.Module, str, SparseLinear, str | None]]:
    """Every nn.Linear as a SparseLinear candidate: (parent, child's qualified name,
    candidate, name of a Select in front of it that the candidate absorbs, or None)."""
    from .compaction import Select

    found = []
    for prefix, parent in list(model.named_modules()):
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            if type(child) is not nn.Linear:
                continue
            prev = children[i - 1] if i > 0 and isinstance(parent, nn.Sequential) else None
            sel = prev if prev is not None and isinstance(prev[1], Select) else None
            bias = None if child.bias is None else child.bias.detach()
            cand = SparseLinear(child.weight.detach(), bias,
                                index=None if sel is None else sel[1].index,
                                in_size=None if sel is None else sel[1].in_size)
            found.append((parent, f"{prefix}.{child_name}" if prefix else child_name, cand,
                          None if sel is None else sel[0]))
    return found


def to_sparse_inference(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """The model for inference (eval mode), with a CSR kernel for the Linear layers where it
    pays: ``kernels`` = 'auto' (timed per layer at 1, 64 and 1,024 rows: a layer stays a
    plain nn.Linear unless CSR is faster at one of them; the timings are kept in
    ``model.kernel_report``), 'density' (CSR below 30 % density), 'sparse' (CSR everywhere)
    or 'dense' (the model unchanged: plain layers, for torch.jit.script, torch.compile, ONNX)."""
    model.eval()
    if kernels == "dense":
        return model
    report = {}
    for parent, name, cand, sel_name in _sparse_layers(model):
        if kernels == "sparse":
            cand.use_sparse = [(1 << 30, True)]
        elif kernels == "auto":
            report.update({f"{name}@{k.split('@')[1]}": v
                           for k, v in choose_kernels(cand).items()})
        if not any(sparse for _, sparse in cand.use_sparse):
            continue  # the dense kernel everywhere: keep the plain layer (and its Select)
        setattr(parent, name.rsplit(".", 1)[-1], cand)
        if sel_name is not None:  # the CSR kernel reads the selected inputs in place
            setattr(parent, sel_name, nn.Identity())
    model.kernel_report = report
    return model


KERNEL_CHOICES = ("auto", "density", "dense", "sparse")


def load(path: str | Path, kernels: str = "auto", model: nn.Module | None = None) -> nn.Module:
    """An exported file as an ``nn.Module`` ready for inference (eval mode, no grad needed).

    A compacted export (``sensprune export --compact``) comes back as an ``nn.Sequential`` of
    smaller plain layers: with ``kernels='auto'`` an :class:`~.engine.InferenceChain`, which
    runs each layer on the kernel measured fastest at batch 1 and 64 (the choices in
    ``model.kernel_report``); with 'dense' a plain ``nn.Sequential`` (for ``torch.jit.script``,
    ``torch.compile`` and ONNX). Any other export: 'auto' puts a Linear layer on CSR at the row
    counts (batch x sequence) where that is measured faster, 'density' below 30 % density,
    'sparse' everywhere, 'dense' nowhere.
    ``model``: for an export of your own architecture, an instance of it to fill (the bundled
    ones are rebuilt from the file's header).
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    return _inference_model(*read(path), model, kernels)


def _inference_model(header: dict, state: dict[str, torch.Tensor], model: nn.Module | None,
                     kernels: str) -> nn.Module:
    """:func:`load` after the file is read."""
    chain = model is None and header["arch"].get("model") == "chain"
    model = build_from_export(header, state, model)
    for p in model.parameters():
        p.requires_grad_(False)
    if chain and kernels == "auto":
        shape = tuple(header["arch"]["input_shape"])
        # plan at batch 64 only where that activation is small (the shape comes from a file)
        sizes = (1, 64) if 64 * math.prod(shape) <= 1 << 24 else (1,)
        try:
            return InferenceChain(model).plan(shape, sizes)
        except RuntimeError as exc:  # the declared input shape does not fit the layers
            raise CheckpointError(f"the export's input shape {list(shape)} does not fit its "
                                  f"layers ({str(exc)[:80]}); export it again") from None
    return to_sparse_inference(model, kernels)


def bench_inference(path: str | Path, batch_sizes=(1, 64), reps: int = 200) -> dict:
    """Latency of dense vs CSR kernels, per Linear layer and for the whole model (medians of
    interleaved rounds; ``reps`` calls in all per candidate)."""
    header, state = read(path)
    rows = []
    whole = {}
    variants = {k: to_sparse_inference(build_from_export(header, state), k)
                for k in ("dense", "sparse")}
    # as a user gets it: the engine for a compacted export
    variants["auto"] = _inference_model(header, state, None, "auto")
    shape = tuple(header["arch"]["input_shape"])
    # the baseline a speed-up is quoted against: the network as trained, dense kernels, its
    # full architecture (a compacted export lost the removed units; a dense layer's time does
    # not depend on its values, so the architecture rebuilt with fresh weights times the same)
    from ..models import MODELS, build_model
    source = header["arch"].get("source_model", header["arch"].get("model"))
    if source in MODELS:
        variants["trained"] = build_model(source, header["arch"]["num_classes"], shape).eval()
        for p in variants["trained"].parameters():
            p.requires_grad_(False)
    rounds = max(3, reps // 10)
    for b in batch_sizes:
        for _, name, m, _ in _sparse_layers(build_from_export(header, state).eval()):
            x = torch.randn(b, m.in_features)
            t = interleaved_medians({"dense": m.dense_forward, "sparse": m.sparse_forward}, x, rounds)
            rows.append({"layer": name, "batch": b, "density":
                         float(m.weight.count_nonzero()) / m.weight.numel(),
                         "dense_us": t["dense"] * 1e6, "sparse_us": t["sparse"] * 1e6,
                         "speedup": t["dense"] / t["sparse"]})
        t = interleaved_medians(variants, torch.randn(b, *shape), rounds)
        whole.update({f"{k}@{b}": v * 1e6 for k, v in t.items()})
    return {"file": str(path), "layers": rows, "model_us": whole, "reps": reps,
            "baseline": "trained" if "trained" in variants else "dense",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "chosen": {k: v["kernel"] for k, v in variants["auto"].kernel_report.items()}}
