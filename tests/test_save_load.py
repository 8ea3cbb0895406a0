"""save_pretrained / from_pretrained round trips, through the fastmini classes and the Auto classes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from fastmini import (
    CheckpointError,
    FastMiniConfig,
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
)

AUTO = [
    (AutoModel, FastMiniModel),
    (AutoModelForMaskedLM, FastMiniForMaskedLM),
    (AutoModelForSequenceClassification, FastMiniForSequenceClassification),
    (AutoModelForTokenClassification, FastMiniForTokenClassification),
]


def assert_same_weights(model, reloaded) -> None:
    """Every tensor reloaded exactly (the models are randomized first: with default initialisation, biases 0
    and LayerNorm 1/0, a loader that dropped those tensors would go unseen)."""
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("auto_class, model_class", AUTO, ids=lambda c: c.__name__)
@pytest.mark.parametrize("use_adapter", [True, False])
def test_auto_round_trip_is_exact(auto_class, model_class, use_adapter, tiny_config, randomize, batch, tmp_path):
    model = randomize(model_class(tiny_config(use_adapter=use_adapter, num_labels=3))).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastMiniConfig)
    reloaded = auto_class.from_pretrained(tmp_path)
    assert type(reloaded) is model_class
    assert not reloaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        for flags in ({}, {"output_attentions": True, "output_hidden_states": True}):
            expected, actual = model(**batch, **flags), reloaded(**batch, **flags)
            for key in expected:
                if isinstance(expected[key], torch.Tensor):
                    assert torch.equal(expected[key], actual[key]), key


def test_saved_weights_use_fastmini_names(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "fastmini.encoder.shared_layer.query.weight" in keys
    assert "fastmini.encoder.attention_adapters.2.down.weight" in keys
    assert "lm_head.decoder.weight" in keys


def test_pickle_weights_of_a_fastmini_directory_load_too(tiny_config, randomize, batch, tmp_path):
    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    reloaded = FastMiniForMaskedLM.from_pretrained(tmp_path)
    assert_same_weights(model, reloaded)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_base_model_checkpoint_loads_into_task_model(tiny_config, tmp_path):
    base = FastMiniModel(tiny_config())
    base.save_pretrained(tmp_path)
    model, info = FastMiniForTokenClassification.from_pretrained(tmp_path, num_labels=4, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.bias", "classifier.weight"}
    assert torch.equal(model.fastmini.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_a_base_models_pooler_loads_into_its_classifier(tiny_config, randomize, tmp_path):
    """The ALBERT heads' tanh pooler belongs to the base model: a classifier built from it keeps it (as
    transformers' AlbertForSequenceClassification from an AlbertModel), only the classifier is new."""
    base = randomize(FastMiniModel(tiny_config(head_variant="albert", use_adapter=False)))
    base.save_pretrained(tmp_path)
    classifier, info = FastMiniForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.bias", "classifier.weight"} and info["unexpected_keys"] == set()
    assert torch.equal(classifier.fastmini.pooler.weight, base.pooler.weight)
    assert torch.equal(classifier.fastmini.pooler.bias, base.pooler.bias)


def test_a_task_head_loaded_into_the_base_model_is_reported_unused(tiny_config, tmp_path, caplog):
    """As transformers reports an AlbertForSequenceClassification's classifier loaded into AlbertModel: the
    head's keys are unexpected, with a warning (they were dropped silently)."""
    FastMiniForSequenceClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fastmini.models.loading"):
        _, info = FastMiniModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == {"classifier.bias", "classifier.weight"} and info["missing_keys"] == set()
    assert "classifier.* (2 tensors)" in caplog.text


def test_a_none_override_resets_the_saved_value_as_in_transformers(tiny_config, tmp_path):
    FastMiniForSequenceClassification(tiny_config(problem_type="regression", num_labels=1)).save_pretrained(tmp_path)
    assert FastMiniForSequenceClassification.from_pretrained(tmp_path).config.problem_type == "regression"
    reset = FastMiniForSequenceClassification.from_pretrained(tmp_path, problem_type=None)
    assert reset.config.problem_type is None


def test_a_config_passed_in_is_copied_not_shared_nor_changed(tiny_config, tmp_path):
    """As transformers: two models loaded with one config object must not share it, so adapter tuning one
    (which records use_adapter in its config) leaves the other's checkpoint loadable, and overrides stay local."""
    FastMiniForSequenceClassification(tiny_config(use_adapter=False)).save_pretrained(tmp_path)
    config = FastMiniConfig.from_pretrained(tmp_path)
    full = FastMiniForSequenceClassification.from_pretrained(tmp_path, config=config)
    tuned = FastMiniForSequenceClassification.from_pretrained(tmp_path, config=config, output_hidden_states=True)
    tuned.train_adapters_only()
    assert full.config is not tuned.config and not full.config.use_adapter and not config.use_adapter
    assert tuned.config.output_hidden_states and not config.output_hidden_states
    full.save_pretrained(tmp_path / "full")
    FastMiniForSequenceClassification.from_pretrained(tmp_path / "full")
    in_memory = FastMiniForSequenceClassification.from_pretrained(None, config=config, state_dict=full.state_dict())
    assert in_memory.config is not config


def test_dtype_argument(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert FastMiniForMaskedLM.from_pretrained(tmp_path).dtype == torch.float32
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, dtype="float16").config.dtype == torch.float16
    # transformers' per-module spelling, whole model under ""
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, dtype={"": torch.float16}).dtype == torch.float16


def test_default_dtype_is_the_checkpoints_as_in_transformers_5(tiny_config, tmp_path):
    """transformers 5 loads with dtype="auto": what config.json records, else the weights' own dtype."""
    FastMiniForMaskedLM(tiny_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    reloaded = FastMiniForMaskedLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.dtype == torch.bfloat16
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_sharded_checkpoints_load(tiny_config, randomize, batch, tmp_path, safe_serialization):
    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=safe_serialization)
    if not safe_serialization:  # transformers 5 writes safetensors only: rewrite its shards as pickles
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            torch.save(load_file(tmp_path / shard), tmp_path / shard.replace(".safetensors", ".bin"))
            (tmp_path / shard).unlink()
        index["weight_map"] = {k: v.replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}
        (tmp_path / "model.safetensors.index.json").unlink()
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert len(set(json.loads(next(tmp_path.glob("*.index.json")).read_text())["weight_map"].values())) > 1
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_a_sharded_checkpoint_with_a_missing_or_escaping_shard_is_refused(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=f"names the shard {shard}, which is missing"):
        FastMiniForMaskedLM.from_pretrained(tmp_path)
    index["weight_map"] = {key: "../elsewhere.safetensors" for key in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name beside the index"):
        FastMiniForMaskedLM.from_pretrained(tmp_path)


def test_subfolder_of_a_local_directory(tiny_config, randomize, batch, tmp_path):
    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    model.save_pretrained(tmp_path / "student")
    reloaded = FastMiniForMaskedLM.from_pretrained(tmp_path, subfolder="student")
    assert_same_weights(model, reloaded)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_a_directory_of_weights_alone_loads_with_a_config(tiny_config, randomize, batch, tmp_path):
    """What accelerate's save_model writes: model.safetensors and no config.json; config= supplies it."""
    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    reloaded = FastMiniForMaskedLM.from_pretrained(tmp_path, config=model.config)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    with pytest.raises(CheckpointError, match="no config.json in this directory"):
        FastMiniForMaskedLM.from_pretrained(tmp_path)  # and without config= it is still named


def test_loading_under_a_meta_device_context_is_refused(tiny_config, tmp_path):
    """It would give a model on meta with no weights loaded, and only a warning per tensor."""
    FastMiniModel(tiny_config()).save_pretrained(tmp_path)
    with torch.device("meta"), pytest.raises(RuntimeError, match="would load no weights at all"):
        FastMiniModel.from_pretrained(tmp_path)


def test_weights_from_memory_as_transformers_takes_them(tiny_config, randomize, batch, tmp_path):
    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    reloaded = FastMiniForMaskedLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="state_dict cannot be passed together with a model name"):
        FastMiniForMaskedLM.from_pretrained(tmp_path, state_dict=model.state_dict())


def test_weights_from_memory_take_the_loading_arguments(tiny_config):
    """output_loading_info and ignore_mismatched_sizes mean the same with state_dict= as with a directory."""
    two_labels = FastMiniForSequenceClassification(tiny_config(num_labels=2))
    loaded, info = FastMiniForSequenceClassification.from_pretrained(
        None, config=two_labels.config, state_dict=two_labels.state_dict(), output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    three_labels = tiny_config(num_labels=3)
    with pytest.raises(CheckpointError, match="pass ignore_mismatched_sizes=True"):
        FastMiniForSequenceClassification.from_pretrained(None, config=three_labels, state_dict=two_labels.state_dict())
    loaded, info = FastMiniForSequenceClassification.from_pretrained(
        None, config=three_labels, state_dict=two_labels.state_dict(), ignore_mismatched_sizes=True,
        output_loading_info=True,
    )  # fmt: skip
    assert loaded.classifier.out_features == 3
    assert sorted(key for key, _, _ in info["mismatched_keys"]) == ["classifier.bias", "classifier.weight"]


def test_albert_heads_tie_the_decoder_by_default(tiny_config):
    albert = FastMiniForMaskedLM(tiny_config(head_variant="albert"))
    assert albert.config.tie_word_embeddings
    assert albert.lm_head.decoder.weight is albert.fastmini.embeddings.word_embeddings.weight
    assert not FastMiniForMaskedLM(tiny_config()).config.tie_word_embeddings  # MiniALBERT's decoder is its own
    untied = FastMiniForMaskedLM(tiny_config(head_variant="albert", tie_word_embeddings=False))
    assert untied.lm_head.decoder.weight is not untied.fastmini.embeddings.word_embeddings.weight


def test_an_untied_checkpoint_loaded_with_tying_asked_for_keeps_both_matrices(
    tiny_config, randomize, batch, tmp_path, caplog
):
    """As transformers: both sides of a tied pair in the checkpoint with different values load untied, with a
    warning. Tied, the decoder (loaded last) overwrote the trained input embeddings."""
    untied = randomize(FastMiniForMaskedLM(tiny_config(head_variant="albert", tie_word_embeddings=False))).eval()
    untied.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fastmini.models.loading"):
        loaded = FastMiniForMaskedLM.from_pretrained(tmp_path, tie_word_embeddings=True)
    assert "different values: loading them untied" in caplog.text
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.decoder.weight is not loaded.fastmini.embeddings.word_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, untied(**batch).logits)
    tied = randomize(FastMiniForMaskedLM(tiny_config(head_variant="albert")))
    tied.save_pretrained(tmp_path / "tied")  # equal values: tied, as saved
    assert FastMiniForMaskedLM.from_pretrained(tmp_path / "tied").config.tie_word_embeddings


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "path"])
def test_config_given_as_a_path_as_transformers_takes_it(as_path, tiny_config, randomize, batch, tmp_path):
    model = randomize(FastMiniForSequenceClassification(tiny_config(num_labels=3))).eval()
    model.save_pretrained(tmp_path)
    config = tmp_path if as_path else str(tmp_path)
    loaded = FastMiniForSequenceClassification.from_pretrained(tmp_path, config=config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def serve_hub(monkeypatch, tmp_path, files: dict, failures: dict) -> list[str]:
    """Stand-in for huggingface_hub.hf_hub_download: `files` (name -> local path) are served, names in
    `failures` raise that exception, any other name is missing from the repository."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append(filename)
        if filename in failures:
            raise failures[filename]
        if filename not in files:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return requested


def test_a_hub_model_missing_from_the_local_cache_is_reported_as_such(monkeypatch, tmp_path):
    """LocalEntryNotFoundError is an EntryNotFoundError: offline it must not read as "no config.json"."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    serve_hub(monkeypatch, tmp_path, {}, {"config.json": LocalEntryNotFoundError("offline")})
    with pytest.raises(CheckpointError, match=r"config.json is not in the local hub cache \(offline"):
        FastMiniForMaskedLM.from_pretrained("someone/tiny", local_files_only=True)


def test_offline_the_weights_search_skips_uncached_names(tiny_config, randomize, batch, monkeypatch, tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    model = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    uncached = {name: LocalEntryNotFoundError(name) for name in ("model.safetensors", "model.safetensors.index.json")}
    files = {"config.json": tmp_path / "config.json", "pytorch_model.bin": tmp_path / "pytorch_model.bin"}
    requested = serve_hub(monkeypatch, tmp_path, files, uncached)
    reloaded = FastMiniForMaskedLM.from_pretrained("someone/tiny", local_files_only=True)
    assert requested[-1] == "pytorch_model.bin"
    assert_same_weights(model, reloaded)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    files.pop("pytorch_model.bin")
    uncached["pytorch_model.bin"] = LocalEntryNotFoundError("pytorch_model.bin")
    with pytest.raises(CheckpointError, match="none of its weight files .* is in the local hub cache"):
        FastMiniForMaskedLM.from_pretrained("someone/tiny", local_files_only=True)


def test_a_gated_hub_repository_asks_for_a_token(monkeypatch, tmp_path):
    """GatedRepoError is a RepositoryNotFoundError: the repository exists, access needs a login."""
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError

    gated = GatedRepoError(
        "Access to model someone/gated is restricted", response=SimpleNamespace(headers={}, request=None)
    )
    serve_hub(monkeypatch, tmp_path, {}, {"config.json": gated})
    with pytest.raises(CheckpointError, match=r"gated repository.*huggingface-cli login.*token="):
        FastMiniForMaskedLM.from_pretrained("someone/gated")


@pytest.mark.parametrize(
    "device_map", ["cpu", {"": "cpu"}, {"": torch.device("cpu")}, {"fastmini": "cpu", "lm_head": "cpu"}]
)
def test_device_map_on_one_device(device_map, tiny_config, tmp_path):
    """transformers spells "everything on one device" as a dict too ({"": 0} is cuda:0)."""
    from fastmini.models.loading import _target_device

    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, device_map=device_map).device == torch.device("cpu")
    assert _target_device({"": "cuda:0"}) == torch.device("cuda", 0)  # {"": 0} too, where a GPU is
    with pytest.raises(ValueError, match="one device"):
        FastMiniForMaskedLM.from_pretrained(tmp_path, device_map={"fastmini": "cpu", "lm_head": "meta"})


@pytest.mark.parametrize("device_map", ["balanced", "balanced_low_0", "sequential"])
def test_spreading_device_maps_put_the_small_model_on_one_device(device_map, tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, device_map=device_map).device.type == expected


def test_an_unknown_device_map_is_named(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map must be a device .* got 'everywhere'"):
        FastMiniForMaskedLM.from_pretrained(tmp_path, device_map="everywhere")
