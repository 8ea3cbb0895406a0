"""A key padding mask and its additive form, made once for all the recursions that attend with it.

Every recursion of the encoder attends with the same (B, S) mask. Attention needs it as an additive
(B, 1, 1, S) bias on the scores: the eager path (``self_attention_ref``, the distiller's maps) builds one with
a fill and a masked fill, and torch's SDPA converts a bool mask on every call (a ``where`` of two scalar tensors;
the H200 profile of a CUDA-graphed (1, 128) forward of the published model, session 15, had 12 fill and 6
``where`` kernels among its 104). A ``KeyPadding`` made once a forward keeps the bias of each dtype asked for,
so N recursions build it once.
"""

from __future__ import annotations

import torch


def additive_key_mask(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool, True for real tokens -> (B, 1, 1, S) in ``dtype``: 0 for real keys, half the dtype's lowest
    value for padded ones.

    Half the lowest value: fp16's whole lowest value plus a score of -16 or less would round to -inf, and a row
    with no real key would then be NaN; half of it still absorbs every score in fp32 and bf16 (a padded key's
    probability is exactly 0 wherever its row has a real key), and a row with no real key at all attends
    uniformly over its padded keys."""
    batch, seq = key_padding_mask.shape
    bias = torch.full((batch, 1, 1, seq), torch.finfo(dtype).min / 2, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill_(key_padding_mask[:, None, None, :], 0.0)


class KeyPadding:
    """``mask`` (B, S) bool, True for real tokens, and ``bias(dtype)``: its ``additive_key_mask``, made on first
    use and kept.

    Made for one forward (the encoder makes one each forward, from its mask or its packing's): the mask must not
    change while it is in use, and a bias made under ``torch.inference_mode()`` is an inference tensor, which
    autograd refuses to save for the backward of a later call with gradients (SDPA saves its mask). Whether
    inference mode is on cannot be asked under torch.compile, so the object is not kept across forwards instead."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._biases: dict[torch.dtype, torch.Tensor] = {}

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._biases:
            self._biases[dtype] = additive_key_mask(self.mask, dtype)
        return self._biases[dtype]


def as_key_padding(mask: torch.Tensor | KeyPadding | None) -> KeyPadding | None:
    """A bool mask wrapped (its bias then made for this call only), a KeyPadding or None as it is."""
    return mask if mask is None or isinstance(mask, KeyPadding) else KeyPadding(mask)
