"""FastMiniConfig: the MiniALBERT architecture (and plain ALBERT's) as a transformers config.

Symbols as in SPEC.md: V vocab_size, E embedding_size, H hidden_size, A num_attention_heads,
I intermediate_size, N num_hidden_layers (the number of recursions of the one shared layer),
r reduction_factor (adapter width H/r). Every constant the model uses lives here.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The original MiniALBERT hard-codes this eps for its adapters' and its MLM head's LayerNorms.
MINIALBERT_FIXED_LAYER_NORM_EPS = 1e-12

# config.hidden_act -> the ``approximate`` argument of torch's GELU. transformers' "gelu_python" is
# the same erf formula written out, "gelu_fast" the tanh one with sqrt(2/pi) rounded to 10 digits
# (1e-12 apart in float64): the same functions, so checkpoints that name them load too.
GELU_APPROXIMATION_BY_ACT = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}

# "minialbert": the original MiniALBERT heads (MLM head H->H, exact GELU, LayerNorm eps 1e-12,
#   untied H->V decoder; sequence classification on the first token, no pooler).
# "albert": transformers' ALBERT heads (MLM head H->E, hidden_act, LayerNorm eps
#   layer_norm_eps, decoder tied to the word embeddings; sequence classification on a tanh pooler).
HEAD_VARIANTS = ("minialbert", "albert")


class FastMiniConfig(PretrainedConfig):
    r"""Configuration of a fastmini (MiniALBERT) model.

    Args:
        vocab_size: V, rows of the word embeddings (equal to the teacher's).
        embedding_size: E, width of the factorised embeddings.
        hidden_size: H, width of the shared layer (equal to the teacher's).
        num_hidden_layers: N, how many times the shared layer is applied (recursions).
        num_attention_heads: A; H must be divisible by A.
        intermediate_size: I, width of the FFN.
        hidden_act: "gelu" or "gelu_python" (exact erf GELU), "gelu_new", "gelu_pytorch_tanh" or
            "gelu_fast" (tanh approximation).
        use_adapter: give every recursion its own attention and FFN bottleneck adapters.
        reduction_factor: r; adapters are H -> H/r -> H, H must be divisible by r.
        use_embedding_projection: project E -> H after the embeddings; None means "when E != H"
            (MiniALBERT). ALBERT checkpoints always have the projection.
        head_variant: "minialbert" or "albert" (see HEAD_VARIANTS above).
        classifier_dropout: dropout before the task classifiers; None means hidden_dropout_prob.
        tie_word_embeddings: tie the MLM decoder to the word embeddings (albert heads only); None
            means "as the head variant does" (tied for "albert", as AlbertConfig; untied for "minialbert").
    """

    model_type = "fastmini"

    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    use_adapter: bool = True
    reduction_factor: int = 16
    adapter_layer_norm_eps: float = MINIALBERT_FIXED_LAYER_NORM_EPS
    use_embedding_projection: bool | None = None
    head_variant: str = "minialbert"
    classifier_dropout: float | int | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = self.head_variant == "albert"
        super().__post_init__(**kwargs)
        if self.use_embedding_projection is None:
            self.use_embedding_projection = self.embedding_size != self.hidden_size
        check_config(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reader, with an original MiniALBERT or ALBERT config.json converted (so that
        ``FastMiniConfig.from_pretrained(directory)`` is the config the model classes build from it)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return _as_fastmini_dict(config_dict, str(pretrained_model_name_or_path)), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> FastMiniConfig:
        """As transformers' ``from_dict``; the content of an original MiniALBERT or ALBERT config.json
        is converted first, as the model classes' ``from_pretrained`` converts it."""
        return super().from_dict(_as_fastmini_dict(config_dict, "config dict"), **kwargs)

    @property
    def num_recursions(self) -> int:
        """N: the shared layer is applied this many times (stored as ``num_hidden_layers``)."""
        return self.num_hidden_layers

    @property
    def adapter_size(self) -> int:
        return self.hidden_size // self.reduction_factor

    @property
    def gelu_approximation(self) -> str:
        return GELU_APPROXIMATION_BY_ACT[self.hidden_act]

    @property
    def effective_classifier_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_teacher(
        cls,
        teacher_config: PretrainedConfig,
        num_recursions: int | None = None,
        embedding_size: int | None = None,
        use_adapter: bool | None = None,
        reduction_factor: int | None = None,
        **overrides: Any,
    ) -> FastMiniConfig:
        """A student config whose H, A, I, V, positions and token types match ``teacher_config``.

        The distillation losses compare hidden states and attention maps, so hidden size and
        heads must equal the teacher's; the vocabulary must match for the output KL. The student's
        own shape (N recursions, E, adapters, r) is the class's default unless given.
        """
        own = {
            "num_hidden_layers": cls.num_hidden_layers if num_recursions is None else num_recursions,
            "embedding_size": cls.embedding_size if embedding_size is None else embedding_size,
            "use_adapter": cls.use_adapter if use_adapter is None else use_adapter,
            "reduction_factor": cls.reduction_factor if reduction_factor is None else reduction_factor,
        }
        inherited = {
            name: getattr(teacher_config, name)
            for name in (
                "vocab_size",
                "hidden_size",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "max_position_embeddings",
                "type_vocab_size",
                "layer_norm_eps",
                "pad_token_id",
            )
            if getattr(teacher_config, name, None) is not None
        }
        if inherited.get("hidden_act") not in GELU_APPROXIMATION_BY_ACT:
            inherited["hidden_act"] = "gelu"
        return cls(**{**inherited, **own, **overrides})


def _as_fastmini_dict(config_dict: dict[str, Any], source: str) -> dict[str, Any]:
    """A config dict in fastmini's fields: one whose model_type is another ("albert") goes through
    conversion.py, the converter the model classes' ``from_pretrained`` uses; anything else as it is."""
    if config_dict.get("model_type", FastMiniConfig.model_type) == FastMiniConfig.model_type:
        return config_dict
    # conversion.py imports this module, so it can only be imported here.
    from fastmini.models.conversion import config_from_original, detect_format

    return config_from_original(config_dict, detect_format(config_dict, source), source).to_dict()


def check_config(config: FastMiniConfig) -> None:
    """Raise one ValueError naming the first inconsistent field."""
    for name in (
        "vocab_size",
        "embedding_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "reduction_factor",
        "max_position_embeddings",
        "type_vocab_size",
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"FastMiniConfig: {name} must be a positive integer, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"FastMiniConfig: hidden_size ({config.hidden_size}) must be divisible by "
            f"num_attention_heads ({config.num_attention_heads})"
        )
    if config.use_adapter and config.hidden_size % config.reduction_factor:
        raise ValueError(
            f"FastMiniConfig: hidden_size ({config.hidden_size}) must be divisible by "
            f"reduction_factor ({config.reduction_factor}) when use_adapter is on"
        )
    if config.hidden_act not in GELU_APPROXIMATION_BY_ACT:
        raise ValueError(
            f"FastMiniConfig: hidden_act '{config.hidden_act}' is not supported; "
            f"expected one of {sorted(GELU_APPROXIMATION_BY_ACT)}"
        )
    if config.head_variant not in HEAD_VARIANTS:
        raise ValueError(f"FastMiniConfig: head_variant must be one of {HEAD_VARIANTS}, got '{config.head_variant}'")
    if not config.use_embedding_projection and config.embedding_size != config.hidden_size:
        raise ValueError(
            f"FastMiniConfig: use_embedding_projection=False needs embedding_size == hidden_size, "
            f"got {config.embedding_size} and {config.hidden_size}"
        )
    if config.tie_word_embeddings and config.head_variant != "albert":
        raise ValueError("FastMiniConfig: tie_word_embeddings is only possible with head_variant='albert'")
    # The word embeddings' padding_idx: torch takes -vocab_size..vocab_size-1 (negative counts from the end).
    if config.pad_token_id is not None and not -config.vocab_size <= config.pad_token_id < config.vocab_size:
        raise ValueError(
            f"FastMiniConfig: pad_token_id must be a token id below vocab_size ({config.vocab_size}) or None, "
            f"got {config.pad_token_id!r}"
        )
    for name in ("layer_norm_eps", "adapter_layer_norm_eps"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"FastMiniConfig: {name} must be a number >= 0, got {value!r}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        value = getattr(config, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"FastMiniConfig: {name} must be in [0, 1), got {value!r}")
