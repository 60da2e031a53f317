"""The export container: a safetensors file whose metadata holds the JSON header (format,
architecture, per-tensor encodings, normalization, summary figures) and a SHA-256 over the
header and every stored byte. ``save_file`` / ``load_file`` in the spirit of safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .encodings import VALUE_FORMATS, _decode_tensor, _encode_tensor

FORMAT = "sensprune-sparse/1"


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
