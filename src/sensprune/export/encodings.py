"""Tensor encodings of the export format: an encoder and a decoder per layout.

Each parameter is stored in the smallest of
  * ``dense``      — all values;
  * ``csr``        — row pointers + column indices (narrowest unsigned dtype that fits) +
                     values, over the tensor viewed as (shape[0], rest);
  * ``bitmask``    — one bit per entry (packed) + the non-zero values;
  * ``delta8``     — the positions of the non-zeros of the flattened tensor as uint8 gaps
                     from the previous one (gaps over 255 take filler entries with value 0),
                     as in Deep Compression's relative indexing;
  * ``csr-delta8``   — the same gaps within each row, plus row pointers (wins when whole rows,
                     i.e. dead neurons, are empty).
Values are fp32 (default), fp16, int8 with one fp32 scale per tensor (symmetric), or
``int8-row`` with one fp16 scale per output row (neuron, channel; the ``scales`` array);
1-D tensors such as biases are stored fp16 in the int8 modes. The container (``container.py``)
records each tensor's layout in its header.
"""

from __future__ import annotations

import lzma

import numpy as np
import torch

from ..errors import CheckpointError

VALUE_FORMATS = ("fp32", "fp16", "int8", "int8-row")
_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def index_dtype(max_value: int) -> np.dtype:
    """Narrowest unsigned dtype that holds ``max_value``."""
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"index {max_value} too large")


# -- encoding -------------------------------------------------------------------------------------
def _values(v: np.ndarray, fmt: str, row_of: np.ndarray | None = None,
            n_rows: int = 1) -> tuple[np.ndarray, float | np.ndarray | None]:
    """(stored values, scale): None for fp32/fp16, a float for int8, an fp16 array of one
    scale per row for int8-row (``row_of``: the row of each value)."""
    if fmt == "fp32":
        return v.astype(np.float32), None
    if fmt == "fp16":
        return v.astype(np.float16), None
    if fmt == "int8-row":
        peak = np.zeros(n_rows, np.float32)
        np.maximum.at(peak, row_of, np.abs(v).astype(np.float32))
        scales = (peak / np.float32(127.0)).astype(np.float16)  # what decoding multiplies by
        s32 = scales.astype(np.float32)[row_of]
        q = np.divide(v, s32, out=np.zeros(v.shape, np.float32), where=s32 > 0)
        return np.clip(np.round(q), -127, 127).astype(np.int8), scales
    # the scale as float32 (what decoding multiplies by): a short number in the header
    scale32 = np.float32(np.abs(v).max() / np.float32(127.0)) if v.size else np.float32(0)
    if scale32 == 0:
        return np.zeros(v.shape, np.int8), 1.0
    scale = float(np.format_float_positional(scale32, unique=True))  # rounds back to scale32
    return np.clip(np.round(v / scale32), -127, 127).astype(np.int8), scale


def _csr(mat: np.ndarray):
    rows, cols = np.nonzero(mat)
    indptr = np.zeros(mat.shape[0] + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), rows, cols


def candidate_encodings(t: torch.Tensor, fmt: str) -> dict[str, tuple[dict[str, np.ndarray], float | None]]:
    """Every encoding of one tensor: {name: (arrays, int8 scale or None)} (int8-row: the
    per-row scales are the ``scales`` array)."""
    a = t.detach().cpu().numpy().astype(np.float32)
    flat = a.reshape(-1)
    mat = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
    candidates: list[tuple[str, dict[str, np.ndarray], float | np.ndarray | None]] = []
    n_rows, n_cols = mat.shape

    vals, scale = _values(flat, fmt, np.arange(flat.size) // max(n_cols, 1), n_rows)
    candidates.append(("dense", {"values": vals}, scale))

    nz = flat != 0
    indptr, rows, cols = _csr(mat)
    nnz_vals, scale_nz = _values(mat[rows, cols], fmt, rows, n_rows)
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
    d_rows = np.zeros(len(gaps), np.int64)  # fillers hold 0: any row's scale fits them
    d_rows[last] = pos // max(n_cols, 1)
    dvals, dscale = _values(d_vals, fmt, d_rows, n_rows)
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
    dvals, dscale = _values(d_vals, fmt, np.repeat(np.arange(n_rows), per_row), n_rows)
    candidates.append(("csr-delta8", {"indptr": d_ptr.astype(index_dtype(int(d_ptr[-1]))),
                                      "gaps": gaps, "values": dvals}, dscale))

    out = {}
    for name, arrays, sc in candidates:
        if isinstance(sc, np.ndarray):  # one scale per row: stored beside the values
            arrays, sc = {**arrays, "scales": sc}, None
        out[name] = (arrays, sc)
    return out


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in arrays.values())


# raw LZMA (no container overhead: the header records what is inside), a small dictionary
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]


def _packed_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays once LZMA-compressed (how a packed export stores them)."""
    return len(lzma.compress(b"".join(a.tobytes() for a in arrays.values()),
                             format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))


def _encode_tensor(name: str, t: torch.Tensor, fmt: str,
                   compressed: bool = False) -> tuple[dict, dict[str, np.ndarray], int]:
    """(layer metadata, arrays, min(CSR, bitmask) bytes) of the smallest encoding of a tensor
    (smallest once compressed, with ``compressed``)."""
    cands = candidate_encodings(t, fmt)
    size = _packed_bytes if compressed else _nbytes
    enc = min(cands, key=lambda k: size(cands[k][0]))
    arrays, sc = cands[enc]
    meta = {"shape": list(t.shape), "encoding": enc, "nnz": int(torch.count_nonzero(t)),
            "bytes": _nbytes(arrays)}
    if sc is not None:
        meta["scale"] = sc
    reference = min(_nbytes(cands["csr"][0]), _nbytes(cands["bitmask"][0]))
    return meta, {f"{name}/{k}": v for k, v in arrays.items()}, reference


def _decode_tensor(name: str, meta: dict, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """The dense tensor of one stored layout. The container has checked the arrays' lengths
    (``container.check_arrays``); here every index is checked against its bound and every
    value for finiteness, so a crafted file cannot move a weight or plant a NaN."""
    shape = tuple(meta["shape"])
    numel = int(np.prod(shape)) if shape else 1
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // max(rows, 1)
    vals = arrays[f"{name}/values"].astype(np.float32)
    pos = _positions(name, meta, arrays, numel, rows, cols, len(vals))  # -1: a filler
    if "scale" in meta:
        vals = vals * np.float32(meta["scale"])
    if f"{name}/scales" in arrays:  # one scale per row
        scales = arrays[f"{name}/scales"].astype(np.float32)
        vals = vals * scales[np.maximum(pos, 0) // max(cols, 1)]
    if not np.isfinite(vals).all():
        raise CheckpointError(f"{name} holds non-finite values")
    out = np.zeros(numel, np.float32)
    real = pos >= 0
    out[pos[real]] = vals[real]
    return torch.from_numpy(out.reshape(shape))


def _positions(name: str, meta: dict, arrays: dict[str, np.ndarray], numel: int, rows: int,
               cols: int, n_values: int) -> np.ndarray:
    """The flat position of every stored value (-1 for a delta layout's filler entries),
    each checked against the tensor's bounds; no position twice."""
    enc = meta["encoding"]

    def row_pointers() -> np.ndarray:
        indptr = arrays[f"{name}/indptr"].astype(np.int64)
        if indptr[0] != 0 or (np.diff(indptr) < 0).any():
            raise CheckpointError(f"{name}: row pointers that do not start at 0 or decrease")
        return indptr

    if enc == "dense":
        return np.arange(numel)
    if enc == "bitmask":
        mask = np.unpackbits(arrays[f"{name}/mask"], count=numel).astype(bool)
        if int(mask.sum()) != n_values:
            raise CheckpointError(f"{name}: the mask marks {int(mask.sum())} entries for "
                                  f"{n_values} values")
        return np.flatnonzero(mask)
    if enc == "csr":
        indptr = row_pointers()
        idx = arrays[f"{name}/indices"].astype(np.int64)
        if indptr[-1] != len(idx) or (idx >= cols).any():
            raise CheckpointError(f"{name}: column indices out of range or row pointers that "
                                  "do not cover them")
        flat = np.repeat(np.arange(rows), np.diff(indptr)) * cols + idx
        if len(np.unique(flat)) != len(flat):
            raise CheckpointError(f"{name}: the same entry is stored twice")
        return flat
    if enc == "delta8":
        gaps = arrays[f"{name}/gaps"].astype(np.int64)
        pos = np.cumsum(gaps) - 1
        if len(pos) and ((gaps[1:] == 0).any() or pos[-1] >= numel or pos[0] < 0):
            raise CheckpointError(f"{name}: positions out of range")
        filler = (gaps == 255) & (arrays[f"{name}/values"] == 0)
        return np.where(filler, -1, pos)
    if enc == "csr-delta8":
        indptr = row_pointers()
        gaps = arrays[f"{name}/gaps"].astype(np.int64)
        if indptr[-1] != len(gaps):
            raise CheckpointError(f"{name}: row pointers that do not cover the gaps")
        csum = np.concatenate([[0], np.cumsum(gaps)])
        r = np.repeat(np.arange(rows), np.diff(indptr))
        c = csum[1:] - csum[indptr[:-1]][r] - 1  # column = gaps summed within the row, - 1
        starts = np.zeros(len(gaps), bool)
        starts[indptr[:-1][indptr[:-1] < len(gaps)]] = True
        if len(c) and ((c < 0).any() or (c >= cols).any() or (gaps[~starts] == 0).any()):
            raise CheckpointError(f"{name}: column positions out of range")
        filler = (gaps == 255) & (arrays[f"{name}/values"] == 0)
        return np.where(filler, -1, r * cols + c)
    raise CheckpointError(f"unknown encoding {enc!r} for {name}")


def encode_index(name: str, t: torch.Tensor) -> tuple[dict, dict[str, np.ndarray]]:
    """An increasing index (a compacted chain's kept inputs) as a bitmap over 0..max."""
    idx = t.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if idx.size and (idx[0] < 0 or (np.diff(idx) <= 0).any()):
        raise ValueError(f"{name}: an index tensor must be increasing and >= 0")
    universe = int(idx[-1]) + 1 if idx.size else 0
    bits = np.zeros(universe, dtype=bool)
    bits[idx] = True
    meta = {"shape": [int(idx.size)], "encoding": "bitset", "universe": universe,
            "bytes": (universe + 7) // 8}
    return meta, {f"{name}/mask": np.packbits(bits)}


def decode_index(name: str, meta: dict, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """The int64 index a bitset holds (its length checked against the declared shape)."""
    bits = np.unpackbits(arrays[f"{name}/mask"], count=int(meta["universe"]))
    idx = np.flatnonzero(bits)
    if idx.size != int(meta["shape"][0]):
        raise CheckpointError(f"{name}: the bitset holds {idx.size} entries, the header "
                              f"declares {meta['shape'][0]}")
    return torch.from_numpy(idx.astype(np.int64))
