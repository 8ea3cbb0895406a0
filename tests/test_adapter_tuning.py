"""Adapter tuning freezes exactly embeddings, projector and shared layer (SPEC.md, Model 6)."""

from __future__ import annotations

import pytest
import torch

from fastmini import CheckpointError, FastMiniForMaskedLM, FastMiniForSequenceClassification


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_freezes_exactly_the_encoder_body(tiny_config):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2))
    counts = model.train_adapters_only()
    names = trainable_names(model)
    assert names == {
        name for name, _ in model.named_parameters() if "_adapters." in name or name.startswith("classifier.")
    }
    assert any(name.startswith("fastmini.encoder.attention_adapters.") for name in names)
    assert any(name.startswith("fastmini.encoder.ffn_adapters.") for name in names)
    assert not any(
        name.startswith(("fastmini.embeddings.", "fastmini.projector.", "fastmini.encoder.shared_layer."))
        for name in names
    )
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_adds_fresh_adapters_to_a_model_without(tiny_config, batch):
    model = FastMiniForMaskedLM(tiny_config(use_adapter=False))
    assert not model.fastmini.encoder.has_adapters
    model.train_adapters_only()
    assert model.config.use_adapter
    assert len(model.fastmini.encoder.attention_adapters) == model.config.num_hidden_layers
    down = model.fastmini.encoder.attention_adapters[0].down.weight
    assert down.std() > 0  # initialised, not left empty
    assert torch.isfinite(model(**batch).logits).all()


def test_fresh_adapters_start_where_the_original_s_do(tiny_config):
    """The original's trainAdaptersOnly builds its adapters after post_init: torch's default initialisation
    (uniform weights and biases), not the model's normal(0, 0.02). Same seed, same values."""
    from fastmini.baselines.original import OriginalBottleneckAdapter

    config = tiny_config(use_adapter=False)
    model = FastMiniForMaskedLM(config)
    torch.manual_seed(7)
    model.train_adapters_only()
    torch.manual_seed(7)
    original = [OriginalBottleneckAdapter(config.hidden_size, config.reduction_factor)
                for _ in range(2 * config.num_hidden_layers)]  # fmt: skip  # att_adapters, then mlp_adapters
    encoder = model.fastmini.encoder
    ours = [*encoder.attention_adapters, *encoder.ffn_adapters]
    for adapter, theirs in zip(ours, original, strict=True):
        assert torch.equal(adapter.down.weight, theirs.block[0].weight)
        assert torch.equal(adapter.down.bias, theirs.block[0].bias)
        assert torch.equal(adapter.up.weight, theirs.block[2].weight)
        assert torch.equal(adapter.up.bias, theirs.block[2].bias)
        assert torch.equal(adapter.norm.weight, theirs.norm.weight) and torch.equal(adapter.norm.bias, theirs.norm.bias)
    assert ours[0].up.bias.abs().max() > 0  # not the model's zero biases


def test_training_step_changes_only_adapters_and_head(tiny_config, batch):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2))
    model.train_adapters_only()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == parameter.requires_grad, name


def _tuned_and_fresh(tiny_config):
    """A classifier with tuned adapters and head, and one with the same frozen body and none yet."""
    model = FastMiniForSequenceClassification(tiny_config(num_labels=3, use_adapter=False))
    model.train_adapters_only()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    fresh = FastMiniForSequenceClassification(tiny_config(num_labels=3, use_adapter=False))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k in fresh.state_dict()}, strict=False)
    return model.eval(), fresh


def test_save_and_load_adapters(tiny_config, batch, tmp_path):
    model, fresh = _tuned_and_fresh(tiny_config)
    model.save_adapters(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapters.safetensors")
    assert set(saved) == trainable_names(model)

    # same frozen body, no adapters yet: loading the adapters restores the tuned model
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            if name.startswith("classifier."):
                parameter.zero_()
    fresh.load_adapters(tmp_path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_saved_adapters_are_not_taken_for_a_peft_adapter(tiny_config, tmp_path):
    """adapter_config.json is PEFT's file: with peft installed, transformers' Auto from_pretrained reads a
    directory holding it as a PEFT adapter (and looks for its base_model_name_or_path)."""
    FastMiniForSequenceClassification(tiny_config(num_labels=2)).save_adapters(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapters.safetensors", "fastmini_adapters.json"]


def test_adapters_saved_under_the_earlier_config_name_still_load(tiny_config, batch, tmp_path):
    model, fresh = _tuned_and_fresh(tiny_config)
    model.save_adapters(tmp_path)
    (tmp_path / "fastmini_adapters.json").rename(tmp_path / "adapter_config.json")  # as earlier versions wrote it
    fresh.load_adapters(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_the_current_config_name_wins_over_the_earlier_one(tiny_config, tmp_path):
    """A directory saved again by this version may still hold the earlier file, now stale."""
    FastMiniForMaskedLM(tiny_config(num_hidden_layers=2)).save_adapters(tmp_path)
    (tmp_path / "fastmini_adapters.json").rename(tmp_path / "adapter_config.json")
    FastMiniForMaskedLM(tiny_config()).save_adapters(tmp_path)
    FastMiniForMaskedLM(tiny_config()).load_adapters(tmp_path)


def test_load_adapters_names_the_missing_description(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_adapters(tmp_path)
    (tmp_path / "fastmini_adapters.json").unlink()
    with pytest.raises(CheckpointError, match=r"fastmini_adapters\.json: missing \(expected a directory written by"):
        FastMiniForMaskedLM(tiny_config()).load_adapters(tmp_path)


def test_load_adapters_refuses_another_shape(tiny_config, tmp_path):
    model = FastMiniForMaskedLM(tiny_config())
    model.save_adapters(tmp_path)
    with pytest.raises(CheckpointError, match="num_hidden_layers=3, this model has num_hidden_layers=2"):
        FastMiniForMaskedLM(tiny_config(num_hidden_layers=2)).load_adapters(tmp_path)
    with pytest.raises(CheckpointError, match="saved from FastMiniForMaskedLM"):
        FastMiniForSequenceClassification(tiny_config()).load_adapters(tmp_path)


def test_albert_classifier_from_a_masked_lm_round_trips_through_its_adapters(tiny_config, batch, tmp_path):
    """A masked-LM checkpoint has no pooler: the albert variant's pooler is fresh on every load, so
    adapter tuning trains and saves it with the head, or reloaded adapters would not reproduce the model."""
    FastMiniForMaskedLM(tiny_config(head_variant="albert")).save_pretrained(tmp_path / "mlm")
    model = FastMiniForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=2)
    model.train_adapters_only()
    assert {"fastmini.pooler.weight", "fastmini.pooler.bias"} <= trainable_names(model)
    model.eval().save_adapters(tmp_path / "adapters")
    reloaded = FastMiniForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=2)
    reloaded.load_adapters(tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_refused_adapters_leave_the_model_as_it_was(tiny_config, tmp_path):
    FastMiniForSequenceClassification(tiny_config(num_labels=3)).save_adapters(tmp_path)
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2, use_adapter=False))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config_before = model.config.to_dict()
    with pytest.raises(CheckpointError, match=r"classifier\.(weight|bias)' has shape"):
        model.load_adapters(tmp_path)
    assert not model.fastmini.encoder.has_adapters and not model.config.use_adapter
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[name], before[name]) for name in before)
    assert model.config.to_dict() == config_before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "expected a JSON object, got list"),
        (b"\xff\xfe not text", "not a readable JSON config"),
        (None, "id2label must map label ids \\(integers\\) to names"),
    ],
    ids=["a list", "not utf-8", "a label id that is not a number"],
)
def test_a_damaged_description_is_refused_and_leaves_the_model_as_it_was(tiny_config, tmp_path, content, message):
    """Each was a raw AttributeError / UnicodeDecodeError / ValueError; the last after adding fresh adapters to a
    model that had none."""
    import json

    FastMiniForSequenceClassification(tiny_config(num_labels=2)).save_adapters(tmp_path)
    description = tmp_path / "fastmini_adapters.json"
    if content is None:
        saved = json.loads(description.read_text())
        description.write_text(json.dumps({**saved, "id2label": {"zero": "neg", "one": "pos"}}))
    else:
        description.write_bytes(content)
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2, use_adapter=False))
    with pytest.raises(CheckpointError, match=message):
        model.load_adapters(tmp_path)
    assert not model.fastmini.encoder.has_adapters and not model.config.use_adapter


def test_load_adapters_refuses_another_head_variant(tiny_config, tmp_path):
    FastMiniForSequenceClassification(tiny_config(num_labels=2)).save_adapters(tmp_path)
    with pytest.raises(CheckpointError, match="head_variant=minialbert, this model has head_variant=albert"):
        FastMiniForSequenceClassification(tiny_config(num_labels=2, head_variant="albert")).load_adapters(tmp_path)


def test_a_model_whose_width_allows_no_adapters_is_refused_unchanged(tiny_config):
    # Built without adapters, a config may carry any reduction_factor (36 is not divisible by 16): adding
    # adapters then would make them 36 // 16 wide and save a config that cannot be loaded again.
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2, use_adapter=False, reduction_factor=16))
    with pytest.raises(ValueError, match=r"cannot add adapters to this model: .*divisible by reduction_factor \(16\)"):
        model.train_adapters_only()
    assert not model.fastmini.encoder.has_adapters and not model.config.use_adapter
