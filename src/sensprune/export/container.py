"""The export container: a safetensors file whose metadata holds the JSON header (format,
architecture, per-tensor encodings, normalization, summary figures) and a SHA-256 over the
header and every stored byte. ``export`` writes one, ``read`` checks the header's declared
sizes against the file before allocating anything, then the digest, and decodes it."""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import TREE_KEY, atomic_path
from ..errors import CheckpointError, ConfigError
from .encodings import LZMA_FILTERS as _LZMA_FILTERS
from .encodings import (VALUE_FORMATS, _decode_tensor, _encode_tensor, decode_index,
                        encode_index)
_DTYPES = {"|u1": ("U8", np.uint8), "<u2": ("U16", np.uint16), "<u4": ("U32", np.uint32),
           "<u8": ("U64", np.uint64), "<f4": ("F32", np.float32), "<f2": ("F16", np.float16),
           "|i1": ("I8", np.int8)}

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


COMPRESSIONS = ("none", "lzma")


def export(state_dict: dict[str, torch.Tensor], path: str | Path, arch: dict[str, Any],
           values: str = "fp32", extra: dict[str, Any] | None = None,
           compress: str = "none") -> dict:
    """Write ``state_dict`` compactly to ``path`` (safetensors); returns the size report.

    ``arch`` = {"model": registry name, "num_classes": C, "input_shape": [...]}. Buffers
    and biases are stored like any tensor (dense when that is smallest). With int8 values,
    only tensors with more than one dimension are quantized (``int8-row``: one scale per
    row); 1-D tensors are stored fp16.
    Integer index tensors (a compacted chain's input selection) are stored as bitsets.
    ``compress="lzma"`` packs every array into one LZMA stream (each tensor's layout is then
    the one that compresses smallest): files near the entropy of the masks and values.
    """
    from safetensors.numpy import save_file

    if values not in VALUE_FORMATS:
        raise ConfigError(f"values must be one of {', '.join(VALUE_FORMATS)}, got {values!r}")
    if compress not in COMPRESSIONS:
        raise ConfigError(f"compress must be one of {', '.join(COMPRESSIONS)}, got {compress!r}")
    layers, arrays = {}, {}
    dense_bytes = reference = 0
    for name, t in state_dict.items():
        if torch.is_tensor(t) and not t.is_floating_point() and name.endswith(".index"):
            meta, arr = encode_index(name, t)
            layers[name] = meta
            arrays.update(arr)
            continue
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        fmt = values if (not values.startswith("int8") or t.dim() > 1) else "fp16"
        meta, arr, ref = _encode_tensor(name, t, fmt, compressed=compress != "none")
        reference += ref
        meta["values"] = fmt
        layers[name] = meta
        arrays.update(arr)
        dense_bytes += t.numel() * 4
    # a packed file keeps only what decoding needs per tensor (the report has the rest)
    file_layers = layers if compress == "none" else {
        n: {k: v for k, v in m.items() if k not in ("nnz", "bytes")} for n, m in layers.items()}
    header = {"format": FORMAT, "arch": arch, "values": values, "layers": file_layers,
              **(extra or {})}
    stored = arrays
    if compress == "lzma":
        header["packed"] = [[k, arrays[k].dtype.str, int(arrays[k].size)] for k in sorted(arrays)]
        stored = {"packed": np.frombuffer(lzma.compress(
            b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays)),
            format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS), dtype=np.uint8)}
    header["sha256_all"] = _digest(arrays, header)
    path = _check_output(path)
    text = json.dumps(header, separators=(",", ":"))
    if compress == "lzma":  # the header too (JSON inside JSON escapes every quote)
        text = "lzma:" + base64.b85encode(lzma.compress(
            text.encode(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)).decode()
    try:
        with atomic_path(path) as tmp:
            save_file(stored, str(tmp), metadata={"sensprune": text})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an export is shared
    except Exception as exc:  # a read-only folder, a full disk, a file-size limit
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
        raise CheckpointError(f"cannot write {path} ({why}); nothing was written there (an "
                              "older file of that name is kept); fix the folder or free space "
                              "and export again") from None
    size = path.stat().st_size
    payload = sum(v.nbytes for v in stored.values())
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


MAX_EXPORT_BYTES = 8 << 30  # no sensprune export is near this (VGG-16 dense fp32: 0.55 GB)
MAX_TENSOR_NUMEL = 1 << 31
# The entries a file declares are bounded by its size: sensprune's own exports hold ~30
# entries per byte (fp32, 200x), ~360 at 1,000x and ~700 at 2,000x in int8 + LZMA; an empty
# CSR that declares a 16000x16000 layer in 16 KB (16,000 per byte) is a memory bomb.
NUMEL_PER_FILE_BYTE = 1024
# LZMA turns long zero runs into almost nothing; sensprune's arrays unpack to at most ~2.2
# bytes per file byte, so a payload beyond this is a decompression bomb
MAX_UNPACKED_PER_FILE_BYTE = 64
# The absolute cap on what one load decodes (fp32 bytes of the state), whatever the file's
# size. Setting the environment variable replaces both bounds with its value: the way to load
# a model over 2 GiB, or one so sparse (> ~2,000x) that it holds more entries per byte.
LOAD_LIMIT_ENV = "SENSPRUNE_MAX_LOAD_BYTES"
DEFAULT_MAX_LOAD_BYTES = 2 << 30


def max_load_bytes() -> tuple[int, bool]:
    """(the cap on the decoded state of one export, whether the user set it): the value of
    $SENSPRUNE_MAX_LOAD_BYTES, or 2 GiB (VGG-16 dense in fp32 decodes to 0.55 GB)."""
    raw = os.environ.get(LOAD_LIMIT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_MAX_LOAD_BYTES
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return int(value), bool(raw.strip())
    except ValueError:
        raise CheckpointError(f"{LOAD_LIMIT_ENV}={raw!r} is not a number of bytes; set it to "
                              "e.g. 8e9 or unset it") from None


def _check_total(entries: int, unpacked_bytes: int, file_bytes: int) -> None:
    """Refuse a load that would decode more than the file could hold, or than the cap."""
    cap, user_set = max_load_bytes()
    if 4 * entries > cap or (user_set and unpacked_bytes > cap):
        raise CheckpointError(f"the header declares {entries} entries ({4 * entries / 2**30:.2f} "
                              f"GiB decoded), over the load limit of {cap} bytes; if the model "
                              f"is really that large, raise {LOAD_LIMIT_ENV}")
    if user_set:
        return  # the user's cap replaces the per-byte bounds
    if entries > NUMEL_PER_FILE_BYTE * file_bytes + (1 << 20):
        raise CheckpointError(f"the header declares {entries} entries, far more than a "
                              f"{file_bytes}-byte file can hold (at most {NUMEL_PER_FILE_BYTE} "
                              f"per byte; {LOAD_LIMIT_ENV} lifts this for a trusted file); "
                              "refused")
    if unpacked_bytes > MAX_UNPACKED_PER_FILE_BYTE * file_bytes + (1 << 20):
        raise CheckpointError(f"the header declares {unpacked_bytes} unpacked bytes, far more "
                              f"than a {file_bytes}-byte file can hold; refused")


def _expected_shapes(arch: Any) -> dict[str, tuple[int, ...]] | None:
    """The state_dict shapes of a bundled architecture (built on the meta device: nothing is
    allocated), or None for a model sensprune does not know (the user's own)."""
    from ..models import MODELS, build_model
    from .chain import build_chain

    chain = isinstance(arch, dict) and arch.get("model") == "chain"
    if not chain and (not isinstance(arch, dict) or arch.get("model") not in MODELS):
        return None
    nc, shape = arch.get("num_classes"), arch.get("input_shape")
    if (not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= 1_000_000
            or not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536
                       for d in shape)):
        raise CheckpointError("the export's architecture (num_classes, input_shape) is out of "
                              "range; export it again")
    if chain:
        with torch.device("meta"):
            layers = build_chain(arch.get("layers"))
        return {k: tuple(v.shape) for k, v in layers.state_dict().items()}
    try:
        with torch.device("meta"):
            model = build_model(arch["model"], nc, tuple(shape))
    except Exception as exc:
        raise CheckpointError(f"the export's architecture cannot be built ({type(exc).__name__})"
                              "; export it again") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, dense state_dict) of an exported file. The file is untrusted: its size, the
    header's architecture, every declared shape and array length are checked before anything
    is allocated; every index against its bound and every value and scale for finiteness
    while decoding; the SHA-256 over header and payload before the state is returned."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; give the export file")
    size = p.stat().st_size
    if size > MAX_EXPORT_BYTES:
        raise CheckpointError(f"{p}: {size} bytes, larger than any sensprune export; not read")
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic == b"PK":  # a torch.save zip archive (never unpickled)
        raise CheckpointError(f"{p} is a PyTorch pickle file, not an export; write one with "
                              "`sensprune export RUN -o FILE.safetensors`")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if "sensprune" not in meta and TREE_KEY in meta:  # checkpoint.pt or model.pt
                raise CheckpointError(f"{p} is a run's checkpoint or model, not an export; "
                                      "write one with `sensprune export RUN -o FILE.safetensors`")
            header = json.loads(_header_text(meta["sensprune"]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else None
                raise CheckpointError(f"{p}: unsupported format {found!r}")
            declared = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                        for k in f.keys()}
            if "packed" in header:
                declared = _packed_layout(header["packed"], declared, size)
            _check_layout(header, declared, size)
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            if "packed" in header:
                arrays = _unpack(header["packed"], arrays["packed"])
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}" if not str(exc).startswith(str(p)) else str(exc)) \
            from None
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: not a sensprune export (no sensprune metadata)") from None
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"{p}: truncated or corrupt file ({type(exc).__name__}: "
                              f"{str(exc)[:80]}); export it again") from None
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
        state = {n: decode_index(n, m, arrays) if m.get("encoding") == "bitset"
                 else _decode_tensor(n, m, arrays) for n, m in header["layers"].items()}
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    except Exception as exc:  # a checksum can be recomputed by hand: still no raw errors
        raise CheckpointError(f"{p}: malformed header ({type(exc).__name__}: {str(exc)[:80]}); "
                              "export it again") from None
    return header, state


MAX_HEADER_BYTES = 16 << 20


def _header_text(text: str) -> str:
    """The header's JSON; an LZMA-packed one is unpacked to at most MAX_HEADER_BYTES."""
    if not text.startswith("lzma:"):
        return text
    try:
        raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(
            base64.b85decode(text[5:]), max_length=MAX_HEADER_BYTES)
    except (ValueError, lzma.LZMAError):
        raise CheckpointError("the packed header does not decompress; export it again") from None
    return raw.decode("utf-8", errors="replace")


def _packed_layout(packed: Any, declared: dict, file_bytes: int) -> dict:
    """The arrays an LZMA-packed file declares (names, dtypes, lengths), checked: a known
    dtype each, and an unpacked size the file could plausibly hold."""
    if (set(declared) != {"packed"} or declared["packed"][1] != "U8" or not isinstance(packed, list)
            or not all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                       and e[1] in _DTYPES and isinstance(e[2], int) and not isinstance(e[2], bool)
                       and 0 <= e[2] <= MAX_TENSOR_NUMEL for e in packed)):
        raise CheckpointError("malformed packed payload; export it again")
    _check_total(0, _unpacked_bytes(packed), file_bytes)
    return {e[0]: ((e[2],), _DTYPES[e[1]][0]) for e in packed}


def _unpacked_bytes(packed: list) -> int:
    return sum(n * np.dtype(_DTYPES[dt][1]).itemsize for _, dt, n in packed)


def _unpack(packed: list, blob: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of an LZMA-packed payload; never more bytes than the header declared."""
    total = _unpacked_bytes(packed)
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        raw = dec.decompress(blob.tobytes(), max_length=total + 1)
    except lzma.LZMAError:
        raise CheckpointError("the packed payload does not decompress; export it again") from None
    if len(raw) != total:
        raise CheckpointError("the packed payload's size is not the declared one; export it "
                              "again")
    arrays, at = {}, 0
    for name, dt, n in packed:
        dtype = np.dtype(_DTYPES[dt][1])
        arrays[name] = np.frombuffer(raw, dtype=dtype, count=n, offset=at).copy()
        at += n * dtype.itemsize
    return arrays


def _check_layout(header: dict, declared: dict[str, tuple[tuple[int, ...], str]],
                  file_bytes: int) -> None:
    """Every layer's declared shape (against the architecture, or bounded by the file size)
    and its arrays (present, of the layout's dtypes and lengths), before anything is read."""
    layers = header.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError("malformed header (no layers); export it again")
    expected = _expected_shapes(header.get("arch"))
    total = 0
    for name, meta in layers.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
            raise CheckpointError(f"malformed header entry for {name!r}; export it again")
        shape = tuple(meta["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if numel > MAX_TENSOR_NUMEL:
            raise CheckpointError(f"{name} declares {numel} entries, more than any model holds")
        if expected is not None:
            if name not in expected:
                raise CheckpointError(f"{name} is not a tensor of a {header['arch']['model']}")
            if expected[name] != shape:
                raise CheckpointError(f"{name} declares shape {list(shape)}, a "
                                      f"{header['arch']['model']} has {list(expected[name])}")
        total += numel
        check_arrays(name, meta, shape, numel, declared)
    _check_total(total, 0, file_bytes)


def check_arrays(name: str, meta: dict, shape: tuple[int, ...], numel: int,
                 declared: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The arrays a layout needs exist, are 1-D, of an allowed dtype and of consistent lengths."""
    enc = meta.get("encoding")
    if enc == "bitset":  # an index: a packed bitmap over its universe
        universe = meta.get("universe")
        if (not isinstance(universe, int) or isinstance(universe, bool) or len(shape) != 1
                or not shape[0] <= universe <= MAX_TENSOR_NUMEL
                or declared.get(f"{name}/mask") != (((universe + 7) // 8,), "U8")):
            raise CheckpointError(f"{name}: the bitset does not fit shape {list(shape)}")
        return
    need = {"dense": ("values",), "bitmask": ("mask", "values"), "csr": ("indptr", "indices",
            "values"), "delta8": ("gaps", "values"), "csr-delta8": ("indptr", "gaps", "values")}
    if enc not in need:
        raise CheckpointError(f"unknown encoding {enc!r} for {name}")
    length = {}
    for part in need[enc]:
        key = f"{name}/{part}"
        if key not in declared:
            raise CheckpointError(f"{key} is missing")
        ashape, dtype = declared[key]
        ok_dtypes = (("F32", "F16", "I8") if part == "values" else
                     ("U8",) if part in ("mask", "gaps") else ("U8", "U16", "U32", "U64"))
        if len(ashape) != 1 or dtype not in ok_dtypes:
            raise CheckpointError(f"{key}: a {dtype} array of shape {list(ashape)}, not what "
                                  f"the {enc} layout stores")
        length[part] = ashape[0]
    if "scale" in meta and not (isinstance(meta["scale"], (int, float))
                                and not isinstance(meta["scale"], bool)
                                and math.isfinite(meta["scale"]) and meta["scale"] >= 0):
        raise CheckpointError(f"{name}: scale {meta['scale']!r} is not a finite number")
    rows = shape[0] if len(shape) >= 2 else 1
    if f"{name}/scales" in declared and declared[f"{name}/scales"] != ((rows,), "F16"):
        raise CheckpointError(f"{name}/scales: not one fp16 scale per row of {list(shape)}")
    bad = (
        enc == "dense" and length["values"] != numel
        or enc == "bitmask" and (length["mask"] != (numel + 7) // 8 or length["values"] > numel)
        or enc == "csr" and (length["indptr"] != rows + 1 or length["indices"] != length["values"]
                             or length["values"] > numel)
        or enc in ("delta8", "csr-delta8") and length["gaps"] != length["values"]
        or enc == "csr-delta8" and length["indptr"] != rows + 1)
    if bad:
        raise CheckpointError(f"{name}: the {enc} arrays' lengths do not fit shape {list(shape)}")
