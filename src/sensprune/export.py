"""Compact export of pruned models, loading for inference with sparse kernels, and ONNX.

File format: a standard safetensors container. Each parameter is stored in the smallest of
  * ``dense``      — all values;
  * ``csr``        — row pointers + column indices (narrowest unsigned dtype that fits) +
                     values, over the tensor viewed as (shape[0], rest);
  * ``bitmask``    — one bit per entry (packed) + the non-zero values;
  * ``delta8``     — the positions of the non-zeros of the flattened tensor as uint8 gaps
                     from the previous one (gaps over 255 take filler entries with value 0),
                     as in Deep Compression's relative indexing;
  * ``csr-delta8``   — the same gaps within each row, plus row pointers (wins when whole rows,
                     i.e. dead neurons, are empty).
Values are fp32 (default), fp16, or int8 with one fp32 scale per tensor (symmetric; 1-D
tensors such as biases are stored fp16 in int8 mode). The
``__metadata__`` holds JSON: architecture, shapes, encodings, input normalization, dataset,
summary figures, and a SHA-256 over every stored byte, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError

FORMAT = "sensprune-sparse/1"
VALUE_FORMATS = ("fp32", "fp16", "int8")
_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def index_dtype(max_value: int) -> np.dtype:
    """Narrowest unsigned dtype that holds ``max_value``."""
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"index {max_value} too large")


# -- encoding -------------------------------------------------------------------------------------
def _values(v: np.ndarray, fmt: str) -> tuple[np.ndarray, float | None]:
    if fmt == "fp32":
        return v.astype(np.float32), None
    if fmt == "fp16":
        return v.astype(np.float16), None
    scale = float(np.abs(v).max()) / 127.0 if v.size else 0.0
    if scale == 0.0:
        return np.zeros(v.shape, np.int8), 1.0
    return np.clip(np.round(v / scale), -127, 127).astype(np.int8), scale


def _csr(mat: np.ndarray):
    rows, cols = np.nonzero(mat)
    indptr = np.zeros(mat.shape[0] + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), rows, cols


def candidate_encodings(t: torch.Tensor, fmt: str) -> dict[str, tuple[dict[str, np.ndarray], float | None]]:
    """Every encoding of one tensor: {name: (arrays, int8 scale or None)}."""
    a = t.detach().cpu().numpy().astype(np.float32)
    flat = a.reshape(-1)
    mat = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
    candidates: list[tuple[str, dict[str, np.ndarray], float | None]] = []

    vals, scale = _values(flat, fmt)
    candidates.append(("dense", {"values": vals}, scale))

    nz = flat != 0
    indptr, rows, cols = _csr(mat)
    nnz_vals, scale_nz = _values(mat[rows, cols], fmt)
    candidates.append(("bitmask", {"mask": np.packbits(nz), "values": nnz_vals}, scale_nz))
    candidates.append(("csr", {
        "indptr": indptr.astype(index_dtype(int(indptr[-1]))),
        "indices": cols.astype(index_dtype(max(mat.shape[1] - 1, 0))),
        "values": nnz_vals}, scale_nz))
    # relative indices: uint8 gaps between successive non-zeros of the flattened tensor; a
    # gap over 255 takes filler entries (value 0). No row pointers are needed.
    pos = np.flatnonzero(nz)
    gap = np.diff(pos, prepend=-1)
    fill = (gap - 1) // 255
    last = np.cumsum(fill + 1) - 1  # where each real entry lands
    gaps = np.full(int(last[-1]) + 1 if len(last) else 0, 255, dtype=np.uint8)
    gaps[last] = gap - 255 * fill
    d_vals = np.zeros(len(gaps), np.float32)
    d_vals[last] = flat[pos]
    dvals, dscale = _values(d_vals, fmt)
    candidates.append(("delta8", {"gaps": gaps, "values": dvals}, dscale))

    # the same per row (row pointers + gaps within each row): better when rows are empty
    prev = np.full(len(cols), -1, dtype=np.int64)
    same_row = np.zeros(len(cols), dtype=bool)
    same_row[1:] = rows[1:] == rows[:-1]
    prev[1:][same_row[1:]] = cols[:-1][same_row[1:]]
    gap = cols.astype(np.int64) - prev
    fill = (gap - 1) // 255
    last = np.cumsum(fill + 1) - 1  # where each real entry lands
    gaps = np.full(int(last[-1]) + 1 if len(last) else 0, 255, dtype=np.uint8)
    gaps[last] = gap - 255 * fill
    d_vals = np.zeros(len(gaps), np.float32)
    d_vals[last] = mat[rows, cols]
    per_row = np.bincount(rows, weights=fill + 1, minlength=mat.shape[0]).astype(np.int64)
    d_ptr = np.concatenate([[0], np.cumsum(per_row)])
    dvals, dscale = _values(d_vals, fmt)
    candidates.append(("csr-delta8", {"indptr": d_ptr.astype(index_dtype(int(d_ptr[-1]))),
                                      "gaps": gaps, "values": dvals}, dscale))

    return {name: (arrays, sc) for name, arrays, sc in candidates}


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in arrays.values())


def _encode_tensor(name: str, t: torch.Tensor, fmt: str) -> tuple[dict, dict[str, np.ndarray], int]:
    """(layer metadata, arrays, min(CSR, bitmask) bytes) of the smallest encoding of a tensor."""
    cands = candidate_encodings(t, fmt)
    enc = min(cands, key=lambda k: _nbytes(cands[k][0]))
    arrays, sc = cands[enc]
    meta = {"shape": list(t.shape), "encoding": enc, "nnz": int(torch.count_nonzero(t)),
            "bytes": _nbytes(arrays)}
    if sc is not None:
        meta["scale"] = sc
    reference = min(_nbytes(cands["csr"][0]), _nbytes(cands["bitmask"][0]))
    return meta, {f"{name}/{k}": v for k, v in arrays.items()}, reference


def _decode_tensor(name: str, meta: dict, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    shape = tuple(meta["shape"])
    numel = int(np.prod(shape)) if shape else 1
    vals = arrays[f"{name}/values"].astype(np.float32)
    if "scale" in meta:
        vals = vals * np.float32(meta["scale"])
    enc = meta["encoding"]
    if enc == "dense":
        return torch.from_numpy(vals.reshape(shape).copy())
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // max(rows, 1)
    out = np.zeros(numel, np.float32)
    if enc == "bitmask":
        mask = np.unpackbits(arrays[f"{name}/mask"], count=numel).astype(bool)
        out[mask] = vals
    elif enc == "csr":
        indptr = arrays[f"{name}/indptr"].astype(np.int64)
        r = np.repeat(np.arange(rows), np.diff(indptr))
        out[r * cols + arrays[f"{name}/indices"].astype(np.int64)] = vals
    elif enc == "delta8":
        pos = np.cumsum(arrays[f"{name}/gaps"].astype(np.int64)) - 1
        keep = vals != 0
        out[pos[keep]] = vals[keep]
    elif enc == "csr-delta8":
        indptr = arrays[f"{name}/indptr"].astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(arrays[f"{name}/gaps"].astype(np.int64))])
        r = np.repeat(np.arange(rows), np.diff(indptr))
        c = csum[1:] - csum[indptr[:-1]][r] - 1  # column = gaps summed within the row, - 1
        keep = vals != 0
        out[r[keep] * cols + c[keep]] = vals[keep]
    else:
        raise CheckpointError(f"unknown encoding {enc!r} for {name}")
    return torch.from_numpy(out.reshape(shape))


def _digest(arrays: dict[str, np.ndarray], header: dict | None = None) -> str:
    """SHA-256 of the arrays and, when given, of the header (canonical JSON, without its
    checksum fields): an edited scale, shape or layer list is caught like a flipped byte."""
    h = hashlib.sha256()
    if header is not None:
        meta = {k: v for k, v in header.items() if k not in ("sha256", "sha256_all")}
        h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def export(state_dict: dict[str, torch.Tensor], path: str | Path, arch: dict[str, Any],
           values: str = "fp32", extra: dict[str, Any] | None = None) -> dict:
    """Write ``state_dict`` compactly to ``path`` (safetensors); returns the size report.

    ``arch`` = {"model": registry name, "num_classes": C, "input_shape": [...]}. Buffers
    and biases are stored like any tensor (dense when that is smallest). With int8 values,
    only tensors with more than one dimension are quantized; 1-D tensors are stored fp16.
    """
    from safetensors.numpy import save_file

    if values not in VALUE_FORMATS:
        raise ConfigError(f"values must be one of {', '.join(VALUE_FORMATS)}, got {values!r}")
    layers, arrays = {}, {}
    dense_bytes = reference = 0
    for name, t in state_dict.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        fmt = values if (values != "int8" or t.dim() > 1) else "fp16"
        meta, arr, ref = _encode_tensor(name, t, fmt)
        reference += ref
        meta["values"] = fmt
        layers[name] = meta
        arrays.update(arr)
        dense_bytes += t.numel() * 4
    header = {"format": FORMAT, "arch": arch, "values": values, "layers": layers, **(extra or {})}
    header["sha256_all"] = _digest(arrays, header)
    path = _check_output(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(arrays, str(tmp), metadata={"sensprune": json.dumps(header, separators=(",", ":"))})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an export is meant to be shared
    tmp.replace(path)
    size = path.stat().st_size
    payload = sum(m["bytes"] for m in layers.values())
    return {"file_bytes": size, "dense_fp32_bytes": dense_bytes, "ratio": dense_bytes / size,
            "payload_bytes": payload, "header_bytes": size - payload,
            "min_csr_bitmask_bytes": reference,
            "layers": layers}


def _check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the export file's name (.safetensors)")
    if not path.parent.is_dir():
        raise ConfigError(f"the directory of {path} does not exist; create it first")
    return path


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, dense state_dict) of an exported file; verifies the checksum."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta["sensprune"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: not a sensprune export (no sensprune metadata)") from None
    except Exception as exc:  # safetensors raises its own error types for torn files
        if p.read_bytes()[:2] == b"PK":  # a torch.save zip archive
            raise CheckpointError(f"{p} is a PyTorch checkpoint, not an export; write one with "
                                  "`sensprune export RUN -o FILE.safetensors`") from None
        raise CheckpointError(f"{p}: truncated or corrupt file ({type(exc).__name__}: "
                              f"{str(exc)[:80]}); export it again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{p}: unsupported format {found!r}")
    if "sha256_all" in header:  # header and payload
        ok = _digest(arrays, header) == header["sha256_all"]
    elif "sha256" in header:  # files written before the header was covered: payload only
        ok = _digest(arrays) == header["sha256"]
    else:
        raise CheckpointError(f"{p}: the header has no checksum; export it again")
    if not ok:
        raise CheckpointError(f"{p}: checksum mismatch, the file is corrupt or was edited; "
                              "export it again")
    try:
        state = {n: _decode_tensor(n, m, arrays) for n, m in header["layers"].items()}
    except CheckpointError:
        raise
    except Exception as exc:  # a checksum can be recomputed by hand: still no raw errors
        raise CheckpointError(f"{p}: malformed header ({type(exc).__name__}: {str(exc)[:80]}); "
                              "export it again") from None
    return header, state


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


def build_from_export(header: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    from .models import build_model

    try:
        arch = header["arch"]
        model = build_model(arch["model"], arch["num_classes"], tuple(arch["input_shape"]))
        model.load_state_dict(state)
    except Exception as exc:  # missing keys, unknown model, shapes that do not fit
        raise CheckpointError(f"the export's architecture does not match its tensors "
                              f"({type(exc).__name__}: {str(exc)[:80]}); export it again") from None
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


def load(path: str | Path, kernels: str = "auto") -> nn.Module:
    """An exported file as an ``nn.Module`` ready for inference (eval mode, no grad needed).

    ``kernels``: 'auto' (per-layer timing at batch 1 and 64), 'density', 'dense', 'sparse'.
    """
    header, state = read(path)
    model = build_from_export(header, state)
    for p in model.parameters():
        p.requires_grad_(False)
    return to_sparse_inference(model, kernels)


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """ONNX export of the (pruned, dense-layout) model with a dynamic batch dimension."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the optional packages: pip install "
                          "'sensprune[onnx]' (onnx, onnxruntime)") from None
    x = torch.randn(2, *input_shape)
    torch.onnx.export(model.eval(), (x,), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      dynamo=False)
    return Path(path)


def export_checkpoint(checkpoint: str | Path, out: str | Path, values: str = "fp32",
                      data_dir: str | None = None, onnx_path: str | Path | None = None,
                      log=print) -> dict:
    """Export a training checkpoint; measure the test error of each value format (fp32, fp16,
    int8) against the checkpoint's own, and optionally write and check an ONNX file."""
    from .checkpoint import load_run_model
    from .data import load_dataset
    from .pruning import sparsity_report
    from .train import evaluate

    _check_output(out)  # before any work
    cfg, model = load_run_model(checkpoint)
    splits = load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.val_size)
    info = splits.info
    base_err, _ = evaluate(model, splits.test)
    sp = sparsity_report(model)
    arch = {"model": cfg.model, "num_classes": info.num_classes,
            "input_shape": list(info.input_shape)}
    extra = {"dataset": cfg.dataset, "normalization": {"mean": info.mean, "std": info.std},
             "summary": {"test_error": base_err, "compression_ratio": sp["compression_ratio"],
                         "nonzero_params": sp["nonzero_params"],
                         "total_params": sp["total_params"]}}
    out = Path(out)
    formats = {}
    for fmt in VALUE_FORMATS:
        target = out if fmt == values else out.with_name(f".{out.name}.{fmt}.probe")
        rep = export(model.state_dict(), target, arch, values=fmt, extra=extra)
        header, state = read(target)
        err, _ = evaluate(build_from_export(header, state), splits.test)
        formats[fmt] = {"file_bytes": rep["file_bytes"], "ratio": rep["ratio"],
                        "test_error": err, "error_change": err - base_err}
        if fmt == values:
            chosen = rep
        else:
            target.unlink()
    log(f"{'values':6s} {'bytes':>9s} {'x smaller':>9s} {'test err %':>10s} {'change':>7s}")
    for fmt, f in formats.items():
        mark = "  <- written" if fmt == values else ""
        log(f"{fmt:6s} {f['file_bytes']:9,d} {f['ratio']:9.1f} {f['test_error']:10.2f} "
            f"{f['error_change']:+7.2f}{mark}")
    log(f"dense fp32: {chosen['dense_fp32_bytes']:,} bytes; {out}: {chosen['file_bytes']:,} bytes "
        f"({chosen['ratio']:.1f}x smaller); checkpoint test error {base_err:.2f}%")
    for n, m in chosen["layers"].items():
        log(f"  {n:24s} {m['encoding']:10s} nnz {m['nnz']:8,d}  {m['bytes']:9,d} B")
    result = {"file": str(out), "checkpoint_test_error": base_err, "formats": formats,
              "file_bytes": chosen["file_bytes"], "dense_fp32_bytes": chosen["dense_fp32_bytes"],
              "ratio": chosen["ratio"], "min_csr_bitmask_bytes": chosen["min_csr_bitmask_bytes"]}
    if onnx_path is not None:
        result["onnx"] = check_onnx(model, onnx_path, info.input_shape, splits.test[0][:256])
        log(f"ONNX: {onnx_path}, max |onnxruntime - torch| = {result['onnx']['max_abs_diff']:.2e}")
    return result


def check_onnx(model: nn.Module, path: str | Path, input_shape, x: torch.Tensor) -> dict:
    """Export to ONNX and compare onnxruntime's outputs with PyTorch's on ``x``."""
    export_onnx(model, path, tuple(input_shape))
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking the ONNX file needs onnxruntime: pip install "
                          "'sensprune[onnx]'") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    return {"file": str(path), "bytes": Path(path).stat().st_size,
            "max_abs_diff": float(np.abs(got - want).max())}


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
