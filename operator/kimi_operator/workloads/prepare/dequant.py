"""INT4 (compressed-tensors pack-quantized, symmetric, group-wise) -> BF16, bit-exact.

Element c of row r sits in int32 word c//8 at bits 4*(c%8), low nibble first, stored as q+8; the
weight is bf16(float32(q) * float32(scale[r, c // group])). q has at most 4 significant bits and a
bf16 scale 8, so the float32 product is exact and the only rounding is the final round to nearest
even into bf16: the one compressed-tensors' own dequantisation performs, hence identical bits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kimi_operator.workloads.prepare import native

Array = np.ndarray[Any, Any]

# float32 value of every nibble: stored v means q = v - 8.
_NIBBLE_VALUES = (np.arange(16, dtype=np.float32) - 8).astype(np.float32)
_BF16_QUIET_NAN = np.uint16(0x7FC0)


class DequantError(ValueError):
    """Shapes or dtypes that cannot be an int4 pack; the message names the tensor."""


def bf16_to_f32(bits: Array) -> Array:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: Array) -> Array:
    """Round float32 to bfloat16 bit patterns, to nearest even, NaN to the quiet NaN as torch does."""
    u = values.view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = _BF16_QUIET_NAN
    return rounded


def _check(name: str, packed: Array, scale_bits: Array, shape: tuple[int, int], group_size: int) -> None:
    rows, cols = shape
    if packed.dtype not in (np.int32, np.uint32):
        raise DequantError(f"{name}: weight_packed is {packed.dtype}, expected int32")
    if scale_bits.dtype != np.uint16:
        raise DequantError(f"{name}: weight_scale must be BF16")
    if cols % 8:
        raise DequantError(f"{name}: {cols} columns do not fill whole int32 words of 8 nibbles")
    if group_size <= 0 or group_size % 8:
        raise DequantError(f"{name}: group size {group_size} is not a positive multiple of 8")
    if cols % group_size:
        raise DequantError(f"{name}: group size {group_size} does not divide the row of {cols} columns")
    if packed.shape != (rows, cols // 8):
        raise DequantError(f"{name}: weight_packed has shape {list(packed.shape)}, expected {[rows, cols // 8]}")
    groups = cols // group_size
    if scale_bits.shape != (rows, groups):
        raise DequantError(f"{name}: weight_scale has shape {list(scale_bits.shape)}, expected {[rows, groups]}")


def dequantize(name: str, packed: Array, scale_bits: Array, shape: tuple[int, int], group_size: int) -> Array:
    """Return the bf16 bit patterns (uint16, ``shape``) of one packed weight."""
    rows, cols = shape
    _check(name, packed, scale_bits, shape, group_size)
    groups = cols // group_size
    # Little-endian words: byte k of a word holds nibbles 2k (low) and 2k+1 (high).
    nibble_bytes = packed.view(np.uint8).reshape(rows, cols // 2)
    nibbles = np.empty((rows, cols // 2, 2), dtype=np.uint8)
    np.bitwise_and(nibble_bytes, 0x0F, out=nibbles[:, :, 0])
    np.right_shift(nibble_bytes, 4, out=nibbles[:, :, 1])
    values = _NIBBLE_VALUES[nibbles.reshape(rows, groups, group_size)]
    # inf * 0 is NaN and huge scales overflow, exactly as in torch: not worth a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        values *= bf16_to_f32(scale_bits)[:, :, None]
    return f32_to_bf16(values).reshape(rows, cols)


def dequantize_fast(
    name: str, packed: Array, scale_bits: Array, shape: tuple[int, int], group_size: int, *, threads: int = 1
) -> Array:
    """As :func:`dequantize`, through the compiled kernel, rows split over ``threads`` threads."""
    rows, cols = shape
    _check(name, packed, scale_bits, shape, group_size)
    packed = np.ascontiguousarray(packed)
    scale_bits = np.ascontiguousarray(scale_bits)
    out = np.empty((rows, cols), dtype=np.uint16)
    step = max(1, -(-rows // max(1, threads)))
    ranges = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    if len(ranges) == 1:
        native.dequantize_rows(packed, scale_bits, out, cols=cols, group_size=group_size, rows=ranges[0])
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            list(
                pool.map(
                    lambda rr: native.dequantize_rows(
                        packed, scale_bits, out, cols=cols, group_size=group_size, rows=rr
                    ),
                    ranges,
                )
            )
    return out
