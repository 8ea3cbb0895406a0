"""Row statistics (mean and centred sum of squares) merged chunk by chunk, for kernels that walk a row in
column chunks and never hold it whole (the adapter forwards before their LayerNorm).

Chan et al.'s parallel formula: each chunk's own mean and centred sum of squares are exact, and merging them
never subtracts two large sums as E[z^2] - E[z]^2 would: two-pass accuracy in one pass.
"""

import triton
import triton.language as tl


@triton.jit
def merge_chunk_statistics(
    mean,  # (ROWS,) of the columns merged so far
    centred_squares,  # (ROWS,) likewise
    z,  # (ROWS, BLOCK_K) this chunk, zero outside the matrix
    column_mask,  # (BLOCK_K,) columns of the chunk inside the row
    start,  # first column of the chunk (= the number of columns merged so far)
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """(mean, centred sum of squares) of the columns merged so far and this chunk's."""
    # In ACC_DTYPE, not as "* 1.0" (fp32): fp64 statistics need fp64 merge weights too.
    seen = tl.cast(start, ACC_DTYPE)
    count = tl.cast(tl.minimum(H - start, BLOCK_K), ACC_DTYPE)
    chunk_mean = tl.sum(z, axis=1) / count
    centred = tl.where(column_mask[None, :], z - chunk_mean[:, None], 0.0)
    delta = chunk_mean - mean
    mean += delta * (count / (seen + count))
    centred_squares += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / (seen + count))
    return mean, centred_squares
