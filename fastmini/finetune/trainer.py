"""The fine-tuning job: data, the grid of (mode, learning rate, seed) runs (each one a ``GridRun``, grid_run.py;
the choice among them, selection.py), resume, outputs.

Output directory layout (``--output-dir``), one mode:
  config.json, model.safetensors, tokenizer files   the chosen run's best epoch (from_pretrained, Auto classes)
  adapters/                                         adapter tuning: only the adapters and the head (save_adapters)
  predictions_<split>.jsonl                         that model on every validation and test split
  metrics.json                                      every run's dev metrics, mean and std per learning rate, the choice
  train_config.json                                 every option of the job
  runs/grid.json                                    the options the grid started with (--resume checks them)
  runs/job_id                                       the job's token; metrics.json repeats it once the job finished
  runs/<mode>-lr<lr>-seed<seed>/                    result.json, log.jsonl, best/ (the run's best epoch), and while it
                                                    runs checkpoints/step-N/ (model + trainer_state.pt), atomically
Both modes (the embedded default): ``full/`` and ``adapter/`` each hold the first five entries;
metrics.json and train_config.json sit on top. A run is chosen per mode: the learning rate with
the best mean dev metric over the seeds, then its best seed. Only rank 0 writes; every rank
computes the same things in the same order.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmini.data.labelled import without_text
from fastmini.data.ner import continuation_labels
from fastmini.files import write_file_atomically, write_json_atomically
from fastmini.finetune import inference
from fastmini.finetune.config import (
    GRID_NAME,
    JOB_ID_NAME,
    RUNS_DIR,
    FinetuneConfig,
    changed_options,
    finetuning_max_length,
)
from fastmini.finetune.data import TaskData, encode, load_task_data
from fastmini.finetune.grid_run import BEST_DIR, GridRun
from fastmini.finetune.models import ModelSource, load_task_model, task_model_class
from fastmini.finetune.selection import MODES, Setting, choose, modes_of, results_table
from fastmini.finetune.tasks import TaskSpec, task_spec
from fastmini.training import checkpoints, distributed, precision
from fastmini.training.batching import check_global_batch, without_split
from fastmini.training.checkpoints import METRICS_NAME, PREVIOUS_METRICS_NAME, TRAIN_CONFIG_NAME
from fastmini.training.cli import check_writable_directory, hub_offline_switch_undone, writable_directory
from fastmini.training.errors import Interrupted, UsageError
from fastmini.training.options import read_saved_options
from fastmini.training.output_dirs import (
    check_foreign_outputs,
    check_not_running,
    hold_output_dir,
    releasing_output_dirs_taken,
    resume_options,
)

log = logging.getLogger("fastmini.finetune")

ADAPTERS_DIR = "adapters"


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run a fine-tuning job (one process, or one rank of torchrun); returns the metrics."""
    context = distributed.setup(config.device)
    try:
        with releasing_output_dirs_taken(), hub_offline_switch_undone():
            job = FineTuning(config, context)
            try:
                return job.run()
            finally:
                job.source.close()
    finally:
        distributed.teardown()


def check_output_dir(config: FinetuneConfig, probe_lock: bool = True) -> Path:
    """The output directory, checked without writing anything: writable (or creatable), and never mixing two
    jobs.

    An unfinished job (no metrics.json naming the job of runs/job_id) is kept unless --resume continues it (with the
    options it was started with) or --overwrite-output-dir discards it; a finished job's runs are simply
    replaced, but only by ``replace_previous_job`` once every input of the new job has been checked."""
    output = check_writable_directory(config.output_dir)
    if probe_lock:  # the process that will hold the lock: a job's ranks probing at once took each other for a job
        check_not_running(output)
    inputs = {"--model": config.model, "--tokenizer": config.tokenizer, "--data": config.data}
    check_foreign_outputs(output, "fastmini.finetune", config.overwrite_output_dir, inputs)
    grid = output / RUNS_DIR / GRID_NAME
    if config.resume:
        if grid.is_file():
            _check_resumed_options(grid, config)
        else:
            log.warning("--resume: nothing to resume in %s; starting a fresh job", output)
    elif grid.is_file() and not config.overwrite_output_dir and not _finished(output):
        raise UsageError(
            f"--output-dir {config.output_dir} holds an unfinished fine-tuning job; pass --resume to continue it "
            "or --overwrite-output-dir to start afresh"
        )
    return output


def _finished(output: Path) -> bool:
    """Whether the job of ``output``/runs ended: its metrics.json names that job (read from the files, not their
    times, which a copy does not keep). A job directory from before runs/job_id existed: by the files' times."""
    metrics, job_id = output / METRICS_NAME, output / RUNS_DIR / JOB_ID_NAME
    if not metrics.is_file():
        return False
    if not job_id.is_file():
        return metrics.stat().st_mtime >= (output / RUNS_DIR / GRID_NAME).stat().st_mtime
    try:
        finished_job = json.loads(metrics.read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return False
    return finished_job == job_id.read_text().strip()


def _check_resumed_options(grid: Path, config: FinetuneConfig) -> None:
    """--resume continues a job only with the options it was started with (run-only ones aside)."""
    saved = read_saved_options(grid) or {}
    current = config.to_dict()
    changed = changed_options(without_split(saved), without_split(current))
    if changed:
        raise UsageError(
            f"--resume: the job in {grid.parent.parent} was started with other options: {'; '.join(changed)}"
        )


def _published_by(output: Path) -> dict[str, list[str]]:
    """What the previous job in ``output`` published (its metrics.json's "published", or the copy that this job's
    publishing moved aside, were it stopped part-way); empty if unknown."""
    for name in (METRICS_NAME, PREVIOUS_METRICS_NAME):
        try:
            published = json.loads((output / name).read_text()).get("published")
        except (OSError, ValueError, AttributeError):
            continue
        return published if isinstance(published, dict) else {}
    return {}


def _withdraw_previous_metrics(output: Path, modes: Sequence[str]) -> None:
    """Before publishing: the previous job's metrics.json must not vouch for the files this job is replacing one by
    one (a process stopped part-way left it naming the old job beside the new model). The top-level one moves
    aside (what it published is still to be removed at the end, or on --resume); the modes' copies go."""
    if (output / METRICS_NAME).is_file():
        (output / METRICS_NAME).replace(output / PREVIOUS_METRICS_NAME)
    for mode in modes:
        (output / mode / METRICS_NAME).unlink(missing_ok=True)


def _remove_stale_outputs(output: Path, before: dict[str, list[str]], now: dict[str, list[str]]) -> None:
    """Remove what the previous job published and this one did not (its test predictions, its adapters, its
    full/ and adapter/ directories): files of another model must not pass for this one's. Only plain entry names
    of the directories a job publishes into are touched."""
    places = {".", *MODES}
    for where, names in before.items():
        if where not in places or not isinstance(names, list) or (where != "." and where not in now.get(".", [])):
            continue  # a mode directory this job does not publish goes as a whole, with "."'s entries
        kept = set(now.get(where, ()))
        for name in names:
            if isinstance(name, str) and name not in kept and name not in ("", ".", "..") and "/" not in name:
                checkpoints.remove_entry(output / where / name)


def replace_previous_job(config: FinetuneConfig) -> Path:
    """Create the output directory and drop an earlier job's runs (not on --resume).

    Called once the data, the model and the tokenizer have all been checked: a command that fails on any of
    them leaves the directory as it was (or absent)."""
    output = writable_directory(config.output_dir)
    hold_output_dir(output)  # before anything here changes: a second process is refused from now on
    runs = output / RUNS_DIR
    if runs.exists() and not config.resume:
        log.info("replacing the %s job in %s", "finished" if _finished(output) else "unfinished", output)
        shutil.rmtree(runs)
    elif runs.is_dir():  # a resumed job: what a killed one left half-saved (a best/ model being replaced) goes
        for run in runs.iterdir():
            checkpoints.remove_temporaries(run)
    return output


class FineTuning:
    """Everything the runs of one job share: data, tokenizer, model source, output paths."""

    def __init__(self, config: FinetuneConfig, context: distributed.DistributedContext):
        self.config, self.context, self.device = config, context, context.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.autocast_dtype = precision.autocast_dtype(config.precision, self.device)
        check_global_batch(config.batch_size, context.world_size, config.grad_accumulation)
        # Refuse an unfinished job's directory now, before the heavy work; write nothing yet.
        # Rank 0 checks first, probing the lock: a job's ranks probing at once took each other for another job.
        self.output = distributed.main_first(context, lambda: check_output_dir(config, probe_lock=context.is_main))
        self.spec: TaskSpec = task_spec(config.task)
        self.modes = modes_of(config)
        # Everything that can be wrong with the data or the model is found before the output directory is touched.
        self.data: TaskData = load_task_data(config, self.spec)
        self.source = ModelSource(config)
        try:
            self._prepare(config, context)
        except BaseException:
            self.source.close()  # a fresh student's temporary directory goes with the failed setup
            raise

    def _prepare(self, config: FinetuneConfig, context: distributed.DistributedContext) -> None:
        """The rest of the setup, everything after the model source (which owns a temporary directory)."""
        probe, _ = load_task_model(self.source, self.spec, self.data.labels, config.seed[0], adapter_tuning=False)
        self.max_length = finetuning_max_length(config.max_length, probe.config.max_position_embeddings)
        del probe
        tokenizer = self.source.tokenizer
        kind = self.spec.kind
        continuation = continuation_labels(self.data.labels.names) if kind == "ner" else None

        def encoded(examples):
            return encode(tokenizer, examples, kind, self.max_length, config.label_subtokens, continuation)

        self.train = encoded(self.data.train)
        self.validation = {split: encoded(examples) for split, examples in self.data.validation.items()}
        self.test = {split: encoded(examples) for split, examples in self.data.test.items()}
        self._report_examples_without_text()
        self._report_cut_examples()
        if len(self.train) < config.batch_size:
            raise UsageError(
                f"--data: only {len(self.train)} training examples, fewer than one global batch "
                f"(--batch-size {config.batch_size}); give more data or a smaller batch"
            )
        # Everything the command could get wrong has been checked: only now may an earlier job go.
        distributed.on_main(context, lambda: replace_previous_job(config))
        self.runs_dir = self.output / RUNS_DIR
        self.steps_per_epoch = len(self.train) // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        self.grid = [Setting(mode, lr, seed) for mode in self.modes for lr in config.lr for seed in config.seed]
        distributed.on_main(context, self._record_grid)

    def _report_examples_without_text(self) -> None:
        """A warning per split with examples of no text at all (empty cells): they train and score on [CLS] [SEP]
        alone, which is rarely what the data meant."""
        for split, examples in {"train": self.data.train, **self.data.validation, **self.data.test}.items():
            empty = [example["where"] for example in examples if without_text(example)]
            if empty:
                log.warning("%s: %d of %d examples have no text (the first: %s)", split, len(empty), len(examples),
                            empty[0])  # fmt: skip

    def _report_cut_examples(self) -> None:
        """A warning per split with examples longer than the job's max length: cut, they train and score on their
        first tokens only (a tagger's cut-off words count as predicted "O")."""
        splits = {"train": self.train, **self.validation, **self.test}
        for split, encoded in splits.items():
            if encoded.cut:
                what = "sentences lost words (scored as predicted O)" if encoded.kind == "ner" else "examples were cut"
                log.warning(
                    "%s: %d of %d %s at --max-length %d", split, encoded.cut, len(encoded), what, self.max_length
                )

    def _record_grid(self) -> None:
        """Write runs/grid.json, which --resume checks the options against (``check_output_dir``), and
        runs/job_id, which the job's metrics.json repeats (``_finished``); a resumed job keeps both."""
        grid, job_id = self.runs_dir / GRID_NAME, self.runs_dir / JOB_ID_NAME
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if not (self.config.resume and grid.is_file()):
            write_json_atomically(grid, self.config.to_dict())
        if self.config.resume and job_id.is_file():
            self.job_id = job_id.read_text().strip()
        else:
            self.job_id = uuid.uuid4().hex
            write_file_atomically(job_id, lambda temporary: Path(temporary).write_text(self.job_id + "\n"))

    # ------------------------------------------------------------------------------ describe
    def _describe(self) -> None:
        config, data = self.config, self.data
        labels = data.labels.names
        shown = "a number (regression)" if labels is None else f"{len(labels)}: {', '.join(labels[:12])}"
        sizes = ", ".join(f"{split} {size}" for split, size in data.sizes().items())
        log.info(
            "task %s (%s) on %s: %s examples; labels %s", self.spec.name, self.spec.kind, data.source, sizes, shown
        )
        log.info(
            "model %s; %s; %d run(s) (learning rates %s x seeds %s), %d epochs x %d steps of %d examples each, "
            "device %s%s",
            self.source.description,
            " and ".join(f"{mode} fine-tuning" if mode == "full" else "adapter tuning" for mode in self.modes),
            len(self.grid),
            " ".join(f"{lr:g}" for lr in config.lr),
            " ".join(map(str, config.seed)),
            config.epochs,
            self.steps_per_epoch,
            config.batch_size,
            self.device,
            ", bf16 autocast" if self.autocast_dtype is not None else "",
        )

    # ----------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        if self.context.is_main:
            self._describe()
        started = time.perf_counter()
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in self.modes}
        for finished, setting in enumerate(self.grid):
            grid_run = GridRun(self, setting)
            try:
                results[setting.mode].append(grid_run.run())
            except KeyboardInterrupt as interrupt:
                raise Interrupted(_after_interrupt(grid_run, finished, self.config.output_dir)) from interrupt
        seconds = time.perf_counter() - started
        return distributed.on_main(self.context, lambda: self._finish(results, seconds)) or {}

    def _finish(self, results: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
        spec = self.spec
        published_before = _published_by(self.output)
        _withdraw_previous_metrics(self.output, MODES)
        published: dict[str, list[str]] = {}  # "." (the output directory) or a mode's directory -> entry names
        modes = {}
        for mode, runs in results.items():
            grid, chosen = choose(runs, self.config.lr, spec.main_metric)
            target = self.output if len(self.modes) == 1 else self.output / mode
            test, published[target.relative_to(self.output).as_posix()] = self._publish(mode, chosen, target)
            if target != self.output:
                published.setdefault(".", []).append(mode)
            modes[mode] = {
                "directory": str(target),
                "trainable_parameters": runs[0]["trainable_parameters"],
                "total_parameters": runs[0]["total_parameters"],
                "grid": grid,
                "chosen": {
                    "lr": chosen["lr"],
                    "seed": chosen["seed"],
                    "best_epoch": chosen["best_epoch"],
                    "validation": chosen["validation"],
                    "test": test,
                },
            }
        metrics = {
            "job": self.job_id,  # marks the job finished (_finished)
            "task": spec.name,
            "kind": spec.kind,
            "data": self.data.source,
            "model": self.source.description,
            "selection_metric": spec.main_metric,
            "selection_split": next(iter(self.data.validation)),
            "label_names": self.data.labels.names,
            "examples": self.data.sizes(),
            "max_length": self.max_length,
            "modes": modes,
            "published": published,
            "train": {
                "seconds_this_session": round(seconds, 2),
                "processes": self.context.world_size,
                "device": str(self.device),
                "precision": precision.precision_name(self.autocast_dtype),  # --precision auto, resolved
            },
        }
        if len(self.modes) > 1:
            for mode, entry in modes.items():
                write_json_atomically(Path(entry["directory"]) / METRICS_NAME, {**metrics, "modes": {mode: entry}})
                write_json_atomically(Path(entry["directory"]) / TRAIN_CONFIG_NAME, self.config.to_dict())
        _remove_stale_outputs(self.output, published_before, published)
        write_json_atomically(self.output / TRAIN_CONFIG_NAME, self.config.to_dict())
        write_json_atomically(self.output / METRICS_NAME, metrics)  # last: it marks the job finished (_finished)
        (self.output / PREVIOUS_METRICS_NAME).unlink(missing_ok=True)
        print(results_table(metrics, self.config.seed))
        log.info(
            "wrote the chosen model(s), predictions, %s and %s to %s", METRICS_NAME, TRAIN_CONFIG_NAME, self.output
        )
        return metrics

    def _publish(self, mode: str, chosen: dict[str, Any], target: Path) -> tuple[dict[str, Any] | None, list[str]]:
        """Copy the chosen run's best model, the tokenizer, its adapters and its predictions into ``target``; (the
        test metrics, the names of the entries published)."""
        best = self.runs_dir / chosen["name"] / BEST_DIR
        staging = self.output / f".tmp-publish-{mode}"
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(best, staging)
        model = task_model_class(self.spec).from_pretrained(best, dtype=precision.WEIGHTS_DTYPE).to(self.device)
        checkpoints.save_tokenizer(self.source.tokenizer, staging, model.config.max_position_embeddings)
        if mode == "adapter":
            model.save_adapters(staging / ADAPTERS_DIR)
        test_metrics = {}
        for split, encoded in {**self.validation, **self.test}.items():
            examples = {**self.data.validation, **self.data.test}[split]
            logits = inference.predict_logits(
                model, encoded, self.config.eval_batch_size, self.device, self.autocast_dtype
            )
            predictions = inference.decode(self.spec.kind, logits, encoded, self._outside_index())
            write_predictions(
                staging / f"predictions_{split}.jsonl", self.spec, self.data, examples, predictions, logits
            )
            if split in self.test:
                scored = labelled_scores(self.spec, self.data, examples, predictions)
                if scored is not None:
                    test_metrics[split] = scored
        return test_metrics or None, checkpoints.publish_directory_contents(staging, target)

    def _outside_index(self) -> int:
        return self.data.labels.index.get("O", 0)

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Dev metrics of every validation split (computed on rank 0, the same on every rank)."""

        def scores() -> dict[str, dict[str, float]]:
            result = {}
            for split, encoded in self.validation.items():
                logits = inference.predict_logits(
                    model, encoded, self.config.eval_batch_size, self.device, self.autocast_dtype
                )
                predictions = inference.decode(self.spec.kind, logits, encoded, self._outside_index())
                result[split] = inference.scores(self.spec, self.data.labels, self.data.validation[split], predictions)
            return result

        return distributed.on_main(self.context, scores, share_result=True)


def _after_interrupt(interrupted: GridRun, finished: int, output_dir: str) -> str:
    """What the user can do after Ctrl-C: --resume keeps the finished runs of the grid and continues the
    interrupted one from its checkpoint; with neither, there is nothing to keep."""
    kept = f" and keeps the {finished} finished run(s)" if finished else ""
    name = interrupted.setting.name
    resume = resume_options(output_dir)
    if interrupted.last_checkpoint is not None:
        return f"{resume} continues run {name} from {interrupted.last_checkpoint.name}{kept}"
    if finished:
        return f"{resume} starts run {name} afresh (none of its checkpoints was written yet){kept}"
    return (
        "no checkpoint was written yet, so there is nothing to resume; start afresh with --overwrite-output-dir "
        "(the unfinished job is refused otherwise)"
    )


def labelled_scores(spec: TaskSpec, data: TaskData, examples, predictions) -> dict[str, float] | None:
    """The metrics of the examples that have a label (a test split may lack some or all: see data.py); None
    when none has one."""
    pairs = [(example, prediction) for example, prediction in zip(examples, predictions, strict=True)
             if "target" in example]  # fmt: skip
    if not pairs:
        return None
    labelled, predicted = zip(*pairs, strict=True)
    return inference.scores(spec, data.labels, list(labelled), list(predicted))


def write_predictions(path: Path, spec: TaskSpec, data: TaskData, examples, predictions, logits) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for index, (example, prediction, row) in enumerate(zip(examples, predictions, logits, strict=True)):
            if spec.kind == "ner":
                record: dict[str, Any] = {"index": index, "tokens": example["tokens"]}
            else:
                record = {"index": index, "text": example["text"]}
                if example["text_pair"] is not None:
                    record["text_pair"] = example["text_pair"]
            record["label"] = inference.gold_readable(spec, data.labels, example)
            record.update(inference.readable(spec, data.labels, prediction, row))
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
