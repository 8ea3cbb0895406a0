"""Finding and reading checkpoint files, locally or on the hub, without executing pickled code.

Weights are read from ``model.safetensors`` first, and from ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``. Every failure is a CheckpointError whose message names the
file and what was wrong with it.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
WEIGHT_NAMES = (SAFETENSORS_NAME, PICKLE_NAME)
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _download(repo_id: str, filename: str, hub_kwargs: dict[str, Any]) -> Path | None:
    """One file of a hub repository, or None when the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as error:
        raise CheckpointError(
            f"'{repo_id}' is not a local directory and not a model on the Hugging Face hub"
        ) from error
    except LocalEntryNotFoundError as error:
        raise CheckpointError(
            f"'{repo_id}' is not a local directory, and its {filename} is not in the hub cache "
            "(offline, or local_files_only=True)"
        ) from error


def config_file(name_or_path: str | Path, hub_kwargs: dict[str, Any] | None = None) -> Path:
    """Path of the ``config.json`` of a local directory or hub model id."""
    path = Path(name_or_path)
    if path.is_dir():
        found = path / CONFIG_NAME
        if not found.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in this directory (expected a saved model directory)")
        return found
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory holding {CONFIG_NAME}, got a file")
    if str(name_or_path).count("/") > 1 or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path}: no such directory")
    found = _download(str(name_or_path), CONFIG_NAME, hub_kwargs or {})
    if found is None:
        raise CheckpointError(f"hub model '{name_or_path}' has no {CONFIG_NAME}")
    return found


def weights_file(name_or_path: str | Path, hub_kwargs: dict[str, Any] | None = None) -> Path:
    """Path of the weights (safetensors preferred) of a local directory or hub model id."""
    path = Path(name_or_path)
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no weights file; expected one of {', '.join(WEIGHT_NAMES)}")
    for name in WEIGHT_NAMES:
        found = _download(str(name_or_path), name, hub_kwargs or {})
        if found is not None:
            return found
    raise CheckpointError(f"hub model '{name_or_path}' has none of {', '.join(WEIGHT_NAMES)}")


def read_config_dict(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file on the CPU; never unpickles arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file, truncated or corrupt? ({error})"
            ) from error
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path}: refused to load; it holds objects other than tensors, or is corrupt ({error})"
            ) from error
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable PyTorch weights file, truncated or corrupt? ({error})"
            ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return state_dict


def hub_kwargs_from(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of from_pretrained's keyword arguments that concern downloading."""
    return {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}
