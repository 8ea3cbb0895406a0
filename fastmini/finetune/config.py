"""Every knob of the fine-tuner in one dataclass: defaults, --help text, validation, task recipes.

Precedence: these defaults < the task's recipe (GLUE: columns, batch size and epochs; ner:
SPEC.md's NER recipe) < (with ``--resume``) the job's own options < a YAML/JSON file given with ``--config`` < the
command line. With no
dataset, ``python -m fastmini.finetune`` is the offline demo: gensim's 200 movie-review
sentences (fixed 160 / 40 split), full fine-tuning and adapter tuning side by side, SPEC.md's
learning-rate grid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmini.data.ner import ALIGNMENTS
from fastmini.distill.config import OPTIONS as DISTILL_OPTIONS
from fastmini.finetune.tasks import GENERIC_TASKS, GLUE_TASKS, TASKS
from fastmini.training.checkpoints import RUNS_DIR
from fastmini.training.errors import UsageError
from fastmini.training.optimization import SCHEDULES
from fastmini.training.options import (
    Options,
    check_resume_or_overwrite,
    check_seeds,
    device_option,
    gradient_checkpointing_option,
    option,
    optional_int,
    optional_str,
    threads_option,
)
from fastmini.training.precision import PRECISIONS

# What `make demo`'s distillation writes: the distiller's own default --output-dir.
DEFAULT_MODEL = DISTILL_OPTIONS.default_of("output_dir")
# The embedded default's grid: SPEC.md's three learning rates x two seeds (so that a mean and a std
# exist) x both modes, 3 epochs instead of 5 so that the 12 runs fit in about two minutes on 2 CPU cores.
EMBEDDED_RECIPE = {"seed": [1, 2], "epochs": 3}

GROUPS = {
    "run": "run",
    "model": "model",
    "data": "task and data",
    "recipe": "recipe (optimiser, schedule, grid)",
}


# The original cut examples at its tokenizer's 512 (GLUE: truncation=True without max_length; NER: max_length=512).
# fastmini computes no padding and batches by length, so the few long examples cost only their own tokens.
DEFAULT_MAX_LENGTH = 512
MIN_MAX_LENGTH = 8  # [CLS] and [SEP] leave a few tokens of text at least


@dataclass
class FinetuneConfig:
    # run
    output_dir: str = option(
        "outputs/finetune",
        "directory for the best model, metrics.json, predictions and the runs (both modes: one model each in "
        "DIR/full and DIR/adapter)",
        "run",
        metavar="DIR",
    )
    overwrite_output_dir: bool = option(
        False,
        "start afresh in an output directory that holds an unfinished earlier run, or replace outputs that another "
        "trainer or a person left there (never the --model, --tokenizer or --data directory itself)",
        "run",
    )
    resume: bool = option(
        False,
        "continue the interrupted run in OUTPUT_DIR: finished grid runs are kept, the interrupted one continues "
        "from its latest checkpoint (with none yet, a fresh run starts); the job's options are the defaults",
        "run",
    )
    seed: list[int] = option(
        [42],
        "one or more seeds (head initialisation, data order, dropout); every learning rate runs with every seed "
        "(default: 42; the embedded default: 1 2)",
        "run",
        parse=int,
        nargs="+",
    )
    epochs: int = option(
        5,
        "passes over the training set per run (GLUE's large tasks and the embedded default: 3); each pass is "
        "reshuffled and takes only whole batches, leaving out the examples of its order left over after the last "
        "whole batch",
        "run",
        parse=int,
    )
    early_stopping: int = option(
        0, "stop a run after N epochs without a better dev metric (0: never)", "run", parse=int, metavar="N"
    )
    save_every: int = option(
        0, "also write a checkpoint every N optimizer steps (one is always written after each epoch)", "run", parse=int
    )
    log_every: int = option(10, "append the loss to the run's log.jsonl every N steps", "run", parse=int)
    device: str = device_option()
    precision: str = option(
        "auto", "'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32' or 'bf16'", "run", choices=PRECISIONS
    )
    threads: int | None = threads_option()
    gradient_checkpointing: bool = gradient_checkpointing_option()
    progress: bool = option(True, "show progress bars", "run")

    # model
    model: str = option(
        DEFAULT_MODEL,
        "the model to fine-tune: a fastmini, original MiniALBERT or ALBERT checkpoint (directory or hub name); "
        f"the default '{DEFAULT_MODEL}' is what `make demo` distils, and a fresh student (MiniLM-sized, "
        "random weights) when that directory holds no finished model (missing, or only an interrupted run's "
        "checkpoints/)",
        "model",
        metavar="DIR_OR_NAME",
    )
    tokenizer: str | None = option(
        None, "tokenizer directory or hub name (default: the model's)", "model", parse=optional_str, metavar="DIR"
    )
    adapter_tuning: bool | None = option(
        None,
        "train only the adapters and the task head (SPEC.md's adapter tuning; a model without adapters gets fresh "
        "ones); --no-adapter-tuning: full fine-tuning (default: full fine-tuning; the embedded default runs both)",
        "model",
    )
    max_length: int | None = option(
        None,
        "tokens per example, special tokens included; longer ones are cut (default: "
        f"{DEFAULT_MAX_LENGTH}, or the model's positions when fewer)",
        "model",
        parse=optional_int,
    )
    label_subtokens: str = option(
        "all",
        "NER: 'all' gives every sub-token its word's label (the MiniALBERT recipe: a B-X word's pieces are all "
        "B-X), 'inside' the same but I-X for a B-X word's later pieces (transformers' run_ner), 'first' only the "
        "first sub-token (the others get -100)",
        "model",
        choices=ALIGNMENTS,
    )

    # task and data
    task: str = option(
        "classification",
        f"a GLUE task ({', '.join(GLUE_TASKS)}) or, for local data, one of {', '.join(GENERIC_TASKS)}",
        "data",
        metavar="NAME",
    )
    data: str | None = option(
        None,
        "a directory holding train.* and validation.*, dev.* or valid.* (and optionally test.*, whose labels may be "
        "left out: test metrics cover its labelled rows, with a warning when only some have one) files: "
        "csv/tsv/json/jsonl with named columns; for --task ner, two-column files (token TAB tag) or parquet/json/jsonl "
        "rows with a list of words and a list of tags; or a datasets name (its validation, dev or valid split; test if "
        "any; ner: e.g. conll2003) (default: a GLUE task's own dataset; for --task classification, the 200 movie-review"
        " sentences that gensim ships; other tasks need --data)",
        "data",
        parse=optional_str,
        metavar="PATH",
    )
    data_config: str | None = option(None, "config of a datasets name", "data", parse=optional_str, metavar="NAME")
    text_column: str = option(
        "text",
        "column holding the text (GLUE: the task's own; --task ner: each row's list of words, by default 'tokens')",
        "data",
        metavar="NAME",
    )
    text_pair_column: str | None = option(
        None,
        "column holding the second text of a sentence pair (GLUE: the task's own)",
        "data",
        parse=optional_str,
        metavar="NAME",
    )
    label_column: str = option(
        "label",
        "column holding the label (--task ner: each row's list of tags, names such as B-PER or the integers of a "
        "Sequence(ClassLabel), by default 'ner_tags')",
        "data",
        metavar="NAME",
    )
    label_separator: str = option(
        ",", "multilabel: the separator of label names in a text cell (JSON lists need none)", "data", metavar="SEP"
    )
    max_train_examples: int | None = option(None, "use only the first N training examples", "data", parse=optional_int)
    max_eval_examples: int | None = option(
        None, "use only the first N examples of each validation and test split", "data", parse=optional_int
    )
    cache_dir: str | None = option(
        None, "datasets cache directory (default: datasets' own)", "data", parse=optional_str, metavar="DIR"
    )

    # recipe
    lr: list[float] = option(
        [5e-5, 5e-4, 1e-3],
        "peak learning rate(s) of AdamW; with several, each is tried and the best by dev metric (mean over "
        "seeds) is kept (default: SPEC.md's grid 5e-05 0.0005 0.001; ner: 5e-05)",
        "recipe",
        parse=float,
        nargs="+",
    )
    schedule: str = option("linear", "learning-rate decay after warmup (ner: cosine)", "recipe", choices=SCHEDULES)
    warmup_ratio: float = option(0.0, "share of the optimizer steps spent warming up linearly", "recipe", parse=float)
    weight_decay: float = option(
        0.01, "AdamW weight decay (not on biases and LayerNorm weights)", "recipe", parse=float
    )
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", "recipe", parse=float)
    batch_size: int = option(
        16,
        "examples per optimizer step over all processes (GLUE's large tasks: 32); split into processes x "
        "--grad-accumulation micro-batches, with the same losses however it is split",
        "recipe",
        parse=int,
    )
    grad_accumulation: int = option(
        1,
        "micro-batches per process per optimizer step; with the process count, only how --batch-size is split "
        "(the losses are those of the whole batch)",
        "recipe",
        parse=int,
    )
    eval_batch_size: int = option(64, "examples per evaluation batch", "recipe", parse=int)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def embedded_default(self) -> bool:
        return self.data is None and not TASKS[self.task].is_glue


def finetuning_max_length(max_length: int | None, positions: int) -> int:
    """The tokens per example a job uses: --max-length, else DEFAULT_MAX_LENGTH cut to the model's ``positions``.
    The fine-tuned model records it, and fastmini.predict uses it by default."""
    return max_length or min(DEFAULT_MAX_LENGTH, positions)


def check_max_length(max_length: int | None, positions: int | None = None) -> None:
    """One UsageError for a --max-length that is too short for text, or (``positions`` given) longer than the
    model's position embeddings; None (the default) passes. fastmini.predict checks its own the same way."""
    if max_length is None:
        return
    if max_length < MIN_MAX_LENGTH:
        raise UsageError(f"--max-length must be at least {MIN_MAX_LENGTH} tokens, got {max_length}")
    if positions is not None and max_length > positions:
        raise UsageError(f"--max-length {max_length} exceeds the model's {positions} positions")


GRID_NAME = "grid.json"  # <output>/runs/grid.json: the options the job started with, which --resume checks
JOB_ID_NAME = "job_id"  # <output>/runs/job_id: a token of the job, which its metrics.json repeats once it finished

# Fields that do not change what a run computes: a resumed run may change them.
RUN_ONLY_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume",
        "save_every",
        "log_every",
        "progress",
        "threads",
        "gradient_checkpointing",
        "cache_dir",
        "eval_batch_size",
        "device",
    }
)
# Options that name files or directories: on resume, the same one given by another path is no change.
PATH_FIELDS = frozenset({"model", "data", "tokenizer"})

OPTIONS = Options(
    FinetuneConfig,
    prog="python -m fastmini.finetune",
    usage="python -m fastmini.finetune [--task NAME] [--data PATH] [--model DIR] [options]",
    description=(
        "Fine-tune a fastmini / MiniALBERT model for sequence classification (single sentences or pairs), "
        "regression, multi-label classification or BIO tagging (NER), by full fine-tuning or adapter tuning, over "
        "a learning-rate grid and several seeds, choosing by dev metric. With no options: an offline demo on CPU "
        "(gensim's movie-review sentences, both modes). Runs under torchrun for several processes (DDP)."
    ),
    epilog=(
        "Precedence: defaults < the task's recipe < with --resume, the job's options < --config (a YAML/JSON file "
        "of these options, underscores or dashes) < command-line options. OUTPUT_DIR holds the best model "
        "(loadable with from_pretrained and the Auto classes after `import fastmini`), metrics.json, "
        "predictions_*.jsonl and train_config.json, or, when both modes run (the default with no options), one "
        "model with its predictions in each of OUTPUT_DIR/full and OUTPUT_DIR/adapter beside the job's metrics.json; "
        "`python -m fastmini.predict --model MODEL_DIR` labels new text with one of them."
    ),
    groups=GROUPS,
)
FIELDS = OPTIONS.fields
flag_of = OPTIONS.flag_of


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a resumed job was asked to change that it may not ("--flag old -> new" each)."""
    return OPTIONS.changed(saved, current, RUN_ONLY_FIELDS, PATH_FIELDS)


build_parser = OPTIONS.build_parser


def presets(given: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on the task (its recipe) and on whether this is the embedded default; with --resume,
    the resumed job's own options (runs/grid.json) over those."""
    saved = {}
    if given.get("resume"):
        output_dir = given.get("output_dir", OPTIONS.default_of("output_dir"))
        saved = OPTIONS.saved_options(Path(output_dir).expanduser() / RUNS_DIR / GRID_NAME)
    task = given.get("task", saved.get("task", OPTIONS.default_of("task")))
    if task not in TASKS:
        return saved  # validate() names the unknown task
    values = dict(TASKS[task].recipe)
    if given.get("data", saved.get("data")) is None and not TASKS[task].is_glue:
        values.update(EMBEDDED_RECIPE)
    return {**values, **saved}


def resolve(argv: list[str] | None = None) -> tuple[FinetuneConfig, bool]:
    """(config, print_config) from defaults, the task's recipe, --config and the command line; exits on --help."""
    return OPTIONS.resolve(argv, validate, presets)


def validate(config: FinetuneConfig) -> None:
    """One UsageError naming the first nonsensical option."""
    if config.task not in TASKS:
        raise UsageError(
            f"--task {config.task}: unknown task; expected a GLUE task ({', '.join(GLUE_TASKS)}) or one of "
            f"{', '.join(GENERIC_TASKS)} for local data"
        )
    for name in (
        "epochs",
        "batch_size",
        "grad_accumulation",
        "eval_batch_size",
        "log_every",
        "max_length",
        "max_train_examples",
        "max_eval_examples",
        "threads",
    ):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UsageError(f"{flag_of(name)} must be > 0, got {value}")
    for name in ("save_every", "early_stopping", "weight_decay", "max_grad_norm"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag_of(name)} must be >= 0, got {value}")
    for value in config.lr:
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"--lr must be positive numbers, got {value}")
    check_seeds(*config.seed)
    if len(set(config.lr)) != len(config.lr) or len(set(config.seed)) != len(config.seed):
        raise UsageError("--lr and --seed must not repeat a value")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    check_max_length(config.max_length)
    if not config.output_dir:
        raise UsageError("--output-dir must not be empty")
    check_resume_or_overwrite(config.resume, config.overwrite_output_dir)
    if not config.label_separator:
        raise UsageError("--label-separator must not be empty")
    if config.text_pair_column is not None and config.text_pair_column == config.text_column:
        raise UsageError(f"--text-pair-column must differ from --text-column ('{config.text_column}')")
    if config.label_column == config.text_column:
        raise UsageError(f"--label-column must differ from --text-column ('{config.text_column}')")
    if config.text_pair_column is not None and TASKS[config.task].kind == "ner":
        raise UsageError("--text-pair-column: --task ner reads one list of words per row, not pairs")
