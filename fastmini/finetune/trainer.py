"""The fine-tuning job: data, the grid of (mode, learning rate, seed) runs, checkpoints, resume, choice, outputs.

Output directory layout (``--output-dir``), one mode:
  config.json, model.safetensors, tokenizer files   the chosen run's best epoch (from_pretrained, Auto classes)
  adapters/                                         adapter tuning: only the adapters and the head (save_adapters)
  predictions_<split>.jsonl                         that model on every validation and test split
  metrics.json                                      every run's dev metrics, mean and std per learning rate, the choice
  train_config.json                                 every option of the job
  runs/grid.json                                    the options the grid started with (--resume checks them)
  runs/<mode>-lr<lr>-seed<seed>/                    result.json, log.jsonl, best/ (the run's best epoch), and while it
                                                    runs checkpoints/step-N/ (model + trainer_state.pt), atomically
Both modes (the embedded default): ``full/`` and ``adapter/`` each hold the first five entries;
metrics.json and train_config.json sit on top. A run is chosen per mode: the learning rate with
the best mean dev metric over the seeds, then its best seed. Only rank 0 writes; every rank
computes the same things in the same order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmini.data.ner import IGNORE_INDEX, continuation_labels
from fastmini.files import write_file_atomically
from fastmini.finetune import inference
from fastmini.finetune.config import DEFAULT_MAX_LENGTH, FinetuneConfig, changed_options
from fastmini.finetune.data import TaskData, encode, load_task_data
from fastmini.finetune.models import ModelSource, load_task_model, task_model_class
from fastmini.finetune.tasks import LOWER_IS_BETTER, TaskSpec, task_spec
from fastmini.training import checkpoints, distributed, faults, precision
from fastmini.training.batching import (
    StepBatches,
    check_global_batch,
    check_resumed_split,
    derived_seed,
    without_split,
)
from fastmini.training.cli import check_writable_directory, writable_directory
from fastmini.training.errors import Interrupted, TrainingError, UsageError
from fastmini.training.memory import enable_activation_checkpointing
from fastmini.training.normalization import backward_share, share_of_mean, step_totals
from fastmini.training.optimization import WarmupDecay, build_adamw, gradient_norm
from fastmini.training.run_log import RunLog

log = logging.getLogger("fastmini.finetune")

RUNS_DIR = "runs"
GRID_NAME = "grid.json"
RESULT_NAME = "result.json"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.json"
TRAIN_CONFIG_NAME = "train_config.json"
ADAPTERS_DIR = "adapters"
MODES = ("full", "adapter")


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run a fine-tuning job (one process, or one rank of torchrun); returns the metrics."""
    context = distributed.setup(config.device)
    try:
        job = FineTuning(config, context)
        try:
            return job.run()
        finally:
            job.source.close()
    finally:
        distributed.teardown()


@dataclass(frozen=True)
class Setting:
    """One run of the grid."""

    mode: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-lr{self.lr:g}-seed{self.seed}"


def modes_of(config: FinetuneConfig) -> list[str]:
    if config.adapter_tuning is None:
        return list(MODES) if config.embedded_default else ["full"]
    return ["adapter"] if config.adapter_tuning else ["full"]


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _write_json(path: Path, value: Any) -> None:
    write_file_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(value, indent=2) + "\n"))


def check_output_dir(config: FinetuneConfig) -> Path:
    """The output directory, checked without writing anything: writable (or creatable), and never mixing two
    jobs.

    An unfinished job (runs/grid.json newer than metrics.json) is kept unless --resume continues it (with the
    options it was started with) or --overwrite-output-dir discards it; a finished job's runs are simply
    replaced, but only by ``replace_previous_job`` once every input of the new job has been checked."""
    output = check_writable_directory(config.output_dir)
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
    metrics = output / METRICS_NAME
    return metrics.is_file() and metrics.stat().st_mtime >= (output / RUNS_DIR / GRID_NAME).stat().st_mtime


def _check_resumed_options(grid: Path, config: FinetuneConfig) -> None:
    """--resume continues a job only with the options it was started with (run-only ones aside)."""
    saved = json.loads(grid.read_text())
    current = config.to_dict()
    changed = changed_options(without_split(saved), without_split(current))
    if changed:
        raise UsageError(
            f"--resume: the job in {grid.parent.parent} was started with other options: {'; '.join(changed)}"
        )


def replace_previous_job(config: FinetuneConfig) -> Path:
    """Create the output directory and drop an earlier job's runs (not on --resume).

    Called once the data, the model and the tokenizer have all been checked: a command that fails on any of
    them leaves the directory as it was (or absent)."""
    output = writable_directory(config.output_dir)
    runs = output / RUNS_DIR
    if runs.exists() and not config.resume:
        log.info("replacing the %s job in %s", "finished" if _finished(output) else "unfinished", output)
        shutil.rmtree(runs)
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
        self.output = check_output_dir(config)
        self.spec: TaskSpec = task_spec(config.task)
        self.modes = modes_of(config)
        # Everything that can be wrong with the data or the model is found before the output directory is touched.
        self.data: TaskData = load_task_data(config, self.spec)
        self.source = ModelSource(config)
        probe, _ = load_task_model(self.source, self.spec, self.data.labels, config.seed[0], adapter_tuning=False)
        self.max_length = config.max_length or min(DEFAULT_MAX_LENGTH, probe.config.max_position_embeddings)
        del probe
        tokenizer = self.source.tokenizer
        kind = self.spec.kind
        continuation = continuation_labels(self.data.labels.names) if kind == "ner" else None

        def encoded(examples):
            return encode(tokenizer, examples, kind, self.max_length, config.label_subtokens, continuation)

        self.train = encoded(self.data.train)
        self.validation = {split: encoded(examples) for split, examples in self.data.validation.items()}
        self.test = {split: encoded(examples) for split, examples in self.data.test.items()}
        if len(self.train) < config.batch_size:
            raise UsageError(
                f"--data: only {len(self.train)} training examples, fewer than one global batch "
                f"(--batch-size {config.batch_size}); give more data or a smaller batch"
            )
        # Everything the command could get wrong has been checked: only now may an earlier job go.
        if context.is_main:
            replace_previous_job(config)
        distributed.barrier(context)
        self.runs_dir = self.output / RUNS_DIR
        self.steps_per_epoch = len(self.train) // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        self.grid = [Setting(mode, lr, seed) for mode in self.modes for lr in config.lr for seed in config.seed]
        if context.is_main:
            self._record_grid()
        distributed.barrier(context)

    def _record_grid(self) -> None:
        """Write runs/grid.json, which --resume checks the options against (``check_output_dir``)."""
        grid = self.runs_dir / GRID_NAME
        if self.config.resume and grid.is_file():
            return
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        _write_json(grid, self.config.to_dict())

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
                raise Interrupted(_after_interrupt(grid_run, finished)) from interrupt
        metrics: dict[str, Any] = {}
        if self.context.is_main:
            metrics = self._finish(results, time.perf_counter() - started)
        distributed.barrier(self.context)
        return metrics

    def _finish(self, results: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
        spec = self.spec
        modes = {}
        for mode, runs in results.items():
            grid, chosen = choose(runs, self.config.lr, spec.main_metric)
            target = self.output if len(self.modes) == 1 else self.output / mode
            test = self._publish(mode, chosen, target)
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
            "train": {
                "seconds_this_session": round(seconds, 2),
                "processes": self.context.world_size,
                "device": str(self.device),
            },
        }
        for mode in self.modes:
            if len(self.modes) > 1:
                _write_json(Path(modes[mode]["directory"]) / METRICS_NAME, {**metrics, "modes": {mode: modes[mode]}})
                _write_json(Path(modes[mode]["directory"]) / TRAIN_CONFIG_NAME, self.config.to_dict())
        _write_json(self.output / TRAIN_CONFIG_NAME, self.config.to_dict())
        _write_json(self.output / METRICS_NAME, metrics)
        print(results_table(metrics, self.config.seed))
        log.info(
            "wrote the chosen model(s), predictions, %s and %s to %s", METRICS_NAME, TRAIN_CONFIG_NAME, self.output
        )
        return metrics

    def _publish(self, mode: str, chosen: dict[str, Any], target: Path) -> dict[str, Any] | None:
        """Copy the chosen run's best model, the tokenizer, its adapters and its predictions into ``target``."""
        best = self.runs_dir / chosen["name"] / BEST_DIR
        staging = self.output / f".tmp-publish-{mode}"
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(best, staging)
        self.source.tokenizer.save_pretrained(staging)
        model = task_model_class(self.spec).from_pretrained(best).to(self.device)
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
        checkpoints.publish_directory_contents(staging, target)
        return test_metrics or None

    def _outside_index(self) -> int:
        return self.data.labels.index.get("O", 0)

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Dev metrics of every validation split (computed on rank 0, the same on every rank)."""
        result = None
        if self.context.is_main:
            result = {}
            for split, encoded in self.validation.items():
                logits = inference.predict_logits(
                    model, encoded, self.config.eval_batch_size, self.device, self.autocast_dtype
                )
                predictions = inference.decode(self.spec.kind, logits, encoded, self._outside_index())
                result[split] = inference.scores(self.spec, self.data.labels, self.data.validation[split], predictions)
        return distributed.broadcast_from_main(result, self.context)


def _after_interrupt(interrupted: GridRun, finished: int) -> str:
    """What the user can do after Ctrl-C: --resume keeps the finished runs of the grid and continues the
    interrupted one from its checkpoint; with neither, there is nothing to keep."""
    kept = f" and keeps the {finished} finished run(s)" if finished else ""
    name = interrupted.setting.name
    if interrupted.last_checkpoint is not None:
        return f"--resume continues run {name} from {interrupted.last_checkpoint.name}{kept}"
    if finished:
        return f"--resume starts run {name} afresh (none of its checkpoints was written yet){kept}"
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


def choose(runs: list[dict[str, Any]], lrs: list[float], metric: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per learning rate: the seeds' dev values, mean and sample std; the chosen run (best mean, then best seed)."""
    grid = []
    for lr in lrs:
        group = [run for run in runs if run["lr"] == lr]
        values = [run["selection_value"] for run in group]
        grid.append(
            {
                "lr": lr,
                "seeds": [run["seed"] for run in group],
                "values": values,
                "mean": round(statistics.fmean(values), 6),
                "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
                "best_epochs": [run["best_epoch"] for run in group],
            }
        )
    best_lr = grid[0]
    for entry in grid[1:]:
        if is_better(entry["mean"], best_lr["mean"], metric):
            best_lr = entry
    chosen = None
    for run in runs:
        if run["lr"] == best_lr["lr"] and (
            chosen is None or is_better(run["selection_value"], chosen["selection_value"], metric)
        ):
            chosen = run
    for entry in grid:
        entry["chosen"] = entry is best_lr
    return grid, chosen


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _cell(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" + ("*" if entry["chosen"] else " ")


def results_table(metrics: dict[str, Any], seeds: list[int]) -> str:
    """A small text table: per mode and learning rate, mean ± std of the selection metric over the seeds."""
    metric, split = metrics["selection_metric"], metrics["selection_split"]
    lines = [
        f"{metrics['task']}: dev {metric} ({split}, {metrics['examples'][split]} examples), mean ± std over "
        f"{len(seeds)} seed(s); * = chosen",
    ]
    modes = metrics["modes"]
    lrs = [entry["lr"] for entry in next(iter(modes.values()))["grid"]]
    header = f"{'mode':<9}{'trainable':>18}  " + "".join(f"{'lr ' + format(lr, 'g'):>20}" for lr in lrs)
    lines += [header, "-" * len(header)]
    for mode, entry in modes.items():
        share = entry["trainable_parameters"] / entry["total_parameters"]
        trainable = f"{_count(entry['trainable_parameters'])} ({100 * share:.1f}%)"
        cells = "".join(f"{_cell(g):>20}" for g in entry["grid"])
        lines.append(f"{mode:<9}{trainable:>18}  {cells}")
    for mode, entry in modes.items():
        chosen = entry["chosen"]
        shown = ", ".join(f"{name} {value:.4f}" for name, value in next(iter(chosen["validation"].values())).items())
        lines.append(
            f"{mode}: chosen lr {chosen['lr']:g} seed {chosen['seed']} (epoch {chosen['best_epoch']}): "
            f"{shown} -> {entry['directory']}"
        )
    return "\n".join(lines)


class GridRun:
    """One (mode, learning rate, seed) run: train, evaluate every epoch, keep the best epoch, checkpoint."""

    def __init__(self, job: FineTuning, setting: Setting):
        self.job, self.setting = job, setting
        self.config, self.context, self.device = job.config, job.context, job.device
        self.directory = job.runs_dir / setting.name
        self.checkpoint_root = self.directory / CHECKPOINTS_DIR
        self.last_checkpoint: Path | None = None

    def run(self) -> dict[str, Any]:
        result_path = self.directory / RESULT_NAME
        if self.config.resume and result_path.is_file():
            result = json.loads(result_path.read_text())
            log.info("run %s finished earlier (best epoch %s)", self.setting.name, result["best_epoch"])
            return result
        if self.context.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.context)
        result = self._train()
        if self.context.is_main:
            _write_json(result_path, result)
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)  # the best epoch is kept in best/
        distributed.barrier(self.context)
        return result

    # ------------------------------------------------------------------------- setup, resume
    def _train(self) -> dict[str, Any]:
        config, setting, job = self.config, self.setting, self.job
        model, fresh_head = load_task_model(
            job.source, job.spec, job.data.labels, setting.seed, setting.mode == "adapter"
        )
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.counts = (sum(p.numel() for p in self.trainable), sum(p.numel() for p in model.parameters()))
        self.optimizer = build_adamw(model, setting.lr, config.weight_decay)
        self.batches = StepBatches(
            job.train,
            config.batch_size,
            self.context.world_size,
            config.grad_accumulation,
            self.context.rank,
            setting.seed,
        )
        warmup = round(config.warmup_ratio * job.total_steps)
        self.scheduler = WarmupDecay(self.optimizer, warmup, job.total_steps, config.schedule)
        self.trained = model
        if self.context.is_distributed:
            self.trained = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.state: dict[str, Any] = {
            "step": 0,
            "history": [],
            "best": None,
            "bad_evaluations": 0,
            "elapsed": 0.0,
            "loss_sum": 0.0,
            "loss_steps": 0,
        }
        rng = self._maybe_resume()
        run_log = RunLog(self.directory, self.context.is_main, self.state["step"] if rng is not None else None)
        if rng is not None:
            checkpoints.restore_rng_state(rng)
        else:
            torch.manual_seed(derived_seed(setting.seed, "dropout", self.context.rank))
        try:
            self._loop(run_log)
        finally:
            run_log.close()
        best = self.state["best"]
        return {
            "name": setting.name,
            "mode": setting.mode,
            "lr": setting.lr,
            "seed": setting.seed,
            "best_epoch": best["epoch"],
            "best_step": best["step"],
            "selection_value": best["value"],
            "validation": best["validation"],
            "history": self.state["history"],
            "steps": self.state["step"],
            "stopped_early": self.state["step"] < job.total_steps,
            "seconds": round(self.state["elapsed"], 2),
            "trainable_parameters": self.counts[0],
            "total_parameters": self.counts[1],
            "fresh_head": fresh_head,
        }

    def _maybe_resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint of this run when resuming; the RNG state to restore, or None."""
        if not self.config.resume:
            return None
        found = checkpoints.list_checkpoints(self.checkpoint_root)
        if not found:
            return None
        path = found[-1][1]
        try:
            state = checkpoints.load_state(path / STATE_NAME)
        except Exception as error:  # a truncated or foreign file
            raise UsageError(f"--resume {path}: {STATE_NAME} cannot be read ({error})") from error
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise UsageError(f"--resume {path}: model.safetensors cannot be read ({error})") from error
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UsageError(
                f"--resume {path}: the checkpoint does not fit this run's model "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = state["progress"]
        self.last_checkpoint = path
        check_resumed_split(
            (state["world_size"], state.get("grad_accumulation")),
            (self.context.world_size, self.config.grad_accumulation),
            self.config.batch_size,
            log,
        )
        log.info(
            "run %s: resuming from %s (step %d of %d)",
            self.setting.name,
            path,
            self.state["step"],
            self.job.total_steps,
        )
        return checkpoints.rng_state_of_rank(state["rng"], self.context.rank)

    def _save_checkpoint(self) -> None:
        step = self.state["step"]
        rng_states = [checkpoints.capture_rng_state()]
        if self.context.is_distributed:
            gathered: list[Any] = [None] * self.context.world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if self.context.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states,
                "progress": self.state,
                "world_size": self.context.world_size,
                "grad_accumulation": self.config.grad_accumulation,
            }
            final = self.checkpoint_root / checkpoints.checkpoint_name(step)
            checkpoints.remove_temporaries(self.checkpoint_root)
            with checkpoints.atomic_directory(final) as directory:
                self.model.save_pretrained(directory)
                checkpoints.save_state(directory / STATE_NAME, state)
                faults.kill_if_armed("kill-in-checkpoint", step)
            checkpoints.prune(self.checkpoint_root, 1)
        distributed.barrier(self.context)
        # On every rank, once rank 0 has published it: each rank's messages after a stop name it.
        self.last_checkpoint = self.checkpoint_root / checkpoints.checkpoint_name(step)

    # ---------------------------------------------------------------------------------- loop
    def _loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the model's loss averages over: labelled real tokens (NER), else examples."""
        if self.job.spec.kind == "ner":
            return int(((batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()).sum())
        return int(batch["input_ids"].shape[0])

    def _train_step(self, step: int) -> dict[str, float]:
        micro_batches = self.batches.micro_batches(step)
        items = [self._loss_items(batch) for batch in micro_batches]
        total = step_totals({"items": sum(items)}, self.context)["items"]  # the global batch's, before any backward
        share_sum = 0.0
        for index, (batch, count) in enumerate(zip(micro_batches, items, strict=True)):
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            last = index == len(micro_batches) - 1
            sync = self.trained.no_sync() if self.context.is_distributed and not last else contextlib.nullcontext()
            with sync:
                with precision.autocast(self.device, self.job.autocast_dtype):
                    output = self.trained(**batch)
                # The model's mean over this micro-batch's items, as its share of the global batch's mean.
                share = share_of_mean(output.loss, count, total)
                if share is None:  # no labelled token here: nothing to add, but DDP expects every gradient
                    share = output.logits.sum() * 0.0
                backward_share(share, self.context)
            share_sum += float(share.detach())
        values = {"loss": float(distributed.sum_over_processes(torch.tensor([share_sum]), self.context)[0])}
        if faults.nan_if_armed(step + 1):
            values["loss"] = float("nan")
        if not math.isfinite(values["loss"]):
            raise TrainingError(
                f"run {self.setting.name}: the loss is not finite at step {step + 1}; stopped without updating the "
                f"model; {self._last_good()}"
            )
        # A finite loss can still give inf/NaN gradients (an overflow in backward); one AdamW step with them
        # writes NaN into every weight, and the next checkpoint and best/ would hold that model.
        values["grad_norm"] = gradient_norm(self.trainable, self.config.max_grad_norm)
        if not math.isfinite(values["grad_norm"]):
            raise TrainingError(
                f"run {self.setting.name}: the gradient norm is not finite at step {step + 1} ({values['grad_norm']}, "
                f"loss {values['loss']:.4g}); stopped without updating the model; {self._last_good()}"
            )
        values["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return values

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint of this run was written yet"
        return f"the checkpoints written so far hold finite weights (the latest: {self.last_checkpoint})"

    def _end_of_epoch(self, run_log: RunLog) -> bool:
        """Evaluate, keep the best epoch, checkpoint; True when early stopping ends the run."""
        state, config, job = self.state, self.config, self.job
        step = state["step"]
        epoch = step // job.steps_per_epoch
        validation = job.evaluate(self.model)
        value = validation[next(iter(validation))][job.spec.main_metric]
        train_loss = state["loss_sum"] / max(1, state["loss_steps"])
        state["history"].append(
            {"epoch": epoch, "step": step, "train_loss": round(train_loss, 6), "validation": validation}
        )
        state["loss_sum"], state["loss_steps"] = 0.0, 0
        run_log.write("eval", step, {"epoch": epoch, "train_loss": train_loss, **_flat(validation)})
        best = state["best"]
        if is_better(value, None if best is None else best["value"], job.spec.main_metric):
            state["best"] = {"epoch": epoch, "step": step, "value": value, "validation": validation}
            state["bad_evaluations"] = 0
            if self.context.is_main:
                with checkpoints.atomic_directory(self.directory / BEST_DIR) as directory:
                    self.model.save_pretrained(directory)
            distributed.barrier(self.context)
        else:
            state["bad_evaluations"] += 1
        stopping = bool(config.early_stopping) and state["bad_evaluations"] >= config.early_stopping
        if step < job.total_steps and not stopping:  # a run that ends here writes its result instead
            self._save_checkpoint()
        return stopping

    def _loop(self, run_log: RunLog) -> None:
        config, job, state = self.config, self.job, self.state
        from tqdm.auto import tqdm

        bar = tqdm(
            total=job.total_steps,
            initial=state["step"],
            desc=self.setting.name,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not (self.context.is_main and config.progress),
        )
        started = time.perf_counter()
        elapsed_before = state["elapsed"]
        stopped = bool(config.early_stopping) and state["bad_evaluations"] >= config.early_stopping
        try:
            while state["step"] < job.total_steps and not stopped:
                values = self._train_step(state["step"])
                state["step"] += 1
                state["loss_sum"] += values["loss"]
                state["loss_steps"] += 1
                state["elapsed"] = elapsed_before + time.perf_counter() - started
                step = state["step"]
                faults.kill_if_armed("kill-after-step", step)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.1e}", refresh=False)
                if step % config.log_every == 0:
                    run_log.write("train", step, values)
                if step % job.steps_per_epoch == 0:
                    stopped = self._end_of_epoch(run_log)
                    if self.context.is_main and config.progress:
                        bar.write(self._epoch_line())
                elif config.save_every and step % config.save_every == 0:
                    self._save_checkpoint()
        finally:
            bar.close()

    def _epoch_line(self) -> str:
        metric, best, last = self.job.spec.main_metric, self.state["best"], self.state["history"][-1]
        value = next(iter(last["validation"].values()))[metric]
        return (
            f"{self.setting.name} epoch {last['epoch']}: train loss {last['train_loss']:.4f}, dev {metric} "
            f"{value:.4f} (best {best['value']:.4f} at epoch {best['epoch']})"
        )


def _flat(validation: dict[str, dict[str, float]]) -> dict[str, float]:
    if len(validation) == 1:
        return dict(next(iter(validation.values())))
    return {f"{split}/{name}": value for split, scores in validation.items() for name, value in scores.items()}
