"""Deploying a pruned model: the compact file (``container``, with the tensor layouts of
``encodings``), sparse inference (``inference``), ONNX (``onnx_export``), and
:func:`export_checkpoint`, the one call behind ``sensprune export``."""

from __future__ import annotations

from pathlib import Path

from .container import FORMAT, _check_output, _digest, export, read  # noqa: F401
from .encodings import VALUE_FORMATS, candidate_encodings, index_dtype
from .inference import (SparseLinear, bench_inference, build_from_export, choose_kernels, load,
                        to_sparse_inference)
from .onnx_export import check_onnx, export_onnx

save_file, load_file = export, read  # safetensors-shaped names for the same two verbs

__all__ = ["FORMAT", "VALUE_FORMATS", "SparseLinear", "bench_inference", "build_from_export",
           "candidate_encodings", "check_onnx", "choose_kernels", "export", "export_checkpoint",
           "export_onnx", "index_dtype", "load", "load_file", "read", "save_file",
           "to_sparse_inference"]


def export_checkpoint(checkpoint: str | Path, out: str | Path, values: str = "fp32",
                      data_dir: str | None = None, onnx_path: str | Path | None = None) -> dict:
    """Export a training checkpoint; measure the test error of each value format (fp32, fp16,
    int8) against the checkpoint's own, and optionally write and check an ONNX file. The
    report (``report.export_text``) says which format was written and what each costs."""
    from ..checkpoint import load_run_model
    from ..data import load_dataset
    from ..pruning import sparsity_report
    from ..train import evaluate

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
    result = {"file": str(out), "checkpoint_test_error": base_err, "formats": formats,
              "file_bytes": chosen["file_bytes"], "dense_fp32_bytes": chosen["dense_fp32_bytes"],
              "ratio": chosen["ratio"], "min_csr_bitmask_bytes": chosen["min_csr_bitmask_bytes"],
              "values": values, "layers": chosen["layers"]}
    if onnx_path is not None:
        result["onnx"] = check_onnx(model, onnx_path, info.input_shape, splits.test[0][:256])
    return result
