"""Inference runtime helpers for CUDA: CUDA graphs per shape bucket and L2 persistence of the
shared layer's weights (DESIGN.md, "The two regimes": the latency regime).

- ``GraphedEncoder`` (cuda_graphs.py): ``fn(input_ids, attention_mask)`` replayed through one
  CUDA graph per (batch, sequence) bucket; ``CudaGraphCapture`` / ``EagerCapture`` (capture.py).
- ``UnpaddedGraphedEncoder`` (unpadded_graphs.py): the same on the real tokens of ragged batches, one
  graph per (batch, sequence, token count) bucket.
- ``pack_parameters`` (param_buffer.py): parameters moved into one contiguous buffer.
- ``persist_in_l2`` / ``L2Window`` (l2_persistence.py): a persisting L2 access-policy window over
  such a buffer, through a C++ extension (csrc/l2_persistence.cpp) built on first use.

Importing this package touches no GPU and builds nothing; the CUDA parts raise one clear
RuntimeError when used without a CUDA device or without a compiler.
"""

from fastmini.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_SEQUENCE_BUCKETS, BucketGrid
from fastmini.runtime.capture import CaptureStrategy, CudaGraphCapture, EagerCapture
from fastmini.runtime.cuda_graphs import GraphedEncoder, GraphStats
from fastmini.runtime.l2_persistence import (
    L2Window,
    WindowPlan,
    l2_limits,
    live_l2_window,
    persist_in_l2,
    persist_range_in_l2,
    plan_window,
)
from fastmini.runtime.param_buffer import PackedParameters, pack_parameters
from fastmini.runtime.unpadded_graphs import UnpaddedGraphedEncoder

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "DEFAULT_SEQUENCE_BUCKETS",
    "BucketGrid",
    "CaptureStrategy",
    "CudaGraphCapture",
    "EagerCapture",
    "GraphStats",
    "GraphedEncoder",
    "L2Window",
    "PackedParameters",
    "UnpaddedGraphedEncoder",
    "WindowPlan",
    "l2_limits",
    "live_l2_window",
    "pack_parameters",
    "persist_in_l2",
    "persist_range_in_l2",
    "plan_window",
]
