"""AdamW parameter groups (transformers Trainer's): weight decay on weight matrices and embeddings,
none on biases and LayerNorm parameters, for the distiller's and the fine-tuner's models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmini import FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniForTokenClassification
from fastmini.distill.distiller import StudentSide
from fastmini.training.optimization import build_adamw, decay_parameter_names

WEIGHT_DECAY = 0.01


def expected_groups(module: nn.Module) -> tuple[set[str], set[str]]:
    """(decay, no decay) by an independent rule: a LayerNorm's parameters and every bias are not decayed;
    everything else must be a matrix (Linear weight or embedding table) and is decayed."""
    layer_norm_parameters = {
        f"{name}.{parameter_name}"
        for name, child in module.named_modules()
        if isinstance(child, nn.LayerNorm)
        for parameter_name, _ in child.named_parameters(recurse=False)
    }
    decay, no_decay = set(), set()
    for name, parameter in module.named_parameters():
        if name in layer_norm_parameters or name.endswith(".bias"):
            no_decay.add(name)
        else:
            assert parameter.dim() == 2, f"{name}: a parameter that is neither a bias, a LayerNorm's nor a matrix"
            decay.add(name)
    return decay, no_decay


def optimizer_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[float, list[str]]:
    """Parameter names per weight-decay value, in the optimizer's order (duplicates kept, to be caught)."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    return {group["weight_decay"]: [names[id(p)] for p in group["params"]] for group in optimizer.param_groups}


def check_groups(module: nn.Module) -> tuple[set[str], set[str]]:
    optimizer = build_adamw(module, lr=1e-3, weight_decay=WEIGHT_DECAY)
    groups = optimizer_groups(module, optimizer)
    assert set(groups) == {WEIGHT_DECAY, 0.0} and len(optimizer.param_groups) == 2
    decayed, not_decayed = groups[WEIGHT_DECAY], groups[0.0]
    assert len(decayed) == len(set(decayed)) and len(not_decayed) == len(set(not_decayed))  # no duplicates
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert set(decayed) | set(not_decayed) == trainable and not set(decayed) & set(not_decayed)  # none missing
    decay, no_decay = expected_groups(module)
    assert set(decayed) == decay & trainable and set(not_decayed) == no_decay & trainable
    return set(decayed), set(not_decayed)


@pytest.mark.parametrize("head_variant", ["minialbert", "albert"])
def test_masked_lm_student_decays_matrices_and_embeddings_but_no_bias_or_layer_norm(tiny_config, head_variant):
    model = FastMiniForMaskedLM(tiny_config(head_variant=head_variant))
    decayed, not_decayed = check_groups(model)
    prefix = "fastmini.embeddings."
    assert {f"{prefix}word_embeddings.weight", f"{prefix}position_embeddings.weight",
            f"{prefix}token_type_embeddings.weight", "fastmini.projector.weight",
            "fastmini.encoder.shared_layer.query.weight", "fastmini.encoder.attention_adapters.0.down.weight",
            "fastmini.encoder.ffn_adapters.2.up.weight", "lm_head.transform.weight"} <= decayed  # fmt: skip
    layer_norms = {"fastmini.embeddings.norm", "fastmini.encoder.shared_layer.attention_norm",
                   "fastmini.encoder.shared_layer.ffn_norm", "lm_head.norm",
                   *(f"fastmini.encoder.{kind}_adapters.{i}.norm" for kind in ("attention", "ffn")
                     for i in range(3))}  # fmt: skip
    assert {f"{norm}.{p}" for norm in layer_norms for p in ("weight", "bias")} <= not_decayed
    assert {"fastmini.projector.bias", "fastmini.encoder.attention_adapters.1.up.bias"} <= not_decayed
    if head_variant == "albert":  # the decoder is the word embeddings: one parameter, in one group, decayed
        assert model.lm_head.decoder.weight is model.fastmini.embeddings.word_embeddings.weight
        assert "lm_head.decoder.weight" not in decayed | not_decayed
    else:
        assert "lm_head.decoder.weight" in decayed


def test_the_distillers_student_side_puts_the_hidden_projection_in_the_right_groups(tiny_config):
    side = StudentSide(FastMiniForMaskedLM(tiny_config()), nn.Linear(36, 48))
    decayed, not_decayed = check_groups(side)
    assert "projection.weight" in decayed and "projection.bias" in not_decayed
    assert "student.fastmini.embeddings.norm.weight" in not_decayed  # names carry the wrapper's prefix


@pytest.mark.parametrize("model_class", [FastMiniForSequenceClassification, FastMiniForTokenClassification])
def test_fine_tuning_models_and_frozen_parameters(tiny_config, model_class):
    model = model_class(tiny_config(num_labels=3))
    decayed, not_decayed = check_groups(model)
    assert "classifier.weight" in decayed and "classifier.bias" in not_decayed
    for name, parameter in model.named_parameters():  # adapter tuning: only adapters and the head train
        parameter.requires_grad = "_adapters." in name or name.startswith("classifier.")
    decayed, not_decayed = check_groups(model)
    assert decayed and not_decayed
    assert all("_adapters." in name or name.startswith("classifier.") for name in decayed | not_decayed)
    assert "fastmini.encoder.ffn_adapters.0.norm.weight" in not_decayed


def test_decay_parameter_names_excludes_layer_norms_by_module_not_by_name():
    """A LayerNorm called anything ("ln_f") is excluded; a Linear whose name says "norm" is not."""
    module = nn.Sequential()
    module.add_module("ln_f", nn.LayerNorm(4))
    module.add_module("norm_proj", nn.Linear(4, 4))
    assert decay_parameter_names([module]) == {"norm_proj.weight"}
