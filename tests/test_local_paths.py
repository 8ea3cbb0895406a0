"""A name that is not on this machine: a local path that does not exist, or a Hugging Face hub / datasets name.

Every loader decides it by one rule (``fastmini.files.looks_like_local_path``); the corpus reader widens it for
data files (globs, file suffixes)."""

from __future__ import annotations

import pytest

from fastmini.data import corpus
from fastmini.data.corpus import DataError
from fastmini.distill import models as distill_models
from fastmini.files import looks_like_local_path
from fastmini.finetune import data as finetune_data
from fastmini.finetune import models as finetune_models
from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.tasks import task_spec
from fastmini.models import CheckpointError, checkpoint
from fastmini.training.errors import UsageError

HUB_NAMES = ["bert-base-uncased", "someone/tiny-model", "Qwen/Qwen2.5-0.5B"]
MISSING_PATHS = ["./tiny", "../tiny", "/no/such/tiny", "~/no-such-tiny", "outputs/distill/tiny", "models\\tiny"]


@pytest.mark.parametrize("name", HUB_NAMES)
def test_a_hub_name_is_not_a_local_path(name):
    assert not looks_like_local_path(name)


@pytest.mark.parametrize("name", MISSING_PATHS)
def test_a_name_no_hub_name_can_be_is_a_local_path(name):
    assert looks_like_local_path(name)


class AskedTheHub(Exception):
    """Raised where a loader would go to the hub (or datasets) with the name."""


def ask_the_hub(*args, **kwargs):
    raise AskedTheHub


def distill_teacher(name: str) -> None:
    distill_models.resolve_model_path(name, "--teacher")


def finetune_model(name: str) -> None:
    finetune_models.ModelSource(FinetuneConfig(model=name))


def finetune_data_source(name: str) -> None:
    finetune_data.load_task_data(FinetuneConfig(data=name), task_spec("classification"))


def checkpoint_config(name: str) -> None:
    checkpoint.config_file(name)


def corpus_documents(name: str) -> None:
    corpus.load_documents(name)


LOADERS = [distill_teacher, finetune_model, finetune_data_source, checkpoint_config, corpus_documents]


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Every loader's first step towards the hub raises AskedTheHub; the working directory is empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill_models, "use_cache_if_hub_unreachable", ask_the_hub)
    monkeypatch.setattr(finetune_models, "use_cache_if_hub_unreachable", ask_the_hub)
    monkeypatch.setattr(finetune_data, "_datasets_splits", ask_the_hub)
    monkeypatch.setattr(checkpoint, "_download", ask_the_hub)
    monkeypatch.setattr(corpus, "_load_named_dataset", ask_the_hub)


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("name", MISSING_PATHS)
def test_every_loader_calls_a_missing_local_path_missing(hub_unreachable, load, name):
    with pytest.raises((UsageError, CheckpointError), match="no such (directory|file)"):
        load(name)


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("name", HUB_NAMES)
def test_every_loader_takes_a_hub_name_to_the_hub(hub_unreachable, load, name):
    with pytest.raises(AskedTheHub):
        load(name)


@pytest.mark.parametrize("name", ["corpus.txt", "wiki/*.jsonl", "shard[0-3].parquet"])
def test_the_corpus_reader_also_takes_file_names_and_patterns_for_local_files(hub_unreachable, name):
    """A corpus may be files: a missing "corpus.txt" is no datasets name. A model or a fine-tuning --data (a
    directory) keeps the narrower rule, where such a name is still asked of the hub."""
    assert not looks_like_local_path(name)
    with pytest.raises(DataError, match="no such file|matches no files"):
        corpus_documents(name)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fastmini.finetune.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("name", MISSING_PATHS)
def test_finetune_tokenizer_calls_a_missing_local_path_missing(hub_unreachable, tiny_model, name):
    with pytest.raises(UsageError, match="--tokenizer .*: no such directory"):
        finetune_models.ModelSource(FinetuneConfig(model=str(tiny_model), tokenizer=name))


@pytest.mark.parametrize("name", HUB_NAMES)
def test_finetune_tokenizer_takes_a_hub_name_to_the_hub(hub_unreachable, tiny_model, name):
    with pytest.raises(AskedTheHub):
        finetune_models.ModelSource(FinetuneConfig(model=str(tiny_model), tokenizer=name))
