"""Deploying a pruned model: the compact file (``container``, with the tensor layouts of
``encodings``), sparse inference (``engine``, ``inference``), ONNX (``onnx_export``), and
:func:`export_checkpoint`, the one call behind ``sensprune export``."""

from __future__ import annotations

from pathlib import Path

from .chain import build_chain, chain_spec
from .compaction import NotCompactable, Select
from .compaction import compact as compact_model
from .container import COMPRESSIONS, FORMAT, _check_output, _digest, export, read  # noqa: F401
from .encodings import VALUE_FORMATS, candidate_encodings, index_dtype
from .engine import InferenceChain
from .inference import (SparseLinear, bench_inference, build_from_export, choose_kernels, load,
                        to_sparse_inference)
from .onnx_export import check_onnx, export_onnx

__all__ = ["COMPRESSIONS", "FORMAT", "InferenceChain", "NotCompactable", "Select", "SparseLinear", "VALUE_FORMATS",
           "bench_inference", "build_chain", "build_from_export", "candidate_encodings",
           "chain_spec", "check_onnx", "choose_kernels", "compact_model", "export",
           "export_checkpoint", "export_onnx", "index_dtype", "load", "read",
           "to_sparse_inference"]


def _source_model(source: str | Path):
    """(model, dataset, input_shape, num_classes, model name) of a run or of an export."""
    p = Path(source)
    if p.is_file() and p.suffix == ".safetensors":
        header, state = read(p)
        arch = header["arch"]
        model = build_from_export(header, state)
        for v in model.state_dict().values():  # an export may hold a chain already
            v.requires_grad_(False)
        return (model, header.get("dataset", "mnist"), tuple(arch["input_shape"]),
                arch["num_classes"], arch.get("source_model", arch["model"]))
    from ..checkpoint import load_run_model
    from ..data import dataset_info

    cfg, model = load_run_model(p)
    info = dataset_info(cfg.dataset)
    return model, cfg.dataset, tuple(info.input_shape), info.num_classes, cfg.model


def export_checkpoint(checkpoint: str | Path, out: str | Path, values: str = "fp32",
                      data_dir: str | None = None, onnx_path: str | Path | None = None,
                      compact: bool = False, compress: str = "none") -> dict:
    """Export a trained model (a run directory, its checkpoint, or an earlier export); measure
    the test error of each value format (fp32, fp16, int8) against the model's own, and
    optionally write and check an ONNX file. ``compact``: remove every unit with no path to
    the output first (``compaction.compact``; a model that is not a chain is exported as it
    is, and the report says why). ``compress="lzma"``: pack the arrays into one LZMA stream.
    The report (``report.export_text``) says which format was written and what each costs."""
    from ..data import load_dataset
    from ..pruning import sparsity_report
    from ..evaluation import evaluate

    _check_output(out)  # before any work
    model, dataset, input_shape, num_classes, model_name = _source_model(checkpoint)
    splits = load_dataset(dataset, data_dir)
    info = splits.info
    base_err, _ = evaluate(model, splits.test)
    sp = sparsity_report(model)
    dense_bytes = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    arch = {"model": model_name, "num_classes": num_classes, "input_shape": list(input_shape)}
    compaction = None
    if compact:
        try:
            model, compaction = compact_model(model, input_shape)
            arch = {**arch, "model": "chain", "source_model": model_name,
                    "layers": chain_spec(model)}
        except NotCompactable as exc:
            compaction = {"not_compacted": str(exc)}
    extra = {"dataset": dataset, "normalization": {"mean": info.mean, "std": info.std},
             "summary": {"test_error": base_err, "compression_ratio": sp["compression_ratio"],
                         "nonzero_params": sp["nonzero_params"],
                         "total_params": sp["total_params"]}}
    out = Path(out)
    formats = {}
    for fmt in VALUE_FORMATS:
        target = out if fmt == values else out.with_name(f".{out.name}.{fmt}.probe")
        rep = export(model.state_dict(), target, arch, values=fmt, extra=extra, compress=compress)
        try:
            header, state = read(target)
            err, _ = evaluate(build_from_export(header, state), splits.test)
        finally:
            if fmt != values:
                target.unlink(missing_ok=True)
        formats[fmt] = {"file_bytes": rep["file_bytes"], "ratio": dense_bytes / rep["file_bytes"],
                        "test_error": err, "error_change": err - base_err}
        if fmt == values:
            chosen = rep
    result = {"file": str(out), "checkpoint_test_error": base_err, "formats": formats,
              "file_bytes": chosen["file_bytes"], "dense_fp32_bytes": dense_bytes,
              "ratio": dense_bytes / chosen["file_bytes"],
              "min_csr_bitmask_bytes": chosen["min_csr_bitmask_bytes"],
              "values": values, "compress": compress, "layers": chosen["layers"],
              "compaction": compaction}
    if onnx_path is not None:
        result["onnx"] = check_onnx(model, onnx_path, info.input_shape, splits.test[0][:256])
    return result
