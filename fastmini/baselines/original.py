"""The original MiniALBERT (nlpie-research/MiniALBERT, minialbert_modeling.py), rebuilt on
transformers 5's ALBERT modules.

The original code no longer imports under transformers 5; this module re-composes its exact
forward pass (eager attention with an additive mask, attention maps always returned, adapters
around the shared layer's two halves) from ``AlbertModel``'s modules, with the original's
parameter names, so that its state dict *is* an original checkpoint. It is the oracle of the
parity tests and the "original-style" baseline of the benchmarks; fastmini never calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AlbertConfig, AlbertModel

from fastmini.models.conversion import ALBERT_FIELDS


class OriginalBottleneckAdapter(nn.Module):
    def __init__(self, dim: int, reduction_factor: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(dim, dim // reduction_factor), nn.GELU(), nn.Linear(dim // reduction_factor, dim)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block(inputs) + inputs)


def original_config(**fields) -> AlbertConfig:
    """An ALBERT config with the MiniALBERT extras (use_adapter, reduction_factor)."""
    use_adapter = fields.pop("use_adapter", True)
    reduction_factor = fields.pop("reduction_factor", 16)
    config = AlbertConfig(**fields)
    config.use_adapter = use_adapter
    config.reduction_factor = reduction_factor
    config._attn_implementation = "eager"
    return config


# The fields a fastmini config and the original's config share, by the same names and meanings: the ALBERT
# fields that conversion copies from an original checkpoint's config, and MiniALBERT's adapter extras.
SHARED_CONFIG_FIELDS = (*ALBERT_FIELDS, "use_adapter", "reduction_factor")


def original_config_like(config, **overrides) -> AlbertConfig:
    """The original's config for the same model as the fastmini ``config`` (dropout included:
    AlbertConfig's own default is 0.0, MiniALBERT's students train with 0.1)."""
    return original_config(**{**{name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}, **overrides})


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers 4.x ``get_extended_attention_mask``: (B, S) 0/1 -> additive (B, 1, 1, S)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class OriginalMiniAlbertModel(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.activation = nn.GELU()
        self.albert = AlbertModel(config)
        self.albert.encoder.embedding_hidden_mapping_in = None
        self.use_embedding_projection = config.embedding_size != config.hidden_size
        if self.use_embedding_projection:
            self.projector = nn.Linear(config.embedding_size, config.hidden_size)
        if config.use_adapter:
            make = lambda: nn.ModuleList(  # noqa: E731
                OriginalBottleneckAdapter(config.hidden_size, config.reduction_factor)
                for _ in range(config.num_hidden_layers)
            )
            self.att_adapters = make()
            self.mlp_adapters = make()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        layer = self.albert.encoder.albert_layer_groups[0].albert_layers[0]

        def mlp(x):
            return layer.full_layer_layer_norm(layer.dropout(layer.ffn_output(layer.activation(layer.ffn(x)))) + x)

        embeddings = self.albert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.use_embedding_projection:
            embeddings = self.projector(embeddings)
        mask = extended_attention_mask(attention_mask, embeddings.dtype)
        hidden_states, attention_maps = [embeddings], []
        output = embeddings
        for i in range(self.config.num_hidden_layers):
            x = self.att_adapters[i](output) if self.config.use_adapter else output
            x, attention_map = layer.attention(x, mask)
            x = self.mlp_adapters[i](x) if self.config.use_adapter else x
            output = mlp(x)
            hidden_states.append(output)
            attention_maps.append(attention_map)
        return output, tuple(hidden_states), tuple(attention_maps)


class OriginalMiniAlbertForMaskedLM(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.albert = OriginalMiniAlbertModel(config)
        self.vocab_transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.vocab_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.vocab_projector = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        output, hidden_states, attentions = self.albert(input_ids, attention_mask, token_type_ids)
        logits = self.vocab_projector(self.vocab_layer_norm(self.albert.activation(self.vocab_transform(output))))
        return logits, hidden_states, attentions


class OriginalMiniAlbertForSequenceClassification(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.albert = OriginalMiniAlbertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        output, hidden_states, attentions = self.albert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(output[:, 0, :])), hidden_states, attentions


class OriginalMiniAlbertForTokenClassification(OriginalMiniAlbertForSequenceClassification):
    def forward(self, input_ids, attention_mask, token_type_ids=None):
        output, hidden_states, attentions = self.albert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(output)), hidden_states, attentions


def save_original_checkpoint(model: nn.Module, directory: str | Path, weights_format: str = "safetensors") -> Path:
    """Write ``model`` as the original code's checkpoints look: ALBERT config.json + original keys.

    A bare OriginalMiniAlbertModel is saved as the original MiniAlbertModel saves itself: its own
    state dict ("albert.<AlbertModel>", "projector.*", "att_adapters.*", "mlp_adapters.*") under the
    architecture "MiniAlbertModel"; the head models nest it under "albert.".
    ``weights_format`` is "safetensors" (model.safetensors) or "bin" (pytorch_model.bin, with the
    int64 position_ids buffer that older files carry).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = model.config.to_dict()
    config_dict.update(
        model_type="albert",
        architectures=["MiniAlbert" + type(model).__name__.removeprefix("OriginalMiniAlbert")],
        use_adapter=model.config.use_adapter,
        reduction_factor=model.config.reduction_factor,
    )
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
    state_dict = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(directory / "model.safetensors"))
    elif weights_format == "bin":
        # The bare model holds AlbertModel as "albert."; the head models hold the bare model there.
        prefix = "albert." if isinstance(model, OriginalMiniAlbertModel) else "albert.albert."
        state_dict[prefix + "embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
        torch.save(state_dict, directory / "pytorch_model.bin")
    else:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got '{weights_format}'")
    return directory


# nlpie/miniALBERT-128 (SPEC.md): the published encoder that the benchmarks time.
PUBLISHED_MINIALBERT_128 = dict(
    vocab_size=30522,
    embedding_size=128,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    num_hidden_layers=6,
    reduction_factor=16,
    hidden_act="gelu",
    use_adapter=True,
)
PUBLISHED_MINIALBERT_128_SHAPE = "E=128 H=768 A=12 I=3072 N=6 r=16"


def random_published_checkpoint(directory: str | Path, seed: int = 0) -> tuple[OriginalMiniAlbertModel, Path]:
    """An original MiniAlbertModel at the published configuration with random weights (seeded),
    in eval mode, and the directory it was saved to as the original checkpoints are."""
    torch.manual_seed(seed)
    model = OriginalMiniAlbertModel(original_config(**PUBLISHED_MINIALBERT_128)).eval()
    return model, save_original_checkpoint(model, directory)
