"""The stored dtype, both ways: checked float16 encoding for the writer, fast exact decoding for the reader."""

from __future__ import annotations

import numpy as np

# Every float16 bit pattern's float32 value: decoding is one table lookup.
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def to_float16(x: np.ndarray) -> np.ndarray | None:
    """``x`` as float16, or ``None`` if it holds NaN/inf or values beyond the float16 range."""
    if x.dtype == np.float16:
        bits = np.ascontiguousarray(x).view(np.uint16)
        if bits.size == 0 or bits.max() < 0x7C00:  # fast path: all non-negative and finite
            return x
        return None if ((bits & 0x7FFF) >= 0x7C00).any() else x  # exponent all ones: inf or NaN
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if x32.size and not (np.isfinite(x32).all() and max(-float(x32.min()), float(x32.max())) <= 65504.0):
        return None
    try:
        import torch  # converts ~4x faster than numpy

        return torch.from_numpy(x32).to(torch.float16).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency, but the store does not need it
        return x32.astype(np.float16)


def to_float32(half: np.ndarray) -> np.ndarray:
    """float16 values as float32, exactly, and faster than numpy's ``astype`` (a table lookup)."""
    return _HALF_TO_FLOAT.take(half.view(np.uint16))
