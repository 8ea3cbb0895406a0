"""Move a set of parameters into ONE contiguous buffer, so that a single L2 access-policy window
(one base pointer, one length) covers all of them.

    packed = pack_parameters(model.encoder.shared_layer)      # or any iterable of parameters
    window = persist_in_l2(packed.buffer)                      # fastmini.runtime.l2_persistence

The Parameter objects stay the same (optimizers, state_dict, hooks and tied references keep
working); only their ``.data`` becomes a view into the buffer, each starting at an ``alignment``-
byte boundary of memory (the buffer itself starts at one: allocators align to less, 64 bytes on the CPU, 512 on
CUDA's caching allocator) so vectorised loads in cuBLAS/Triton kernels stay aligned. Values are unchanged.

Anything that later replaces a parameter's storage (``module.to(...)``, ``.half()``,
``load_state_dict(assign=True)``) silently moves it out of the buffer; ``intact()`` says whether
the layout still holds. Pack after moving the model to its device and dtype, and before capturing
CUDA graphs (graphs record addresses: GraphedEncoder.reset() after packing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PackedParameters:
    buffer: torch.Tensor  # 1-D, contiguous
    parameters: tuple[nn.Parameter, ...]
    offsets: tuple[int, ...]  # element offsets into buffer

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def intact(self) -> bool:
        """True while every parameter still lives at its place in the buffer."""
        base, size = self.buffer.data_ptr(), self.buffer.element_size()
        return all(
            p.data_ptr() == base + offset * size and p.is_contiguous() and p.dtype == self.buffer.dtype
            for p, offset in zip(self.parameters, self.offsets, strict=True)
        )


def _unique_parameters(source: nn.Module | Iterable[torch.Tensor]) -> list[nn.Parameter]:
    items = source.parameters() if isinstance(source, nn.Module) else source
    unique, seen = [], set()
    for p in items:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"pack_parameters: expected parameters, got {type(p).__name__}")
        if id(p) not in seen:  # tied weights appear once
            seen.add(id(p))
            unique.append(p)
    if not unique:
        raise ValueError("pack_parameters: no parameters to pack")
    return unique


def pack_parameters(source: nn.Module | Iterable[torch.Tensor], alignment: int = 256) -> PackedParameters:
    """Copy the parameters of ``source`` into one new buffer and make each a view of it.

    All must share one device and dtype (an access-policy window is one address range; mixed
    dtypes would need several buffers). ``alignment`` is in bytes, a multiple of the element size.
    """
    parameters = _unique_parameters(source)
    first = parameters[0]
    for p in parameters[1:]:
        if p.device != first.device or p.dtype != first.dtype:
            raise ValueError(
                "pack_parameters: all parameters must share one device and dtype; got "
                f"{first.dtype} on {first.device} and {p.dtype} on {p.device}"
            )
    element = first.element_size()
    if alignment <= 0 or alignment % element:
        raise ValueError(f"pack_parameters: alignment must be a positive multiple of {element} bytes, got {alignment}")
    step = alignment // element

    offsets, end = [], 0
    for p in parameters:
        offsets.append(end)
        end += -(-p.numel() // step) * step  # round the next start up to the alignment
    # one alignment more than needed, then the view from the first aligned element on (the allocation's own
    # address is aligned to less than a large ``alignment``)
    raw = torch.zeros(end + step, dtype=first.dtype, device=first.device)
    shift = (-raw.data_ptr() % alignment) // element
    buffer = raw[shift : shift + end]
    with torch.no_grad():
        for p, offset in zip(parameters, offsets, strict=True):
            view = buffer[offset : offset + p.numel()].view(p.shape)
            view.copy_(p)
            p.data = view  # same Parameter object, new storage
    return PackedParameters(buffer, tuple(parameters), tuple(offsets))
