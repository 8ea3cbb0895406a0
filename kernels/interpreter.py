"""What the Triton interpreter (``TRITON_INTERPRET=1``, how every kernel is tested on CPU) gets wrong
about bf16, and the kernels' way round it.

The interpreter (triton 3.9) multiplies bf16 dot operands as their raw 16-bit integers and casts fp32 to
bf16 by truncation (a bias towards zero that sums up over rows in weight gradients, and outputs that
differ from torch's round-to-nearest by up to one bf16 step). Interpreted, bf16 dot operands are rounded
to nearest-even by hand and multiplied in fp32, and bf16 outputs rounded the same way before the cast:
the numbers a GPU gives with bf16 tensor cores accumulating in fp32. Compiled kernels never take these
branches (``INTERPRETED`` is a constexpr, so they are not even compiled in).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def round_to_bfloat16(tile):
    """The nearest bf16 value (ties to even) of each element, kept in fp32."""
    bits = tile.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(tile, DOT_DTYPE: tl.constexpr):
    """``tile`` as a tl.dot operand of dtype DOT_DTYPE."""
    if INTERPRETED and DOT_DTYPE == tl.bfloat16:
        operand = round_to_bfloat16(tile)
    else:
        operand = tile.to(DOT_DTYPE)
    return operand


@triton.jit
def cast_output(tile, DTYPE: tl.constexpr):
    """``tile`` cast to DTYPE (a stored output's dtype), rounding to nearest-even."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        tile = round_to_bfloat16(tile)
    return tile.to(DTYPE)
