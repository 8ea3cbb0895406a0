"""Mixed precision, one rule for every tool: "--precision auto" is bf16 on CUDA and fp32 elsewhere."""

from __future__ import annotations

import contextlib
import logging

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# The dtype of the weights every tool fine-tunes and serves, whatever dtype a checkpoint was saved in: --precision
# adds bf16 autocast on top of them. (An fp16 checkpoint trained in fp16 overflows AdamW's eps into NaN; one in bf16
# loses every update below bf16's resolution, e.g. those of LayerNorm weights near 1; both run slow on a CPU.)
WEIGHTS_DTYPE = torch.float32


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 where ``precision`` asks for it ("bf16", or "auto" on CUDA); None means fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """torch.autocast to ``dtype`` on ``device``'s type; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """What a checkpoint records of the precision a run trained in: "bf16" or "fp32"."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16"}[dtype]


def check_resumed_precision(saved: str | None, dtype: torch.dtype | None, option: str, log: logging.Logger) -> None:
    """Warn when a resumed run goes on in another precision than its checkpoint's run trained in: "--precision
    auto" resolves per device, so a bf16 run from a GPU goes on in fp32 on a CPU (and the reverse); the run is
    still valid, but its curve and result are not those of one precision. ``saved`` None: a checkpoint from
    before this was recorded."""
    now = precision_name(dtype)
    if saved is not None and saved != now:
        log.warning(
            "--resume: the checkpoint's run trained in %s; it goes on in %s (--precision %s on this device)",
            saved,
            now,
            option,
        )
