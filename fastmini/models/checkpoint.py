"""Finding and reading checkpoint files, locally or on the hub, without executing pickled code.

Weights are read from ``model.safetensors`` first, and from ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``; sharded checkpoints (``save_pretrained(max_shard_size=...)``,
an ``*.index.json`` beside its shards) are read shard by shard. Every failure is a CheckpointError
whose message names the file and what was wrong with it.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fastmini.files import looks_like_local_path

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
SAFETENSORS_INDEX_NAME = SAFETENSORS_NAME + ".index.json"
PICKLE_INDEX_NAME = PICKLE_NAME + ".index.json"
# In order of preference: safetensors before pickles, one file before shards.
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PICKLE_NAME, PICKLE_INDEX_NAME)
# Files one of which a saved tokenizer has; a model directory without any has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class NotInLocalCacheError(CheckpointError):
    """A hub file that is not in the local cache while downloading is off (offline, local_files_only)."""


def _download(repo_id: str, filename: str, hub_kwargs: dict[str, Any]) -> Path | None:
    """One file of a hub repository, or None when the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    # Subclasses before their bases: LocalEntryNotFoundError is an EntryNotFoundError (a cache miss,
    # not a missing file) and GatedRepoError is a RepositoryNotFoundError (it exists, access is refused).
    except LocalEntryNotFoundError as error:
        raise NotInLocalCacheError(
            f"'{repo_id}' is not a local directory, and its {filename} is not in the local hub cache "
            "(offline, or local_files_only=True)"
        ) from error
    except EntryNotFoundError:
        return None
    except GatedRepoError as error:
        raise CheckpointError(
            f"'{repo_id}' is a gated repository on the Hugging Face hub: accept its conditions on the hub, "
            "then log in (`huggingface-cli login`) or pass token=..."
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(
            f"'{repo_id}' is not a local directory and not a model on the Hugging Face hub"
        ) from error


def local_directory(name_or_path: str | Path, hub_kwargs: dict[str, Any]) -> Path | None:
    """The local model directory (``subfolder`` applied, as transformers does), or None for a hub id."""
    path = Path(name_or_path)
    if not path.is_dir():
        return None
    return path / hub_kwargs["subfolder"] if hub_kwargs.get("subfolder") else path


def config_file(name_or_path: str | Path, hub_kwargs: dict[str, Any] | None = None) -> Path:
    """Path of the ``config.json`` of a local directory or hub model id."""
    hub_kwargs = hub_kwargs or {}
    directory = local_directory(name_or_path, hub_kwargs)
    if directory is not None:
        found = directory / CONFIG_NAME
        if not found.is_file():
            raise CheckpointError(f"{directory}: no {CONFIG_NAME} in this directory (expected a saved model directory)")
        return found
    path = Path(name_or_path)
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory holding {CONFIG_NAME}, got a file")
    if looks_like_local_path(str(name_or_path)):
        raise CheckpointError(f"{name_or_path}: no such directory")
    found = _download(str(name_or_path), CONFIG_NAME, hub_kwargs)
    if found is None:
        raise CheckpointError(f"hub model '{name_or_path}' has no {CONFIG_NAME}")
    return found


def weights_file(name_or_path: str | Path, hub_kwargs: dict[str, Any] | None = None) -> Path:
    """Path of the weights (safetensors preferred) of a local directory or hub model id: one file,
    or the index of a sharded checkpoint."""
    hub_kwargs = hub_kwargs or {}
    directory = local_directory(name_or_path, hub_kwargs)
    if directory is not None:
        for name in WEIGHT_NAMES:
            if (directory / name).is_file():
                return directory / name
        raise CheckpointError(f"{directory}: no weights file; expected one of {', '.join(WEIGHT_NAMES)}")
    not_cached = False
    for name in WEIGHT_NAMES:
        # Offline, an uncached name may just be one the repository does not use: try the next.
        try:
            found = _download(str(name_or_path), name, hub_kwargs)
        except NotInLocalCacheError:
            not_cached = True
            continue
        if found is not None:
            return found
    if not_cached:
        raise NotInLocalCacheError(
            f"'{name_or_path}' is not a local directory, and none of its weight files ({', '.join(WEIGHT_NAMES)}) "
            "is in the local hub cache (offline, or local_files_only=True)"
        )
    raise CheckpointError(f"hub model '{name_or_path}' has none of {', '.join(WEIGHT_NAMES)}")


def _shard_names(index_path: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names the index places in it."""
    index = read_config_dict(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' of tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        # Shards lie beside their index: a name with a directory in it could point anywhere.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: '{key}' maps to {shard!r}, not a file name beside the index")
        shards.setdefault(shard, []).append(key)
    return shards


def read_weights(
    name_or_path: str | Path, hub_kwargs: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a checkpoint on the CPU (every shard of a sharded one) and the file they were
    found through (the weights file or the shards' index)."""
    hub_kwargs = hub_kwargs or {}
    path = weights_file(name_or_path, hub_kwargs)
    if not path.name.endswith(".index.json"):
        return load_state_dict(path), path
    state_dict: dict[str, torch.Tensor] = {}
    for shard, keys in _shard_names(path).items():
        shard_path = path.parent / shard
        if local_directory(name_or_path, hub_kwargs) is None:
            shard_path = _download(str(name_or_path), shard, hub_kwargs) or shard_path
        if not shard_path.is_file():
            raise CheckpointError(f"{path}: names the shard {shard}, which is missing")
        tensors = load_state_dict(shard_path)
        absent = [key for key in keys if key not in tensors]
        if absent:
            raise CheckpointError(f"{shard_path}: lacks {', '.join(absent[:8])}, which {path.name} places there")
        state_dict.update(tensors)
    return state_dict, path


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
