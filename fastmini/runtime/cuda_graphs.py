"""GraphedEncoder: an encoder callable run through one CUDA graph per shape bucket.

At batch 1-8 the N-recursion forward is launch-bound (DESIGN.md, "The two regimes"): ~150 kernel
launches of a few microseconds each. Replaying a captured graph launches them all at once.

Usage (the model must run in its padded layout, where no shape and no host sync depends on the
mask's values: the model's own unpadded path reads the mask on the host and cannot be captured;
UnpaddedGraphedEncoder, unpadded_graphs.py, packs on the host before each replay instead)::

    model = FastMiniModel.from_pretrained(...).cuda().eval().to(torch.bfloat16)
    encoder = GraphedEncoder(
        lambda ids, mask: model.encode(ids, mask, unpad=False).sequence,
        max_sequence_length=model.config.max_position_embeddings,
    )
    hidden = encoder(input_ids, attention_mask)   # (B, S, H), a fresh tensor

Each call rounds (B, S) up to the nearest (batch bucket, sequence bucket), copies the inputs into
that bucket's static zero-padded buffers, captures the bucket's graph on first use, replays it and
returns the (B, S, H) slice of the static output as a new tensor (the next replay overwrites the
static one). Inputs larger than the largest bucket run eagerly. ``stats`` counts captures,
replays and eager fallbacks.

Rules that follow from replaying recorded kernels:

- inference only: everything runs under ``torch.no_grad()``, the model must be in ``eval()``
  mode (dropout would be frozen into the graph);
- parameters may change in place (``copy_``, optimizer steps) and replays see the new values, but
  replacing them (``.to()``, ``load_state_dict(assign=True)``, re-packing them into one buffer for
  an L2 window) leaves the graphs reading the old memory: call ``reset()`` afterwards;
- autocast state is frozen at capture time; prefer casting the model (``.to(torch.bfloat16)``); so is
  everything else the model's forward reads from its settings (``set_low_precision_norms``, adapters
  loaded or replaced, ``optimize_for_inference``): ``reset()`` after changing them;
- calls from several threads take turns (a lock: replays share their buffers), all on one stream (torch's
  default; the buffers' reuse is ordered by it); while a bucket is captured no other thread may use CUDA
  (torch's global capture mode): ``prepare()`` the buckets before serving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from fastmini.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_SEQUENCE_BUCKETS, BucketGrid
from fastmini.runtime.capture import Captured, CaptureStrategy, CudaGraphCapture, EncoderFn
from fastmini.runtime.extension import require_cuda


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_fallbacks: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Bucket:
    input_ids: torch.Tensor  # static, zero-padded: graphs read these addresses
    attention_mask: torch.Tensor
    captured: Captured


class GraphedEncoder:
    """``fn(input_ids, attention_mask) -> (B, S, H)`` run through one captured graph per shape bucket.

    ``capture``: the strategy (default ``CudaGraphCapture()``; ``EagerCapture()`` runs the same
    bookkeeping without graphs). ``max_sequence_length`` caps the sequence buckets at the model's
    number of positions. ``device``: where ``prepare()`` puts its dummy inputs before anything has
    been captured, or a callable giving it (``model.graphed_encoder()`` passes one that reads the model's, so
    that after moving the model and ``reset()`` it follows); None: CUDA. ``eager_fn``: what runs a
    shape beyond the buckets (default ``fn``; ``model.graphed_encoder()`` passes the model's own layout,
    unpadded, since the batches past the largest bucket are the large ones, where skipping padding pays).
    ``weights_fingerprint``: a cheap callable naming where the weights live (``model.graphed_encoder()`` passes
    the word embeddings' and the FFN output's addresses and dtypes); a call whose fingerprint differs from the one the
    graphs were captured with is refused: their replays would read the old, freed weights (after ``.to(dtype)``
    or ``load_state_dict(assign=True)``) until ``reset()``.
    """

    def __init__(
        self,
        fn: EncoderFn,
        *,
        batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS,
        sequence_buckets: Iterable[int] = DEFAULT_SEQUENCE_BUCKETS,
        max_sequence_length: int | None = None,
        capture: CaptureStrategy | None = None,
        device: torch.device | str | Callable[[], torch.device] | None = None,
        eager_fn: EncoderFn | None = None,
        weights_fingerprint: Callable[[], tuple] | None = None,
    ):
        for name, value in (("fn", fn), ("eager_fn", eager_fn), ("weights_fingerprint", weights_fingerprint)):
            if not callable(value) and (name == "fn" or value is not None):
                raise TypeError(f"GraphedEncoder: {name} must be callable, got {type(value).__name__}")
        self.fn = fn
        self.eager_fn = fn if eager_fn is None else eager_fn
        self.weights_fingerprint = weights_fingerprint
        self._captured_fingerprint: tuple | None = None  # the weights' fingerprint when the graphs kept were captured
        self.grid = BucketGrid.make(batch_buckets, sequence_buckets, max_sequence_length)
        self.capture = CudaGraphCapture() if capture is None else capture
        self.stats = GraphStats()
        self._buckets: dict[tuple[int, ...], _Bucket] = {}
        self._device: torch.device | None = None
        self._default_device = device if device is None or callable(device) else torch.device(device)
        # Calls take turns: one set of static buffers per bucket (and per-call state of subclasses). Reentrant:
        # prepare() holds it across its own calls.
        self._lock = threading.RLock()

    @property
    def default_device(self) -> torch.device | None:
        """The constructor's ``device`` (read now, if it was given as a callable)."""
        if callable(self._default_device):
            return torch.device(self._default_device())
        return self._default_device

    @property
    def captured_buckets(self) -> list[tuple[int, ...]]:
        return sorted(self._buckets)

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next calls capture again."""
        with self._lock:
            self._buckets.clear()
            self._device = None
            self._captured_fingerprint = None

    def prepare(self, shapes: Iterable[tuple[int, int]], device: torch.device | str | None = None) -> None:
        """Capture the buckets of these (batch, sequence) shapes now, e.g. before timing, on dummy
        inputs (graphs do not depend on values). Shapes beyond the largest bucket are skipped.
        ``device`` None: where the graphs so far were captured, else the constructor's ``device``, else CUDA."""
        if device is None:
            device = self._device or self.default_device or "cuda"
        device = torch.device(device)
        if device.type == "cuda":
            require_cuda("GraphedEncoder.prepare() on CUDA")  # not torch's assertion from deep inside
        with self._lock:
            for shape in shapes:
                grid_bucket = self.grid.choose(*shape[:2])
                if grid_bucket is None:
                    continue
                ids = torch.zeros(grid_bucket, dtype=torch.long, device=device)
                mask = self._dummy_mask(shape, ids)
                if self._bucket_for(ids, mask) not in self._buckets:
                    self(ids, mask)

    def _dummy_mask(self, shape: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
        """prepare()'s mask for a shape's bucket-sized dummy ids: every token real."""
        return torch.ones_like(ids)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self._lock:
            try:
                attention_mask = self._check(input_ids, attention_mask)
                self._check_weights()
                bucket = self._bucket_for(input_ids, attention_mask)
                if bucket is not None:
                    return self._replay(bucket, input_ids, attention_mask)
                self.stats.eager_fallbacks += 1
            finally:
                self._end_call()
        # A shape beyond the buckets shares no buffers: it runs outside the lock, beside other threads' calls.
        with torch.no_grad():
            return self._run_eagerly(input_ids, attention_mask)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be copied: a copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _end_call(self) -> None:
        """Where a subclass drops what it kept for one call (under the lock, however the call ends)."""

    def _replay(self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length = input_ids.shape
        entry = self._buckets.get(bucket)
        if entry is None:
            entry = self._capture(bucket, input_ids, attention_mask)
        else:
            self._fill(entry, input_ids, attention_mask)
        with torch.no_grad():
            entry.captured.replay()
        self.stats.replays += 1
        # The static output is overwritten by the next replay of this bucket: hand out a copy.
        return entry.captured.output[:batch_size, :sequence_length].clone(memory_format=torch.contiguous_format)

    def _check_weights(self) -> None:
        if self.weights_fingerprint is None:
            return
        fingerprint = self.weights_fingerprint()
        if self._captured_fingerprint is None or not self._buckets:
            self._captured_fingerprint = fingerprint
        elif fingerprint != self._captured_fingerprint:
            raise RuntimeError(
                "GraphedEncoder: the model's weights moved since its graphs were captured (.to(), a dtype change or "
                "load_state_dict(assign=True)): the graphs would read the old weights; call reset() first"
            )

    def _bucket_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...] | None:
        """The key of the graph that serves this input; None: run it eagerly."""
        return self.grid.choose(*input_ids.shape)

    def _run_eagerly(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.eager_fn(input_ids, attention_mask)

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"GraphedEncoder: input_ids must be a (batch, sequence) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"GraphedEncoder: input_ids must hold integer token ids, got {input_ids.dtype}")
        if 0 in input_ids.shape:
            raise ValueError(f"GraphedEncoder: empty input of shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(
                "GraphedEncoder: attention_mask must have the shape of input_ids, "
                f"{tuple(input_ids.shape)}; got {shape}"
            )
        if attention_mask.device != input_ids.device:
            raise ValueError(
                f"GraphedEncoder: input_ids are on {input_ids.device} but attention_mask is on {attention_mask.device}"
            )
        device = self._device_for(input_ids)
        self.capture.check_device(device)
        if self._device is not None and device != self._device:
            raise ValueError(
                f"GraphedEncoder: graphs were captured on {self._device}; got inputs on {input_ids.device} "
                "(call reset() after moving the model)"
            )
        return attention_mask

    def _device_for(self, input_ids: torch.Tensor) -> torch.device:
        """The device whose graphs serve these inputs: their own."""
        return input_ids.device

    def _fill(self, entry: _Bucket, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        batch_size, sequence_length = input_ids.shape
        if entry.input_ids.shape == input_ids.shape:  # the whole bucket: two copies, no clearing first
            entry.input_ids.copy_(input_ids)
            entry.attention_mask.copy_(attention_mask)
            return
        entry.input_ids.zero_()
        entry.input_ids[:batch_size, :sequence_length].copy_(input_ids)
        entry.attention_mask.zero_()
        entry.attention_mask[:batch_size, :sequence_length].copy_(attention_mask)
        # Rows that only pad the batch get one "real" token: a row with every key masked makes
        # softmax 0/0 = NaN in some attention kernels. Harmless to the real rows (rows never mix),
        # but NaNs in the static buffers would trip anomaly checks and slow some GPUs down.
        entry.attention_mask[batch_size:, 0] = 1

    def _allocate(self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Bucket:
        """The bucket's static input buffers (the graph reads their addresses)."""
        return _Bucket(
            static_zeros(bucket, input_ids),
            static_zeros(bucket, attention_mask),
            captured=None,  # type: ignore[arg-type]
        )

    def _recorded_fn(self, entry: _Bucket) -> EncoderFn:
        """What the bucket's graph records, called on its static buffers."""
        return self.fn

    def _capture(self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Bucket:
        entry = self._allocate(bucket, input_ids, attention_mask)
        self._fill(entry, input_ids, attention_mask)
        entry.captured = self.capture.capture(self._recorded_fn(entry), entry.input_ids, entry.attention_mask)
        self._buckets[bucket] = entry
        # The buffers' own device: a device given without an index ("cuda") names cuda:0 but does not compare
        # equal to it, and later inputs on cuda:0 would be refused as coming from another device.
        self._device = entry.input_ids.device
        self.stats.captures += 1
        return entry


def static_zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A zero buffer of ``like``'s dtype and device that a graph may read. A normal tensor even when the first
    call runs under torch.inference_mode(): later calls outside it fill it in place, which torch refuses for
    inference tensors (and in-place writes to normal tensors are allowed inside inference mode)."""
    with torch.inference_mode(False):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
