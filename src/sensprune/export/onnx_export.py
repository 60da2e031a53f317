"""ONNX export of a pruned model and a check of onnxruntime against PyTorch (optional
packages: pip install 'sensprune[onnx]')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import atomic_path
from ..errors import ConfigError


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """ONNX export of the (pruned, dense-layout) model with a dynamic batch dimension."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the optional packages: pip install "
                          "'sensprune[onnx]' (onnx, onnxruntime)") from None
    x = torch.randn(2, *input_shape)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a fault leaves no torn file
            torch.onnx.export(model.eval(), (x,), str(tmp), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                     "logits": {0: "batch"}},
                              dynamo=False)
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}); nothing was written "
                          "there; fix the folder or free space and export again") from None
    return path


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
