"""AdamW with transformers Trainer's parameter groups, and warmup + linear or cosine decay.

The original recipe trained with ``transformers.Trainer`` defaults: AdamW (betas 0.9/0.999,
eps 1e-8), no weight decay on biases and LayerNorm weights, linear warmup then linear decay
to zero, gradients clipped to norm 1.0; its NER fine-tuning used the cosine schedule. Shared
by the distillation and fine-tuning trainers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from fastmini.training.errors import TrainingError

SCHEDULES = ("linear", "cosine")


def decay_parameter_names(modules: Iterable[nn.Module]) -> set[str]:
    """Names (as ``named_parameters`` of each module gives them) that get weight decay:
    everything but biases and the parameters of LayerNorm modules."""
    names = set()
    for module in modules:
        for module_name, child in module.named_modules():
            if isinstance(child, nn.LayerNorm):
                continue
            for parameter_name, _ in child.named_parameters(recurse=False):
                if parameter_name != "bias" and not parameter_name.endswith("bias"):
                    names.add(f"{module_name}.{parameter_name}" if module_name else parameter_name)
    return names


def build_adamw(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``module``, in ``named_parameters`` order."""
    decayed = decay_parameter_names([module])
    with_decay, without_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (with_decay if name in decayed else without_decay).append(parameter)
    groups = [
        {"params": with_decay, "weight_decay": weight_decay},
        {"params": without_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def gradient_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """The total L2 norm of the gradients, which are then clipped to ``max_norm`` (0: not clipped).

    The norm is computed even without clipping because a trainer must check it: a finite loss can
    still give inf/NaN gradients (an overflow in backward), and one AdamW step with them writes NaN
    into every weight. When it is not finite, stop without calling ``optimizer.step()``."""
    parameters = [parameter for parameter in parameters if parameter.grad is not None]
    if not parameters:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    norms = [torch.linalg.vector_norm(parameter.grad.detach(), 2.0).float() for parameter in parameters]
    return float(torch.linalg.vector_norm(torch.stack([norm.to(norms[0].device) for norm in norms]), 2.0))


def checked_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: Iterable[nn.Parameter],
    max_grad_norm: float,
    losses: Mapping[str, float],
    stopped: Callable[[str, str], str],
) -> tuple[float, float]:
    """Check the step's losses and gradients, clip the gradients, then one optimizer and scheduler step;
    returns (gradient norm, the step's lr).

    Nothing steps when a value is not finite: one AdamW step with inf/NaN writes NaN into every weight (and
    the next checkpoint would hold them), and a finite loss can still overflow in backward. A loss (any
    value of ``losses``) raises ``TrainingError(stopped("the loss is not finite", details))``, a gradient
    norm ``stopped("the gradient norm is not finite", details)``; ``details`` lists the values as
    ``name=value``, and ``stopped`` puts the two in the trainer's own message."""
    loss_text = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
    if not all(math.isfinite(value) for value in losses.values()):
        raise TrainingError(stopped("the loss is not finite", loss_text))
    norm = gradient_norm(parameters, max_grad_norm)
    if not math.isfinite(norm):
        raise TrainingError(stopped("the gradient norm is not finite", f"norm={norm}, {loss_text}"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


def warmup_steps_from_ratio(warmup_ratio: float, total_steps: int) -> int:
    """transformers TrainingArguments.get_warmup_steps for a ratio: rounded up, so any ratio > 0 warms up."""
    return math.ceil(warmup_ratio * total_steps)


def linear_schedule_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers' get_linear_schedule_with_warmup: 0 -> 1 over warmup, then 1 -> 0 at total."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine_schedule_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers' get_cosine_schedule_with_warmup (half a cosine): 0 -> 1 over warmup, then 1 -> 0 at total."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class WarmupDecay(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR with linear warmup then linear or cosine decay; its state dict is plain numbers (checkpoint-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, shape: str = "linear"):
        if shape not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got '{shape}'")
        self.warmup_steps, self.total_steps, self.shape = warmup_steps, total_steps, shape
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        factor = linear_schedule_factor if self.shape == "linear" else cosine_schedule_factor
        return factor(step, self.warmup_steps, self.total_steps)


class LinearWarmupDecay(WarmupDecay):
    """The linear schedule (the distiller's)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
        super().__init__(optimizer, warmup_steps, total_steps, "linear")
