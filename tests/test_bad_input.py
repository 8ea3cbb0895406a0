"""Each bad checkpoint or config raises one clear error naming the problem, never unpickles code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmini import CheckpointError, FastMiniConfig, FastMiniForMaskedLM, FastMiniModel
from fastmini.baselines.original import OriginalMiniAlbertForMaskedLM, save_original_checkpoint


@pytest.fixture
def saved(tiny_config, tmp_path):
    directory = tmp_path / "model"
    FastMiniForMaskedLM(tiny_config()).save_pretrained(directory)
    return directory


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        FastMiniModel.from_pretrained(tmp_path / "nowhere" / "at" / "all")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        FastMiniModel.from_pretrained(tmp_path)


def test_directory_without_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_unreadable_config(saved):
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json: not a readable JSON"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_foreign_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not a fastmini, MiniALBERT or ALBERT"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_truncated_safetensors(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_truncated_pickle_weights(saved):
    state_dict = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(state_dict, saved / "pytorch_model.bin")
    data = (saved / "pytorch_model.bin").read_bytes()
    (saved / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a readable PyTorch weights file"):
        FastMiniForMaskedLM.from_pretrained(saved)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(saved, capsys):
    (saved / "model.safetensors").unlink()
    torch.save({"weight": _Exploit()}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        FastMiniForMaskedLM.from_pretrained(saved)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_keys(saved):
    state_dict = load_file(saved / "model.safetensors")
    del state_dict["fastmini.encoder.shared_layer.query.weight"]
    save_file(state_dict, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing weights .*shared_layer\.query\.weight"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_unexpected_keys(saved):
    state_dict = load_file(saved / "model.safetensors")
    state_dict["fastmini.encoder.extra_layer.weight"] = torch.zeros(3)
    save_file(state_dict, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected weights .*extra_layer\.weight"):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_wrong_shapes(saved):
    state_dict = load_file(saved / "model.safetensors")
    state_dict["fastmini.encoder.shared_layer.key.weight"] = torch.zeros(36, 35)
    save_file(state_dict, saved / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"shared_layer\.key\.weight' has shape \(36, 35\) but the model expects \(36, 36\)",
    ):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_classifier_with_other_label_count_needs_explicit_reinit(tiny_config, tmp_path):
    from fastmini import FastMiniForSequenceClassification

    FastMiniForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        FastMiniForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    model = FastMiniForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 5


def test_unknown_original_key(tiny_original_config, tmp_path):
    original = OriginalMiniAlbertForMaskedLM(tiny_original_config())
    directory = save_original_checkpoint(original, tmp_path)
    state_dict = load_file(directory / "model.safetensors")
    state_dict["albert.extra_head.weight"] = torch.zeros(2)
    save_file(state_dict, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key 'albert.extra_head.weight'"):
        FastMiniForMaskedLM.from_pretrained(directory)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=37), "hidden_size \\(37\\) must be divisible by num_attention_heads"),
        (dict(hidden_size=36, num_attention_heads=6, reduction_factor=5), "divisible by reduction_factor"),
        (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
        (dict(head_variant="bert"), "head_variant must be one of"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (
            dict(
                embedding_size=16,
                hidden_size=36,
                num_attention_heads=6,
                reduction_factor=4,
                use_embedding_projection=False,
            ),
            "use_embedding_projection=False",
        ),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob must be in"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings is only possible"),
        (dict(vocab_size=11, pad_token_id=11), "pad_token_id must be a token id below vocab_size \\(11\\)"),
        (dict(vocab_size=11, pad_token_id=-12), "pad_token_id must be a token id below vocab_size"),
        (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a number >= 0"),
        (dict(adapter_layer_norm_eps=float("nan")), "adapter_layer_norm_eps must be a number >= 0"),
    ],
)
def test_inconsistent_config(fields, message):
    with pytest.raises(ValueError, match=message):
        FastMiniConfig(**fields)


def test_inconsistent_config_in_a_checkpoint_names_the_file(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "reduction_factor": 5}))
    with pytest.raises(
        CheckpointError,
        match=r"config.json: FastMiniConfig: hidden_size \(36\) must be divisible by reduction_factor",
    ):
        FastMiniForMaskedLM.from_pretrained(saved)


def test_inconsistent_original_config_is_refused(tiny_original_config, tmp_path):
    directory = save_original_checkpoint(OriginalMiniAlbertForMaskedLM(tiny_original_config()), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "reduction_factor": 7}))
    with pytest.raises(CheckpointError, match="divisible by reduction_factor"):
        FastMiniForMaskedLM.from_pretrained(directory)
