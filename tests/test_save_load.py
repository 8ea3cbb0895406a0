"""save_pretrained / from_pretrained round trips, through the fastmini classes and the Auto classes."""

from __future__ import annotations

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


def test_pickle_weights_of_a_fastmini_directory_load_too(tiny_config, batch, tmp_path):
    model = FastMiniForMaskedLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    reloaded = FastMiniForMaskedLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_base_model_checkpoint_loads_into_task_model(tiny_config, tmp_path):
    base = FastMiniModel(tiny_config())
    base.save_pretrained(tmp_path)
    model, info = FastMiniForTokenClassification.from_pretrained(tmp_path, num_labels=4, output_loading_info=True)
    assert info["missing_keys"] == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.fastmini.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_dtype_argument(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    assert FastMiniForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert FastMiniForMaskedLM.from_pretrained(tmp_path).dtype == torch.float32
