"""Adapter tuning (SPEC.md, Model 6): train only per-recursion adapters and the task head.

Frozen: embeddings, projector, the shared layer. Trainable: every adapter, whatever sits outside the
base model (the task head) and ALBERT's tanh pooler: it lives in the base model but serves only the
classifier, and a masked-LM checkpoint has none, so a frozen one would stay random and differ on every
load. Saved adapters hold exactly those tensors: a task costs a few percent of the model on disk.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from fastmini.files import write_file_atomically, write_json_atomically
from fastmini.models.checkpoint import CheckpointError, read_config_dict
from fastmini.models.configuration import check_config
from fastmini.modules.encoder import make_adapters

if TYPE_CHECKING:  # modeling.py imports this module
    from fastmini.models.modeling import FastMiniPreTrainedModel

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapters.safetensors"
# Not PEFT's adapter_config.json: with peft installed, transformers' Auto from_pretrained and PEFT's tools
# would take a directory holding that name for a PEFT adapter.
ADAPTER_CONFIG_NAME = "fastmini_adapters.json"
LEGACY_ADAPTER_CONFIG_NAME = "adapter_config.json"  # what save_adapters wrote before; load_adapters still reads it
# Adapters only fit a model with the same shape of recursion, and the head one with the same pooling.
MATCHING_FIELDS = ("hidden_size", "num_hidden_layers", "reduction_factor", "head_variant")
# Written by save_adapters before head_variant was recorded: "minialbert" was the only variant then.
MATCHING_DEFAULTS = {"head_variant": "minialbert"}


def is_tuned_in_adapter_mode(model: FastMiniPreTrainedModel, name: str) -> bool:
    """True for the parameters adapter tuning trains: adapters, the pooler and the task head."""
    if "_adapters." in name or name.startswith(("pooler.", f"{model.base_model_prefix}.pooler.")):
        return True
    return model is not model.base_model and not name.startswith(model.base_model_prefix + ".")


def _check_adapters_fit(config) -> None:
    """Refuse, before anything changes, a model whose config allows no adapters: a model built without
    them may carry any reduction_factor (a converted ALBERT keeps the default 16 whatever its width)."""
    with_adapters = copy.copy(config)
    with_adapters.use_adapter = True
    try:
        check_config(with_adapters)
    except ValueError as error:
        raise ValueError(f"cannot add adapters to this model: {error}") from None


def _ensure_adapters(model) -> None:
    encoder = model.base_model.encoder
    if encoder.has_adapters:
        return
    _check_adapters_fit(model.config)
    reference = next(encoder.shared_layer.parameters())
    # torch's own initialisation of the new layers, not the model's _init_weights: the original's
    # trainAdaptersOnly builds its adapters after post_init, so they keep nn.Linear's and nn.LayerNorm's defaults.
    encoder.add_adapters(model.config)
    model.config.use_adapter = True
    for adapters in (encoder.attention_adapters, encoder.ffn_adapters):
        adapters.to(device=reference.device, dtype=reference.dtype)


def _expected_adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor save_adapters writes for this model, adapters included when the
    model has none yet (load_adapters adds them)."""
    encoder = model.base_model.encoder
    shapes = {
        name: tuple(parameter.shape)
        for name, parameter in model.named_parameters()
        if is_tuned_in_adapter_mode(model, name)
    }
    if not encoder.has_adapters:
        encoder_name = next(name for name, module in model.named_modules() if module is encoder)
        with torch.device("meta"):  # shapes only, no memory
            fresh = {"attention_adapters": make_adapters(model.config), "ffn_adapters": make_adapters(model.config)}
        for kind, adapters in fresh.items():
            for name, parameter in adapters.named_parameters():
                shapes[f"{encoder_name}.{kind}.{name}"] = tuple(parameter.shape)
    return shapes


def train_adapters_only(model: FastMiniPreTrainedModel) -> dict[str, int]:
    _ensure_adapters(model)
    trainable = total = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad = is_tuned_in_adapter_mode(model, name)
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    logger.info("adapter tuning: %d of %d parameters trainable (%.2f%%)", trainable, total, 100.0 * trainable / total)
    return {"trainable": trainable, "total": total}


def save_adapters(model: FastMiniPreTrainedModel, directory: str | os.PathLike) -> None:
    if not model.base_model.encoder.has_adapters:
        raise ValueError("save_adapters: this model has no adapters (call train_adapters_only() first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in model.named_parameters()
        if is_tuned_in_adapter_mode(model, name)
    }
    config = model.config
    description = {
        "format": "fastmini-adapters",
        "architecture": type(model).__name__,
        **{name: getattr(config, name) for name in MATCHING_FIELDS},
        "num_labels": config.num_labels,
        "id2label": {str(k): v for k, v in (config.id2label or {}).items()},
        "problem_type": config.problem_type,
    }
    write_file_atomically(directory / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    write_json_atomically(directory / ADAPTER_CONFIG_NAME, description)


def _adapter_config_path(directory: Path) -> Path:
    """The description save_adapters wrote: its own name, else the name of earlier versions."""
    path = directory / ADAPTER_CONFIG_NAME
    legacy = directory / LEGACY_ADAPTER_CONFIG_NAME
    return legacy if not path.is_file() and legacy.is_file() else path


def _saved_labels(config_path: Path, id2label) -> dict[int, str] | None:
    """The description's id2label with integer ids, or a CheckpointError naming what is wrong with it."""
    if not id2label:
        return None
    try:
        return {int(k): v for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(
            f"{config_path}: id2label must map label ids (integers) to names, got {id2label!r:.80}"
        ) from None


def load_adapters(model: FastMiniPreTrainedModel, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    config_path, weights_path = _adapter_config_path(directory), directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (expected a directory written by save_adapters)")
    description = read_config_dict(config_path)
    for name in MATCHING_FIELDS:
        if description.get(name, MATCHING_DEFAULTS.get(name)) != getattr(model.config, name):
            raise CheckpointError(
                f"{config_path}: adapters were saved for {name}={description.get(name)}, "
                f"this model has {name}={getattr(model.config, name)}"
            )
    if description.get("architecture") != type(model).__name__:
        raise CheckpointError(
            f"{config_path}: adapters and head were saved from {description.get('architecture')}, "
            f"this model is {type(model).__name__}"
        )
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({error})") from error
    expected = _expected_adapter_shapes(model)
    if set(tensors) != set(expected):
        difference = sorted(set(tensors) ^ set(expected))
        raise CheckpointError(f"{weights_path}: keys do not match this model's adapters and head: {difference[:8]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{weights_path}: '{name}' has shape {tuple(tensor.shape)}, the model expects {expected[name]}"
            )
    id2label = _saved_labels(config_path, description.get("id2label"))
    _ensure_adapters(model)  # only now: a refused directory leaves the model as it was
    if id2label:
        model.config.id2label = id2label
        model.config.label2id = {v: k for k, v in id2label.items()}
    model.config.problem_type = description.get("problem_type")
    model.load_state_dict(tensors, strict=False)
