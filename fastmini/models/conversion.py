"""Original MiniALBERT and plain ALBERT checkpoints -> fastmini config and parameter names.

Both are ALBERT configs (``model_type: "albert"``); MiniALBERT adds ``use_adapter``,
``reduction_factor`` and names ``MiniAlbert*`` architectures. Their state dicts are renamed
key by key with the tables below (SPEC.md lists the original names); a key that no table
knows is an error, never silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from fastmini.models.checkpoint import CheckpointError
from fastmini.models.configuration import FastMiniConfig

FASTMINI, MINIALBERT, ALBERT = "fastmini", "minialbert", "albert"
BASE_PREFIX = "fastmini."
DROP = None  # a rename target meaning "known, not used by fastmini"

# Inside the one shared ALBERT layer: albert_layer_groups.0.albert_layers.0.<name>
SHARED_LAYER_NAMES = {
    "attention.query.": "query.",
    "attention.key.": "key.",
    "attention.value.": "value.",
    "attention.dense.": "attention_output.",
    "attention.LayerNorm.": "attention_norm.",
    "ffn.": "ffn_intermediate.",
    "ffn_output.": "ffn_output.",
    "full_layer_layer_norm.": "ffn_norm.",
}
SHARED_LAYER_PREFIX = "encoder.albert_layer_groups.0.albert_layers.0."
ADAPTER_NAMES = {"block.0.": "down.", "block.2.": "up.", "norm.": "norm."}

# Fields copied from the ALBERT config (defaults filled by transformers' AlbertConfig).
ALBERT_FIELDS = (
    "vocab_size",
    "embedding_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "id2label",
    "label2id",
    "problem_type",
    # what the checkpoint's config asks its outputs to hold, as transformers' own loader keeps it
    "output_hidden_states",
    "output_attentions",
    "return_dict",
)


def detect_format(config_dict: dict[str, Any], source: str) -> str:
    """ "fastmini", "minialbert" or "albert" from a config.json's content."""
    model_type = config_dict.get("model_type")
    if model_type == FASTMINI:
        return FASTMINI
    if model_type == "albert":
        architectures = config_dict.get("architectures") or []
        if (
            "use_adapter" in config_dict
            or "reduction_factor" in config_dict
            or any(name.startswith("MiniAlbert") for name in architectures)
        ):
            return MINIALBERT
        return ALBERT
    raise CheckpointError(
        f"{source}: model_type '{model_type}' is not a fastmini, MiniALBERT or ALBERT checkpoint "
        "(expected model_type 'fastmini' or 'albert')"
    )


def _albert_config(config_dict: dict[str, Any], source: str):
    from transformers import AlbertConfig

    # num_labels and output_attentions are init arguments of every config but no dataclass fields: transformers
    # honours num_labels when id2label is absent (a 3-label checkpoint must not come back with the default 2
    # labels), and output_attentions is a property over a private field.
    known = {
        key: value
        for key, value in config_dict.items()
        if key in AlbertConfig.__dataclass_fields__ or key in ("num_labels", "output_attentions")
    }
    try:
        albert = AlbertConfig(**known)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: not a valid ALBERT config ({error})") from error
    if albert.num_hidden_groups != 1 or albert.inner_group_num != 1:
        raise CheckpointError(
            f"{source}: ALBERT with num_hidden_groups={albert.num_hidden_groups} and "
            f"inner_group_num={albert.inner_group_num} is not supported; fastmini runs one shared layer "
            "(num_hidden_groups=1, inner_group_num=1)"
        )
    return albert


def config_from_original(config_dict: dict[str, Any], checkpoint_format: str, source: str) -> FastMiniConfig:
    """The FastMiniConfig equivalent of an original MiniALBERT or ALBERT config.json."""
    albert = _albert_config(config_dict, source)
    fields = {name: getattr(albert, name) for name in ALBERT_FIELDS}
    if fields["id2label"] is None:
        fields.pop("id2label")
        fields.pop("label2id")
    if checkpoint_format == MINIALBERT:
        fields.update(
            use_adapter=bool(config_dict.get("use_adapter", False)),
            reduction_factor=int(config_dict.get("reduction_factor", 16)),
            classifier_dropout=config_dict.get("classifier_dropout"),
            head_variant="minialbert",
            use_embedding_projection=albert.embedding_size != albert.hidden_size,
            tie_word_embeddings=False,
        )
    else:
        fields.update(
            use_adapter=False,
            head_variant="albert",
            use_embedding_projection=True,
            classifier_dropout=albert.classifier_dropout_prob,
            tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", True)),
        )
    try:
        return FastMiniConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error


def _albert_prefix(state_dict: dict[str, torch.Tensor], source: str) -> str:
    """The prefix of transformers' AlbertModel inside a checkpoint ("albert.albert.", "albert.", "")."""
    suffix = "embeddings.word_embeddings.weight"
    prefixes = [key[: -len(suffix)] for key in state_dict if key.endswith(suffix)]
    if len(prefixes) != 1:
        raise CheckpointError(f"{source}: expected exactly one '*{suffix}' key, found {len(prefixes)}")
    return prefixes[0]


def _minialbert_rules(albert: str) -> list[tuple[str, str | None]]:
    wrapper = albert[: -len("albert.")] if albert.endswith("albert.") else ""
    rules: list[tuple[str, str | None]] = [
        (albert + "embeddings.position_ids", DROP),
        (albert + "embeddings.token_type_ids", DROP),
        (albert + "embeddings.LayerNorm.", BASE_PREFIX + "embeddings.norm."),
        (albert + "embeddings.", BASE_PREFIX + "embeddings."),
        (albert + "pooler.", DROP),
        (wrapper + "projector.", BASE_PREFIX + "projector."),
        ("vocab_transform.", "lm_head.transform."),
        ("vocab_layer_norm.", "lm_head.norm."),
        ("vocab_projector.", "lm_head.decoder."),
        ("classifier.", "classifier."),
    ]
    for original, ours in (("att_adapters.", "attention_adapters."), ("mlp_adapters.", "ffn_adapters.")):
        rules.append((wrapper + original, BASE_PREFIX + "encoder." + ours))
    rules += [
        (albert + SHARED_LAYER_PREFIX + k, BASE_PREFIX + "encoder.shared_layer." + v)
        for k, v in SHARED_LAYER_NAMES.items()
    ]
    return rules


def _albert_rules(albert: str) -> list[tuple[str, str | None]]:
    rules: list[tuple[str, str | None]] = [
        (albert + "embeddings.position_ids", DROP),
        (albert + "embeddings.token_type_ids", DROP),
        (albert + "embeddings.LayerNorm.", BASE_PREFIX + "embeddings.norm."),
        (albert + "embeddings.", BASE_PREFIX + "embeddings."),
        (albert + "encoder.embedding_hidden_mapping_in.", BASE_PREFIX + "projector."),
        (albert + "pooler.", BASE_PREFIX + "pooler."),
        ("predictions.dense.", "lm_head.transform."),
        ("predictions.LayerNorm.", "lm_head.norm."),
        ("predictions.decoder.", "lm_head.decoder."),
        ("predictions.bias", "lm_head.decoder.bias"),
        ("sop_classifier.", DROP),
        ("qa_outputs.", DROP),  # AlbertForQuestionAnswering's span head: fastmini has no QA class
        ("classifier.", "classifier."),
    ]
    rules += [
        (albert + SHARED_LAYER_PREFIX + k, BASE_PREFIX + "encoder.shared_layer." + v)
        for k, v in SHARED_LAYER_NAMES.items()
    ]
    return rules


def _rename_adapter(key: str) -> str:
    """fastmini.encoder.<kind>_adapters.<i>.block.0.weight -> fastmini.encoder.<kind>_adapters.<i>.down.weight"""
    parts = key.split(".")
    owner, rest = ".".join(parts[:4]), ".".join(parts[4:])
    for original, ours in ADAPTER_NAMES.items():
        if rest.startswith(original):
            return f"{owner}.{ours}{rest[len(original) :]}"
    raise KeyError(key)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], checkpoint_format: str, source: str
) -> dict[str, torch.Tensor]:
    """Rename an original MiniALBERT / ALBERT state dict to fastmini's parameter names."""
    albert = _albert_prefix(state_dict, source)
    rules = _minialbert_rules(albert) if checkpoint_format == MINIALBERT else _albert_rules(albert)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        target = next(((prefix, ours) for prefix, ours in rules if key.startswith(prefix)), None)
        if target is None:
            raise CheckpointError(f"{source}: unexpected key '{key}': not part of a {checkpoint_format} checkpoint")
        prefix, ours = target
        if ours is DROP:
            continue
        new_key = ours + key[len(prefix) :]
        if "_adapters." in ours:
            try:
                new_key = _rename_adapter(new_key)
            except KeyError:
                raise CheckpointError(f"{source}: unexpected adapter key '{key}'") from None
        converted[new_key] = tensor
    return converted
