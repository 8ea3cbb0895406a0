"""Shape buckets for CUDA-graph replay: a (batch, sequence) input runs in the smallest captured
(batch bucket, sequence bucket) that holds it, so a handful of graphs serve every shape.

Powers of two keep the padding waste under 2x in each dimension while the number of graphs (one
per bucket pair) stays small; a graph's memory is mostly its output and activations, which grow
with the bucket, so very large buckets are better left to eager execution.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_SEQUENCE_BUCKETS = (32, 64, 128, 256, 512)
# Token buckets of the unpadded graphs: from the first bucket on (SMALLEST_TOKEN_BUCKET, or the number of steps
# where that is larger), TOKEN_STEPS_PER_DOUBLING even steps between powers of two (16, 17, ..., 32, 34, ...,
# 64, 68, ...): 16 graphs per doubling, and from 16 real tokens on at most 1/16 of a graph's tokens are filler
# (below, the first bucket is mostly filler). Filler is work: with 4 steps (at most 25% filler) the ragged
# benchmark's 4274 real tokens ran as 5120 (session 15, H200), with 8 as 4608, with 16 as 4352; on the H200
# (session 20, bf16, handed host inputs) 16 steps ran that batch in 1.774, 1.666 and 1.623 ms against 8 steps'
# 1.923, 1.764 and 1.647 in three runs, and eight such batches back to back in 11.08 ms against 11.57. More steps
# mean more graphs to capture (lazily, each once), each adding its executable but no buffers: the graphs of a
# (batch, sequence) bucket share one memory pool, one staged input buffer and one output.
SMALLEST_TOKEN_BUCKET = 8
TOKEN_STEPS_PER_DOUBLING = 16
TOKEN_STEPS_CHOICES = (1, 2, 4, 8, 16)


def normalize_buckets(buckets: Iterable[int], name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive ints; a clear ValueError otherwise."""
    values = tuple(buckets)
    if not values:
        raise ValueError(f"{name}: give at least one bucket size")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: bucket sizes must be positive ints, got {value!r}")
    return tuple(sorted(set(values)))


def clip_buckets(buckets: tuple[int, ...], limit: int | None) -> tuple[int, ...]:
    """Buckets above ``limit`` (e.g. the model's max_position_embeddings) replaced by ``limit`` itself:
    a 70-token input must not be padded to 128 positions by a model that has only 100."""
    if limit is None:
        return buckets
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"max_sequence_length must be a positive int, got {limit!r}")
    kept = tuple(b for b in buckets if b < limit)
    return kept + (limit,) if len(kept) < len(buckets) else kept


def bucket_for(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= size, or None when size is beyond the largest."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    return None


@dataclass(frozen=True)
class BucketGrid:
    batch: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    sequence: tuple[int, ...] = DEFAULT_SEQUENCE_BUCKETS

    @classmethod
    def make(
        cls,
        batch: Iterable[int] = DEFAULT_BATCH_BUCKETS,
        sequence: Iterable[int] = DEFAULT_SEQUENCE_BUCKETS,
        max_sequence_length: int | None = None,
    ) -> BucketGrid:
        return cls(
            normalize_buckets(batch, "batch_buckets"),
            clip_buckets(normalize_buckets(sequence, "sequence_buckets"), max_sequence_length),
        )

    def choose(self, batch_size: int, sequence_length: int) -> tuple[int, int] | None:
        """The (batch, sequence) bucket for an input of that shape; None when either is too large."""
        batch = bucket_for(batch_size, self.batch)
        sequence = bucket_for(sequence_length, self.sequence)
        return None if batch is None or sequence is None else (batch, sequence)


@functools.cache  # looked up on every call of an unpadded graphed encoder
def token_buckets(limit: int, steps_per_doubling: int = TOKEN_STEPS_PER_DOUBLING) -> tuple[int, ...]:
    """The token counts unpadded graphs are captured for, up to ``limit`` (the batch bucket times the sequence
    bucket, every token real), which is always the last; ``steps_per_doubling`` (one of TOKEN_STEPS_CHOICES)
    even steps between powers of two, from ``first_token_bucket``."""
    check_steps_per_doubling(steps_per_doubling)
    first = first_token_bucket(steps_per_doubling)
    sizes, step = [first], first // steps_per_doubling
    while sizes[-1] < limit:
        if sizes[-1] + step > 2 * step * steps_per_doubling:
            step *= 2
        sizes.append(sizes[-1] + step)
    return tuple(size for size in sizes if size < limit) + (limit,)


def first_token_bucket(steps_per_doubling: int) -> int:
    """The smallest token bucket: SMALLEST_TOKEN_BUCKET, or the number of steps where that is larger (the steps
    from it are whole tokens); from it on at most 1/steps of a graph's tokens are filler."""
    return max(SMALLEST_TOKEN_BUCKET, steps_per_doubling)


def check_steps_per_doubling(steps_per_doubling: int) -> None:
    if type(steps_per_doubling) is not int or steps_per_doubling not in TOKEN_STEPS_CHOICES:
        raise ValueError(
            f"token steps per doubling must be one of {list(TOKEN_STEPS_CHOICES)}, got {steps_per_doubling!r}"
        )


def token_bucket(real_tokens: int, limit: int, steps_per_doubling: int = TOKEN_STEPS_PER_DOUBLING) -> tuple[int, int]:
    """(the token bucket that holds ``real_tokens`` <= ``limit``, the most filler tokens any input of that bucket
    needs): its graph is recorded for exactly that many tokens, the real ones topped up with filler."""
    if not 0 < real_tokens <= limit:
        raise ValueError(f"token_bucket: real_tokens must be in 1..{limit}, got {real_tokens}")
    buckets = token_buckets(limit, steps_per_doubling)
    index = bisect.bisect_left(buckets, real_tokens)  # the first bucket >= real_tokens (sorted; ~100 at most)
    smaller = buckets[index - 1] if index else 0
    return buckets[index], buckets[index] - smaller - 1


@functools.cache
def most_filler(limit: int, steps_per_doubling: int = TOKEN_STEPS_PER_DOUBLING) -> int:
    """The most filler tokens any token bucket up to ``limit`` needs (what its filler rows must hold)."""
    buckets = token_buckets(limit, steps_per_doubling)
    return max(token_bucket(size, limit, steps_per_doubling)[1] for size in buckets)
