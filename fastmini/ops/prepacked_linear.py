"""Linear layers whose weights are reordered once into oneDNN's blocked layout (CPU inference).

Why: every ``F.linear`` call on the CPU goes through MKL's sgemm, which re-packs the weight
matrix into its internal panels on each call. The recursion multiplies the same shared-layer
weights N times per forward, forward after forward, so the packing can be paid once. Measured
on this project's 2-core AVX-512 CPU (fp32, 32 rows): 768 -> 3072 ran at 117 GFLOP/s through
``F.linear`` and 202 GFLOP/s through oneDNN with a pre-reordered weight; 3072 -> 768 116 vs 204.

GELU and a residual add ride in the GEMM as oneDNN post-ops (``linear(..., gelu=...)``, ``residual=...``): at
32 rows every op between the shared layer's GEMMs runs on caches those GEMMs' megabytes of weights have just
swept, where a pass of its own over the activations costs several times what it costs on warm caches (an add of
32 x 768 took ~25 us after the FFN's GEMM, ~4 us in a loop of adds).

The reordered copy is a cache, never the source of truth: entries are keyed on the source
weights' identity, storage and version counter and on the number of optimizer steps taken in the
process, so an optimizer step, ``load_state_dict`` or ``.to()`` makes them stale and they are
rebuilt on the next use. The step count is there because fused optimizers (``AdamW(fused=True)``,
the Trainer's default) write parameters without bumping their version counters. It is the whole
process's on purpose: a step on any tensor (another model's, or a copy that shares the weights'
storage, ``load_state_dict(assign=True)``, or a master copy written back through ``.data``) makes
every cache stale, the price being one repacking per step for a model served while another trains.
Switching a model to training mode empties its caches too, and so does moving it (``.to()``, ``.half()``: the
module's ``_apply``); weights moved by other means (``load_state_dict(assign=True)``) drop them on the next call.
Writes through ``param.data`` outside an optimizer step bypass all of this: whoever does that must start a new
cache. Weights that are inference tensors (made under ``torch.inference_mode()``) have no version counter, so
their changes cannot be seen: they take the plain ops. Copies and pickles of a model carry an empty cache
(oneDNN's opaque tensors cannot be copied).

oneDNN keeps a compiled primitive per input shape (by default up to 1024 of them, in its own cache
and in ideep's): a server seeing many distinct token counts holds a few hundred MB more than with
the plain ops (measured ~650 MB at the ceiling for a tiny model); ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
and ``LRU_CACHE_CAPACITY``, set before the process starts, bound it. The oneDNN op has no autograd
rule fastmini relies on, so the fast path runs only when no gradient is wanted; training,
``torch.compile`` and every non-CPU or non-fp32 input take ``F.linear``.

Fixed-shape serving may also name the token counts its forwards carry (``row_counts``, the model's
``optimize_for_inference(cpu_token_counts=...)``): each entry then keeps, beside the oneDNN copy, the weight
packed by MKL's ``cblas_sgemm_pack`` for each of those row counts, and a call with exactly that many rows runs
MKL's packed sgemm (GELU and the residual then a pass of their own). MKL packs for one row count (torch's op
takes the plain weight for any other), which is why this is asked for by count, never guessed: a guess would pack
for counts never seen again, and the kernel, hence the last bits of an output, would change between two calls on
the same input. Measured on a 2-core AVX-512/AMX CPU (published size, whole forward, consecutive calls in one
process): 18.2 -> 15.9 ms at 32 rows, 11.2 -> 8.6 ms at 8, 45.6 -> 41.7 ms at 128, ~1.5% at 1024, ~2% slower at
4096. The cost is memory: each count holds the GEMM weights once more (~27 MB for the published shared layer,
~90 MB for the published masked-LM decoder, 768 x 30522), an entry of several weights (q/k/v) also keeps their
concatenation dense for MKL's op (~7 MB), and MKL reserves more address space than it touches.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastmini.ops.dispatch import recording_a_graph
from fastmini.ops.plain_layers import all_plain

# Post-ops oneDNN fuses into the GEMM, by fastmini's GELU names (ops.linear_gelu's approximations).
_ONEDNN_ACTIVATIONS = {None: ("none", ""), "none": ("gelu", "none"), "tanh": ("gelu", "tanh")}


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_MKL_INT_MAX = 2**31 - 1  # MKL's row counts are 32-bit ints (LP64): a larger one made it print an error, not raise


def mkl_packing_available() -> bool:
    """Whether this torch has MKL's packed sgemm (x86 builds with MKL; not ARM or macOS wheels)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def checked_row_counts(counts: Iterable[int], where: str) -> tuple[int, ...]:
    """``counts`` as a sorted tuple of distinct positive ints, or one error naming ``where`` and what was wrong."""
    # (a 0-d tensor or array is iterable by type, not in fact)
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Iterable) or getattr(counts, "ndim", None) == 0:
        raise TypeError(f"{where}: expected a sequence of token counts (positive ints), got {counts!r}")
    counts = tuple(counts)
    checked = []
    for count in counts:  # ints, numpy's and torch's integers (anything with __index__), never a bool
        try:
            value = operator.index(count)
        except TypeError:
            value = None
        boolean = isinstance(count, bool) or str(getattr(count, "dtype", "")) in ("bool", "torch.bool")
        if boolean or value is None or not 1 <= value <= _MKL_INT_MAX:
            raise ValueError(
                f"{where}: token counts must be positive ints up to {_MKL_INT_MAX}, got {count!r} in {counts!r}"
            )
        checked.append(value)
    return tuple(sorted(set(checked)))


def linear_ref(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    gelu: str | None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: the linears side by side (outputs concatenated), then GELU or the residual added when asked."""
    out = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
    if residual is not None:
        return out + residual
    return out if gelu is None else F.gelu(out, approximate=gelu)


@dataclass
class PackedLinear:
    """One cache entry: the linears' weights side by side in oneDNN's blocked layout, called as oneDNN's GEMM
    with GELU or the residual's add as its post-op. Valid while its key is (see _key): fetched once, it serves
    calls until the weights change (``PrepackedLinears.packed``)."""

    packed: torch.Tensor  # (sum of out features, in features), oneDNN blocked layout
    bias: torch.Tensor | None
    key: tuple
    weight: torch.Tensor | None = None  # the dense weight MKL's op reads its sizes from (with mkl_by_rows only)
    mkl_by_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # row count -> MKL's packed weight

    def __call__(self, x: torch.Tensor, gelu: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.mkl_linear(x) if self.mkl_by_rows else None  # (no call at all on the default path)
        if out is not None:  # MKL's op has no post-ops: GELU or the add as a pass of their own
            if residual is not None:
                return out.add_(residual)
            return out if gelu is None else F.gelu(out, approximate=gelu)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        attr, algorithm = _ONEDNN_ACTIVATIONS[gelu]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algorithm)

    def mkl_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The linear through MKL's packed sgemm where x has one of the row counts packed for, else None."""
        if not self.mkl_by_rows:
            return None
        rows = x.numel() // x.shape[-1]
        mkl_packed = self.mkl_by_rows.get(rows)
        if mkl_packed is None:
            return None
        return torch.ops.mkl._mkl_linear(x, mkl_packed, self.weight, self.bias, rows)


_optimizer_steps = 0
_counting_optimizer_steps = False


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _start_counting_optimizer_steps() -> None:
    """One global hook on every torch optimizer's step, registered when the first cache is made."""
    global _counting_optimizer_steps
    if not _counting_optimizer_steps:
        register_optimizer_step_post_hook(_count_optimizer_step)
        _counting_optimizer_steps = True


def _key(tensors: Sequence[torch.Tensor | None]) -> tuple:
    versions = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors if t is not None)
    return (_optimizer_steps, *versions)


class PrepackedLinears:
    """A cache of reordered weights, one entry per name; ``linear`` falls back to torch whenever
    the fast path does not apply, so callers never branch."""

    row_counts: tuple[int, ...] = ()

    def __init__(self, row_counts: Iterable[int] = ()) -> None:
        """``row_counts``: the rows (tokens) of the calls that take MKL's packed sgemm (see the module's docstring;
        none by default, and none where this torch lacks MKL)."""
        self._entries: dict[str, PackedLinear] = {}
        self.row_counts = checked_row_counts(row_counts, "PrepackedLinears")
        _start_counting_optimizer_steps()

    def __deepcopy__(self, memo) -> PrepackedLinears:
        return PrepackedLinears(self.row_counts)

    def __getstate__(self) -> dict:
        return {"_entries": {}, "row_counts": self.row_counts}

    def __setstate__(self, state: dict) -> None:
        # Unpickling skips __init__: a fresh process must count optimizer steps too (fused AdamW writes weights
        # without bumping their versions, which would leave this cache serving the weights from before the step).
        self._entries = {}
        self.row_counts = state.get("row_counts", ())
        _start_counting_optimizer_steps()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def applies(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] = ()) -> bool:
        """Whether oneDNN's op may stand in for torch's: never where autograd needs a gradient through it (its
        weights and biases are detached copies), e.g. a bias that trains while its weight is frozen (BitFit)."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or weights[0].dtype != torch.float32:
            return False
        # Under CPU autocast F.linear computes in the autocast dtype; oneDNN's op is not on autocast's lists
        # and would keep computing (and returning) fp32: the plain ops, as without the cache.
        if torch.is_autocast_enabled("cpu"):
            return False
        # Under torch.compile the plain ops: inductor cannot lower oneDNN's linear on a weight that is
        # not a graph constant (it crashed), and packs weights itself where it wants to (freezing).
        if torch.compiler.is_compiling():
            return False
        # torch.jit.trace cannot record oneDNN's fused linear (its optional scalar arguments), and a recorded
        # graph should hold plain aten ops anyway (ops.dispatch): the plain ops.
        if recording_a_graph() or torch.jit.is_scripting():
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, *biases)):
            return False
        # Inference tensors have no version counter: the cache could not see them change.
        if any(t is not None and t.is_inference() for t in (*weights, *biases)):
            return False
        return onednn_linear_available()

    def drop_if_moved(self, weight: torch.Tensor) -> None:
        """Free the packed copies once the weights they copy left fp32 on the CPU (``.to(dtype)``, ``.half()``,
        ``.to("cuda")``): the fast path no longer applies, so nothing would ever rebuild or free them."""
        if self._entries and (weight.dtype != torch.float32 or weight.device.type != "cpu"):
            self._entries.clear()

    def packed(self, name: str, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> PackedLinear:
        """The entry ``name`` for these weights, reordered now if it is missing or stale. Only where ``applies``
        holds for them (the caller's check)."""
        key = _key([*weights, *biases])
        entry = self._entries.get(name)
        if entry is None or entry.key != key:
            with torch.no_grad():
                weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
                if all(b is None for b in biases):
                    bias = None
                else:  # a linear without a bias beside others with one (q/k/v): zeros stand for it
                    pairs = zip(weights, biases, strict=True)
                    bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])
                weight = weight.contiguous()
                entry = PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight), bias, key)
                if self.row_counts and mkl_packing_available():
                    entry.weight = weight
                    pack = torch.ops.mkl._mkl_reorder_linear_weight
                    entry.mkl_by_rows = {rows: pack(weight, rows) for rows in self.row_counts}
            self._entries[name] = entry
        return entry

    def linear(
        self,
        name: str,
        x: torch.Tensor,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
        gelu: str | None = None,
        residual: torch.Tensor | None = None,
        checked: bool = False,
    ) -> torch.Tensor:
        """``linear_ref(x, weights, biases, gelu, residual)``: through the cached oneDNN weight ``name`` when
        the fast path applies, else through torch. GELU and the residual's add are oneDNN post-ops: applied to
        the output tile while it is in registers, not in another pass over the output (after the GEMM has
        streamed its weights through the caches, such a pass re-reads its operands from L3: at 32 rows an add
        took ~25 us, against ~4 us on warm caches). ``checked``: the caller has seen ``applies`` hold for these
        tensors (``PrepackedWeightsMixin.prepacked_for``), so it is not asked again on the recursion's hot path."""
        if gelu not in _ONEDNN_ACTIVATIONS:
            raise ValueError(f"prepacked linear: gelu must be one of {sorted(k for k in _ONEDNN_ACTIVATIONS if k)}")
        if gelu is not None and residual is not None:
            raise ValueError("prepacked linear: give gelu or residual, not both (oneDNN fuses one post-op here)")
        if not checked and not self.applies(x, weights, biases):
            return linear_ref(x, weights, biases, gelu, residual)
        if residual is not None and (residual.dtype != torch.float32 or residual.requires_grad):
            return linear_ref(x, weights, biases, gelu, residual)
        return self.packed(name, weights, biases)(x, gelu, residual)


class PrepackedWeightsMixin:
    """For modules whose linears may run through a PrepackedLinears cache (switched on by
    ``FastMiniPreTrainedModel.optimize_for_inference``); off (None) until asked for."""

    prepacked: PrepackedLinears | None = None

    def use_prepacked_weights(self, enabled: bool = True, row_counts: Iterable[int] = ()) -> None:
        """A fresh cache (``row_counts``: see PrepackedLinears), or none."""
        self.prepacked = PrepackedLinears(row_counts) if enabled else None

    def _empty_the_cache(self) -> None:
        if self.prepacked is not None and len(self.prepacked):
            self.prepacked = PrepackedLinears(self.prepacked.row_counts)

    def train(self, mode: bool = True) -> Self:
        # Training is about to change the weights (and never reads the cache): free the packed copies.
        if mode:
            self._empty_the_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), .cuda() ...: the packed copies (and the fp32 weights entries hold for MKL's op) would
        # outlive the move until the next forward; free them now (a move back repacks at the next forward).
        self._empty_the_cache()
        return super()._apply(fn, recurse)

    def prepacked_for(self, x: torch.Tensor, *layers: nn.Module) -> PrepackedLinears | None:
        """The cache when it is on and applies to this input and to every one of ``layers`` (plain nn.Linear
        modules: see ops.plain_layers), else None (the module's usual ops run). Its ``linear`` may then be
        called ``checked=True`` for those layers with x or an activation computed from it without gradients."""
        prepacked = self.prepacked
        if prepacked is None or not all_plain(*layers):
            return None
        if prepacked.applies(x, [layer.weight for layer in layers], [layer.bias for layer in layers]):
            return prepacked
        prepacked.drop_if_moved(layers[0].weight)
        return None

    def linear_through(
        self,
        prepacked: PrepackedLinears | None,
        name: str,
        x: torch.Tensor,
        gelu: str | None = None,
        residual: torch.Tensor | None = None,
        checked: bool = False,
    ) -> torch.Tensor:
        """The submodule ``name`` applied to x, then GELU or the residual added when asked: through the cache
        when given and the submodule is a plain nn.Linear, else by calling it. ``checked``: ``prepacked_for``
        was asked with this submodule among its layers (see PrepackedLinears.linear)."""
        layer = getattr(self, name)
        if prepacked is None or not all_plain(layer):
            out = layer(x)
            if residual is not None:
                return out + residual
            return out if gelu is None else F.gelu(out, approximate=gelu)
        return prepacked.linear(name, x, [layer.weight], [layer.bias], gelu=gelu, residual=residual, checked=checked)
