"""``from_pretrained`` for every fastmini class and every checkpoint format it accepts.

One path for all formats: read config.json (local directory or hub id), build the
FastMiniConfig (converting original MiniALBERT / ALBERT configs), read the weights safely,
rename original keys, reconcile them with the model's own parameters, and refuse anything
inconsistent with one CheckpointError naming the file and the keys. Task heads that the
checkpoint lacks are freshly initialised with a warning, as transformers does.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from fastmini.models.checkpoint import (
    CONFIG_NAME,
    HUB_KWARGS,
    CheckpointError,
    config_file,
    hub_kwargs_from,
    local_directory,
    read_config_dict,
    read_weights,
)
from fastmini.models.configuration import FastMiniConfig, check_config
from fastmini.models.conversion import FASTMINI, config_from_original, convert_state_dict, detect_format

if TYPE_CHECKING:  # modeling.py imports this module
    from fastmini.models.modeling import FastMiniPreTrainedModel

logger = logging.getLogger(__name__)

Model = TypeVar("Model", bound="FastMiniPreTrainedModel")

# Keys that some classes have and others do not; their absence or presence is not an error.
OPTIONAL_PREFIXES = ("lm_head.", "classifier.", "fastmini.pooler.", "pooler.")
# The task heads: outside the base model, so a base model's checkpoint never prefixes them (its pooler is its own).
TASK_HEAD_PREFIXES = ("lm_head.", "classifier.")
# device_map strings that spread a big model over devices: a fastmini model fits one, the first accelerator.
SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# from_pretrained arguments that only make sense for transformers' own loader.
IGNORED_KWARGS = {
    "trust_remote_code",
    "low_cpu_mem_usage",
    "attn_implementation",
    "use_safetensors",
    "weights_only",
    "from_tf",
    "from_flax",
    "adapter_kwargs",
}


def _build_config(config_dict: dict[str, Any], checkpoint_format: str, source: str) -> FastMiniConfig:
    if checkpoint_format != FASTMINI:
        return config_from_original(config_dict, checkpoint_format, source)
    try:
        return FastMiniConfig.from_dict(config_dict)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from error


def _apply_overrides(config: FastMiniConfig, overrides: dict[str, Any], source: str) -> None:
    unknown = []
    for name, value in overrides.items():
        if name.startswith("_") or name in IGNORED_KWARGS:
            continue
        if hasattr(config, name):
            setattr(config, name, value)  # None too, as transformers does: problem_type=None resets it
        elif value is not None:  # a None for a loader option fastmini lacks asks for nothing
            unknown.append(name)
    if unknown:
        logger.warning("from_pretrained(%s): ignoring unsupported argument(s) %s", source, ", ".join(sorted(unknown)))
    try:
        check_config(config)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error


def _is_optional(key: str) -> bool:
    return key.startswith(OPTIONAL_PREFIXES)


def _align_prefix(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match checkpoints saved from the base model to task models, and vice versa. A task model's head loaded
    into the base model is kept under its own name, so that reconcile reports it as unused."""
    prefix = model.base_model_prefix + "."
    if model is model.base_model:
        if any(key.startswith(prefix) for key in state_dict):
            return {
                key[len(prefix) :] if key.startswith(prefix) else key: value
                for key, value in state_dict.items()
                if key.startswith(prefix) or key.startswith(TASK_HEAD_PREFIXES)
            }
        return state_dict
    if not any(key.startswith(prefix) for key in state_dict):
        return {(key if key.startswith(TASK_HEAD_PREFIXES) else prefix + key): v for key, v in state_dict.items()}
    return state_dict


def tied_weight_keys(model: FastMiniPreTrainedModel) -> set[str]:
    """The keys a checkpoint may leave out because they are tied to another (ALBERT heads' decoder)."""
    return set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()


def untie_where_the_checkpoint_differs(cls, config: FastMiniConfig, state_dict: dict[str, torch.Tensor], source: str):
    """A checkpoint holding both sides of a tied pair with different values (trained untied) loads untied, as
    transformers loads it: tying would make one side overwrite the other (the decoder, loaded last, replaced the
    trained input embeddings)."""
    if not config.tie_word_embeddings:
        return
    for target, tied_to in (getattr(cls, "_tied_weights_keys", None) or {}).items():
        # the checkpoint spells the embeddings with the base model's prefix, or without it when saved from the base
        source_key = next((key for key in (tied_to, tied_to.partition(".")[2]) if key in state_dict), None)
        if target not in state_dict or source_key is None:
            continue
        if state_dict[target].shape != state_dict[source_key].shape or not torch.equal(
            state_dict[target], state_dict[source_key]
        ):
            logger.warning(
                "%s: %s and %s are tied by the config (tie_word_embeddings=True) but both are in the checkpoint with "
                "different values: loading them untied (tie_word_embeddings=False), as transformers does",
                source,
                target,
                source_key,
            )
            config.tie_word_embeddings = False
            return


def reconcile(
    model: FastMiniPreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    source: str,
    ignore_mismatched_sizes: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, set | list]]:
    """The subset of ``state_dict`` to load into ``model``, and the loading info as transformers 5 gives it (sets
    of missing and unexpected keys, of (key, checkpoint shape, model shape) mismatches); raises on anything
    inconsistent."""
    state_dict = _align_prefix(model, state_dict)
    expected = model.state_dict()
    tied = tied_weight_keys(model)
    missing = sorted(key for key in expected if key not in state_dict and key not in tied)
    unexpected = sorted(key for key in state_dict if key not in expected)
    required = [key for key in missing if not _is_optional(key)]
    if required:
        raise CheckpointError(
            f"{source}: missing weights for {type(model).__name__}: {', '.join(required[:8])}"
            + (f" and {len(required) - 8} more" if len(required) > 8 else "")
        )
    foreign = [key for key in unexpected if not _is_optional(key)]
    if foreign:
        raise CheckpointError(
            f"{source}: unexpected weights not used by {type(model).__name__}: {', '.join(foreign[:8])}"
            + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        )
    mismatched = []
    for key in sorted(set(state_dict) & set(expected)):
        got, want = tuple(state_dict[key].shape), tuple(expected[key].shape)
        if got == want:
            continue
        if not (ignore_mismatched_sizes and _is_optional(key)):
            raise CheckpointError(
                f"{source}: '{key}' has shape {got} but the model expects {want}"
                + (" (pass ignore_mismatched_sizes=True to re-initialise a task head)" if _is_optional(key) else "")
            )
        mismatched.append((key, got, want))
    skipped = set(unexpected) | {key for key, _, _ in mismatched}
    usable = {key: value for key, value in state_dict.items() if key not in skipped}
    fresh = missing + [key for key, _, _ in mismatched]
    if fresh:
        logger.warning(
            "Some weights of %s were not in %s and are newly initialised: %s. Train the model before using it.",
            type(model).__name__,
            source,
            ", ".join(fresh),
        )
    if unexpected:
        # As transformers' UNEXPECTED keys: a checkpoint's head that this class has no use for (an MLM
        # head loaded for classification) is dropped, which the user should hear about.
        logger.warning(
            "Some weights of %s were not used by %s and are ignored: %s.",
            source,
            type(model).__name__,
            _compact(unexpected),
        )
    return usable, {
        "missing_keys": set(missing),
        "unexpected_keys": set(unexpected),
        "mismatched_keys": set(mismatched),
        "error_msgs": [],
    }


def _compact(keys: list[str]) -> str:
    """Key names grouped by their optional prefix ("lm_head.* (6 tensors)"), others one by one."""
    groups: dict[str, int] = {}
    for key in keys:
        prefix = next((p for p in OPTIONAL_PREFIXES if key.startswith(p)), key)
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(
        name if name in keys else f"{name}* ({count} tensor{'s' if count > 1 else ''})"
        for name, count in groups.items()
    )


def _target_dtype(dtype: Any, config_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """transformers 5's rule: ``"auto"`` (the default) is the dtype config.json records, else the
    checkpoint's first floating-point tensor's; a dtype or its name is taken as it is, and a dict (transformers'
    per-module spelling) gives its "" entry, everything here being one module."""
    if isinstance(dtype, dict):
        return _target_dtype(dtype.get("", "auto"), config_dict, state_dict)
    if dtype is None or dtype == "auto":
        recorded = config_dict.get("dtype") or config_dict.get("torch_dtype")
        if recorded is not None:
            return _target_dtype(recorded, {}, {})
        floating = [t.dtype for t in state_dict.values() if t.is_floating_point()]
        return floating[0] if floating else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"from_pretrained: unknown dtype '{dtype}'")
        return resolved
    return dtype


def _target_device(device_map: Any) -> torch.device | None:
    if device_map is None:
        return None
    if device_map in SPREADING_DEVICE_MAPS:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        # {"": "cpu"} or {"": 0}: transformers' spelling of "everything on one device".
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                "from_pretrained: fastmini models are small; device_map must place every module on one "
                f"device, got {device_map}"
            )
        return _target_device(devices.pop())
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            "from_pretrained: device_map must be a device ('cpu', 'cuda:0', 0), one of "
            f"{', '.join(SPREADING_DEVICE_MAPS)} or a dict placing every module on one device, got {device_map!r}"
        ) from error


def load_pretrained(
    cls: type[Model], name_or_path: str | os.PathLike | None, *model_args: Any, **kwargs: Any
) -> Model | tuple[Model, dict[str, list]]:
    """Implementation of ``FastMiniPreTrainedModel.from_pretrained`` (see its docstring)."""
    if torch.get_default_device().type == "meta":
        raise RuntimeError(
            "from_pretrained under `with torch.device('meta')` would load no weights at all; build an empty model "
            "with the class itself there (FastMiniModel(config)) or with accelerate's init_empty_weights()"
        )
    hub_kwargs = hub_kwargs_from(kwargs)
    for name in HUB_KWARGS:
        kwargs.pop(name, None)
    # transformers copies a config it is given: models loaded with one object must not share it, nor change it
    config = copy.deepcopy(kwargs.pop("config", None))
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    device = _target_device(kwargs.pop("device_map", None))
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    output_loading_info = kwargs.pop("output_loading_info", False)
    state_dict = kwargs.pop("state_dict", None)
    if state_dict is not None:
        model, loading_info = _from_state_dict(
            cls, name_or_path, config, state_dict, dtype, device, ignore_mismatched_sizes, model_args, kwargs
        )
        return (model, loading_info) if output_loading_info else model

    config_dict, checkpoint_format, config_source = _saved_config(name_or_path, hub_kwargs, config)
    if config is None:
        config = _build_config(config_dict, checkpoint_format, config_source)
    elif isinstance(config, (str, os.PathLike)):  # as transformers takes it: where a config.json is
        config = FastMiniConfig.from_pretrained(config)
    elif not isinstance(config, FastMiniConfig):
        raise TypeError(
            f"from_pretrained: config must be a FastMiniConfig or the path of its config.json's directory, got "
            f"{type(config).__name__} (FastMiniConfig.from_pretrained converts ALBERT and MiniALBERT configs)"
        )
    _apply_overrides(config, kwargs, str(name_or_path))
    config.name_or_path = str(name_or_path)

    state_dict, weights_path = read_weights(name_or_path, hub_kwargs)
    if checkpoint_format != FASTMINI:
        state_dict = convert_state_dict(state_dict, checkpoint_format, str(weights_path))
    untie_where_the_checkpoint_differs(cls, config, state_dict, str(weights_path))
    model = cls(config, *model_args)
    usable, loading_info = reconcile(model, state_dict, str(weights_path), ignore_mismatched_sizes)
    model.load_state_dict(usable, strict=False)
    _finish_loading(model, _target_dtype(dtype, config_dict, state_dict), device)
    return (model, loading_info) if output_loading_info else model


def _saved_config(
    name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any], config: FastMiniConfig | None
) -> tuple[dict[str, Any], str, str]:
    """(config.json's dict, the checkpoint format it tells, where it was read). A local directory of weights
    alone (accelerate's save_model writes no config.json) loads with ``config=FastMiniConfig(...)``: fastmini's
    own format then, and the weights' dtype."""
    directory = local_directory(name_or_path, hub_kwargs)
    if isinstance(config, FastMiniConfig) and directory is not None and not (directory / CONFIG_NAME).is_file():
        return {}, FASTMINI, str(directory)
    config_path = config_file(name_or_path, hub_kwargs)
    config_dict = read_config_dict(config_path)
    return config_dict, detect_format(config_dict, str(config_path)), str(config_path)


def _finish_loading(model, dtype: torch.dtype, device: torch.device | None) -> None:
    model.to(dtype=dtype)
    model.config.dtype = dtype
    if device is not None:
        model.to(device)
    model.eval()


def _from_state_dict(
    cls, name_or_path, config, state_dict, dtype, device, ignore_mismatched_sizes, model_args, overrides
):
    """``from_pretrained(None, config=config, state_dict=...)``: transformers' way of building a model
    from weights in memory (fastmini key names). Returns the model and its loading info."""
    if name_or_path is not None:
        raise ValueError("from_pretrained: state_dict cannot be passed together with a model name or path")
    if not isinstance(config, FastMiniConfig):
        raise TypeError("from_pretrained: state_dict needs config=FastMiniConfig(...) and no model name or path")
    _apply_overrides(config, overrides, "state_dict")
    untie_where_the_checkpoint_differs(cls, config, state_dict, "state_dict")
    model = cls(config, *model_args)
    usable, loading_info = reconcile(model, state_dict, "state_dict", ignore_mismatched_sizes)
    model.load_state_dict(usable, strict=False)
    _finish_loading(model, _target_dtype(dtype, {}, state_dict), device)
    return model, loading_info
