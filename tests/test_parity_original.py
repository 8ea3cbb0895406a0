"""Original MiniALBERT checkpoints load as they are and give the original's outputs.

The oracle is fastmini.baselines.original: the original forward re-composed from transformers'
ALBERT modules, whose state dict carries the original key names.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from fastmini import (
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
)
from fastmini.baselines.original import (
    OriginalMiniAlbertForMaskedLM,
    OriginalMiniAlbertForSequenceClassification,
    OriginalMiniAlbertForTokenClassification,
    save_original_checkpoint,
)

RTOL = 1e-5
HEADS = {
    "masked_lm": (OriginalMiniAlbertForMaskedLM, FastMiniForMaskedLM),
    "sequence_classification": (
        OriginalMiniAlbertForSequenceClassification,
        FastMiniForSequenceClassification,
    ),
    "token_classification": (OriginalMiniAlbertForTokenClassification, FastMiniForTokenClassification),
}


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    assert error <= RTOL, f"{what}: relative error {error:.2e} > {RTOL}"


def real_tokens(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token outputs at real tokens only (fastmini computes nothing at padding); others whole."""
    return tensor[attention_mask.bool()] if tensor.dim() == 3 else tensor


def assert_matches_original(original_outputs, ours, attention_mask: torch.Tensor) -> None:
    logits, hidden_states, attentions = original_outputs
    assert_close_relative(real_tokens(ours.logits, attention_mask), real_tokens(logits, attention_mask), "logits")
    assert len(ours.hidden_states) == len(hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, hidden_states, strict=True)):
        assert_close_relative(real_tokens(a, attention_mask), real_tokens(b, attention_mask), f"hidden_states[{i}]")
    assert len(ours.attentions) == len(attentions)
    real_queries = attention_mask.bool()
    for i, (a, b) in enumerate(zip(ours.attentions, attentions, strict=True)):
        # (B, A, S, S) -> only the query rows of real tokens, every key column
        assert_close_relative(a.transpose(1, 2)[real_queries], b.transpose(1, 2)[real_queries], f"attentions[{i}]")


@pytest.mark.parametrize("use_adapter", [True, False])
def test_training_mode_draws_the_original_s_dropouts(use_adapter, tiny_original_config, tmp_path):
    """The MiniALBERT layer drops out both sublayers' outputs (SPEC.md), ALBERT's only the attention's:
    with one seed and no padding (the same tensors drawn), training mode gives the original's logits."""
    config = tiny_original_config(use_adapter=use_adapter, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    original = OriginalMiniAlbertForMaskedLM(config).train()
    model = FastMiniForMaskedLM.from_pretrained(save_original_checkpoint(original, tmp_path, "safetensors")).train()
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    attention_mask, token_type_ids = torch.ones_like(input_ids), torch.zeros_like(input_ids)
    torch.manual_seed(5)
    expected = original(input_ids, attention_mask, token_type_ids)[0]
    torch.manual_seed(5)
    ours = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    assert_close_relative(ours, expected, "training-mode logits")


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("use_adapter", [True, False], ids=["adapters", "no-adapters"])
@pytest.mark.parametrize("embedding_size", [16, 36], ids=["E!=H", "E==H"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_original_checkpoint_parity(
    head,
    use_adapter,
    embedding_size,
    hidden_act,
    weights_format,
    tiny_original_config,
    randomize,
    batch,
    tmp_path,
):
    config = tiny_original_config(use_adapter=use_adapter, embedding_size=embedding_size, hidden_act=hidden_act)
    original_class, fastmini_class = HEADS[head]
    original = randomize(original_class(config)).eval()
    directory = save_original_checkpoint(original, tmp_path / "original", weights_format)

    model = fastmini_class.from_pretrained(directory)
    assert model.config.use_adapter == use_adapter
    assert model.config.use_embedding_projection == (embedding_size != 36)
    assert model.config.head_variant == "minialbert"
    with torch.no_grad():
        expected = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ours = model(**batch, output_hidden_states=True, output_attentions=True)
    assert_matches_original(expected, ours, batch["attention_mask"])

    # converting and re-saving gives a fastmini directory with the same outputs
    model.save_pretrained(tmp_path / "converted")
    reloaded = fastmini_class.from_pretrained(tmp_path / "converted")
    assert reloaded.config.model_type == "fastmini"
    with torch.no_grad():
        again = reloaded(**batch, output_hidden_states=True, output_attentions=True)
    assert_matches_original(expected, again, batch["attention_mask"])


def test_sdpa_path_matches_original_without_attention_outputs(tiny_original_config, randomize, batch, tmp_path):
    """The default path (no probabilities materialised) gives the same hidden states."""
    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config())).eval()
    model = FastMiniForMaskedLM.from_pretrained(save_original_checkpoint(original, tmp_path))
    with torch.no_grad():
        logits, hidden_states, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ours = model(**batch, output_hidden_states=True)
    assert ours.attentions is None
    real = batch["attention_mask"].bool()
    assert_close_relative(ours.logits[real], logits[real], "logits")
    assert_close_relative(ours.hidden_states[-1][real], hidden_states[-1][real], "last hidden state")


def test_masked_lm_checkpoint_loads_into_base_and_task_models(tiny_original_config, randomize, batch, tmp_path, caplog):
    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config())).eval()
    directory = save_original_checkpoint(original, tmp_path)
    with torch.no_grad():
        _, hidden_states, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    base = FastMiniModel.from_pretrained(directory)
    with torch.no_grad():
        encoded = base(**batch)
    real = batch["attention_mask"].bool()
    assert_close_relative(encoded.last_hidden_state[real], hidden_states[-1][real], "encoder output")
    assert encoded.pooler_output is None  # MiniALBERT has no pooler

    with caplog.at_level(logging.WARNING, logger="fastmini"):
        classifier, info = FastMiniForSequenceClassification.from_pretrained(
            directory, num_labels=3, output_loading_info=True
        )
    assert info["missing_keys"] == {"classifier.bias", "classifier.weight"}
    assert all(key.startswith("lm_head.") for key in info["unexpected_keys"])
    # the dropped MLM head is said out loud, as transformers' UNEXPECTED keys are
    assert "not used by FastMiniForSequenceClassification and are ignored: lm_head.* (6 tensors)" in caplog.text
    torch.testing.assert_close(
        classifier.fastmini.encoder.shared_layer.query.weight,
        original.albert.albert.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight,
    )
    assert classifier.classifier.out_features == 3


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_bare_minialbert_model_checkpoint(weights_format, tiny_original_config, randomize, batch, tmp_path):
    """A saved MiniAlbertModel (no head) carries "albert.<AlbertModel>" keys and top-level projector
    and adapters, as the original MiniAlbertModel.save_pretrained writes them."""
    from fastmini.baselines.original import OriginalMiniAlbertModel

    original = randomize(OriginalMiniAlbertModel(tiny_original_config())).eval()
    directory = save_original_checkpoint(original, tmp_path, weights_format)
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["MiniAlbertModel"]
    if weights_format == "bin":
        keys = set(torch.load(directory / "pytorch_model.bin", weights_only=True))
    else:
        keys = set(load_file(directory / "model.safetensors"))
    assert {"albert.embeddings.word_embeddings.weight", "projector.weight", "att_adapters.0.block.0.weight"} <= keys
    assert not any(key.startswith(("albert.albert.", "albert.projector.")) for key in keys)
    if weights_format == "bin":
        assert "albert.embeddings.position_ids" in keys
    with torch.no_grad():
        expected, _, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        actual = FastMiniModel.from_pretrained(directory)(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert_close_relative(actual[real], expected[real], "encoder output")


def test_published_model_checkpoint_has_the_bare_layout(tiny_original_config, monkeypatch, tmp_path):
    """The benchmarks' stand-in for nlpie/miniALBERT-128 is saved as a real MiniAlbertModel."""
    from fastmini.baselines import original as baseline

    monkeypatch.setattr(baseline, "original_config", lambda **published: tiny_original_config())  # tiny, fast
    _, directory = baseline.random_published_checkpoint(tmp_path)
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["MiniAlbertModel"]
    assert "projector.weight" in load_file(directory / "model.safetensors")


def test_num_labels_stated_without_id2label(tiny_original_config, randomize, batch, tmp_path):
    """A config.json that gives num_labels (and no id2label) keeps its label count, as in transformers."""
    original = randomize(OriginalMiniAlbertForSequenceClassification(tiny_original_config(num_labels=3))).eval()
    directory = save_original_checkpoint(original, tmp_path)
    config_dict = json.loads((directory / "config.json").read_text())
    config_dict.pop("id2label"), config_dict.pop("label2id")
    (directory / "config.json").write_text(json.dumps({**config_dict, "num_labels": 3}))
    model = FastMiniForSequenceClassification.from_pretrained(directory)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    with torch.no_grad():
        expected, _, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        assert_close_relative(model(**batch).logits, expected, "logits")


def test_config_from_pretrained_converts_an_original_directory(tiny_original_config, randomize, batch, tmp_path):
    """FastMiniConfig.from_pretrained(<MiniALBERT dir>) is the config the model classes build from it,
    so it can be edited and passed back as config=."""
    from fastmini import FastMiniConfig

    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config())).eval()
    directory = save_original_checkpoint(original, tmp_path)
    config = FastMiniConfig.from_pretrained(directory)
    built = FastMiniForMaskedLM.from_pretrained(directory).config
    assert (config.head_variant, config.use_adapter, config.reduction_factor) == ("minialbert", True, 4)

    def fields(config):  # what loading sets on top: where it came from, the weights' dtype
        return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype")}

    assert fields(config) == fields(built)
    assert fields(FastMiniConfig.from_dict(json.loads((directory / "config.json").read_text()))) == fields(built)

    config.num_labels = 3
    classifier = FastMiniForSequenceClassification.from_pretrained(directory, config=config)
    assert classifier.classifier.out_features == 3
    with torch.no_grad():
        _, hidden_states, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        encoded = classifier.fastmini(**batch, output_hidden_states=True).hidden_states[-1]
    real = batch["attention_mask"].bool()
    assert_close_relative(encoded[real], hidden_states[-1][real], "encoder output")


def test_the_random_weights_leave_per_token_signal(tiny_original_config, randomize, batch, tmp_path):
    """Parity at RTOL means something only if a broken model misses it by far: the random weights
    must keep the tokens apart through every recursion (conftest's _randomize)."""
    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config())).eval()
    directory = save_original_checkpoint(original, tmp_path)
    with torch.no_grad():
        logits, hidden_states, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    last = hidden_states[-1][real]
    assert (last - last[:1]).abs().max() > 0.1 * last.abs().max(), "every token ends up alike"
    for mutate in ("token_type_embeddings", "word_embeddings"):
        model = FastMiniForMaskedLM.from_pretrained(directory)
        with torch.no_grad():
            getattr(model.fastmini.embeddings, mutate).weight.zero_()
            error = (model(**batch).logits[real] - logits[real]).abs().max() / logits[real].abs().max()
        assert error > 1000 * RTOL, f"zeroing {mutate} changes the logits by only {error:.1e}"


def test_hub_model_names_resolve_through_the_hub_client(tiny_original_config, randomize, batch, tmp_path, monkeypatch):
    """`nlpie/miniALBERT-128`-style names go through huggingface_hub (served here from a local folder)."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config())).eval()
    hub = save_original_checkpoint(original, tmp_path / "hub" / "nlpie" / "miniALBERT-tiny", "bin")
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        source = tmp_path / "hub" / repo_id / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        target = tmp_path / "cache" / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(source, target))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = FastMiniForMaskedLM.from_pretrained("nlpie/miniALBERT-tiny", revision="main")
    assert requested == [
        ("nlpie/miniALBERT-tiny", "config.json"),
        ("nlpie/miniALBERT-tiny", "model.safetensors"),
        ("nlpie/miniALBERT-tiny", "model.safetensors.index.json"),  # a sharded safetensors checkpoint
        ("nlpie/miniALBERT-tiny", "pytorch_model.bin"),
    ]
    with torch.no_grad():
        logits, _, _ = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        real = batch["attention_mask"].bool()
        assert_close_relative(model(**batch).logits[real], logits[real], "logits")
    assert hub.is_dir()


def test_original_checkpoint_parity_through_the_triton_kernels(
    tiny_original_config, randomize, batch, tmp_path, monkeypatch, triton_launches
):
    """The whole model through the fused kernels (interpreter on CPU) still gives the original's outputs."""
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    original = randomize(OriginalMiniAlbertForMaskedLM(tiny_original_config(hidden_act="gelu_new"))).eval()
    model = FastMiniForMaskedLM.from_pretrained(save_original_checkpoint(original, tmp_path))
    with torch.no_grad():
        expected = original(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ours = model(**batch, output_hidden_states=True, output_attentions=True)
    # every fused op ran as a kernel: per recursion one Linear+GELU and two adapters, the attention's
    # add-and-norm folded into the FFN adapter's launch (ops.add_layer_norm_adapter), the FFN's own (its
    # output is a hidden state asked for); and the MLM head's transform one Linear+GELU
    n = model.config.num_hidden_layers
    assert model.config.use_adapter
    assert triton_launches == {"add_layer_norm": n, "linear_gelu": n + 1, "adapter_bottleneck": 2 * n}
    assert_matches_original(expected, ours, batch["attention_mask"])
    # no hidden states asked for: the FFN's add-and-norm folds into the next recursion's attention adapter too,
    # all but the last one's
    triton_launches.update(dict.fromkeys(triton_launches, 0))
    with torch.no_grad():
        logits = model(**batch).logits
    assert triton_launches == {"add_layer_norm": 1, "linear_gelu": n + 1, "adapter_bottleneck": 2 * n}
    torch.testing.assert_close(logits, ours.logits, atol=1e-5, rtol=1e-5)


def test_the_original_config_of_a_fastmini_config_keeps_every_shared_field(tiny_config):
    from fastmini.baselines.original import SHARED_CONFIG_FIELDS, original_config_like

    config = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.05, layer_norm_eps=1e-6)
    original = original_config_like(config)
    assert {name: getattr(original, name) for name in SHARED_CONFIG_FIELDS} == {
        name: getattr(config, name) for name in SHARED_CONFIG_FIELDS
    }
    assert original.hidden_dropout_prob == 0.1  # not AlbertConfig's default 0.0
    assert original_config_like(config, hidden_dropout_prob=0.0).hidden_dropout_prob == 0.0
