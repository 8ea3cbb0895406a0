"""The distillation run: setup, the training loop, checkpoints, resume, evaluation, outputs.

Output directory layout (``--output-dir``):
  config.json, model.safetensors       the student (AutoModelForMaskedLM after ``import fastmini``)
  tokenizer files                      the teacher's tokenizer
  train_config.json                    every option of the run
  metrics.json                         held-out evaluation before and after, training summary
  log.jsonl (+ tensorboard/)           loss terms every --log-every steps
  checkpoints/step-NNNNNNNN/           student + trainer_state.pt (optimizer, scheduler, RNG
                                       states of every process, data position), written atomically
Only rank 0 writes; every rank computes the same things in the same order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmini.data.corpus import load_documents, reads_below
from fastmini.data.windows import check_window_stride, make_windows
from fastmini.distill import models
from fastmini.distill.batches import MaskedWindows, evaluation_batches
from fastmini.distill.config import DistillConfig, changed_options, resolve_layer_map
from fastmini.distill.distiller import (
    Distiller,
    StepCounts,
    StudentSide,
    compiled_student_side,
    logits_feed_a_loss,
)
from fastmini.distill.evaluation import evaluate
from fastmini.distill.speed_defaults import graph_teacher_by_default, low_precision_maps_by_default
from fastmini.files import write_json_atomically
from fastmini.models.checkpoint import SAFETENSORS_NAME
from fastmini.models.loading import tied_weight_keys
from fastmini.training import checkpoints, distributed, faults, precision
from fastmini.training.batching import StepBatches, check_global_batch, check_resumed_split, without_split
from fastmini.training.checkpoints import (
    CHECKPOINTS_DIR,
    METRICS_NAME,
    PREVIOUS_METRICS_NAME,
    STATE_NAME,
    TRAIN_CONFIG_NAME,
    publish_directory_contents,
)
from fastmini.training.cli import check_writable_directory, hub_offline_switch_undone, writable_directory
from fastmini.training.errors import Interrupted, UsageError
from fastmini.training.memory import enable_activation_checkpointing
from fastmini.training.normalization import backward_share, step_totals
from fastmini.training.optimization import LinearWarmupDecay, build_adamw, checked_step
from fastmini.training.output_dirs import (
    check_foreign_outputs,
    check_not_running,
    hold_output_dir,
    releasing_output_dirs_taken,
    resume_options,
)
from fastmini.training.run_log import RunLog

log = logging.getLogger("fastmini.distill")


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run a distillation (one process, or one rank of torchrun); returns the metrics."""
    context = distributed.setup(config.device)
    try:
        with releasing_output_dirs_taken(), hub_offline_switch_undone():
            return DistillationRun(config, context).run()
    finally:
        distributed.teardown()


def check_output_dir(config: DistillConfig, probe_lock: bool = True) -> Path:
    """The output directory, checked without writing anything: writable (or creatable), and never
    mixing two runs.

    Checkpoints of an *unfinished* run (no metrics.json of a run that reached its latest checkpoint's step)
    are kept unless --resume continues them (from that directory's checkpoints) or --overwrite-output-dir
    discards them; a finished run's directory is simply replaced (so that the default run can be repeated
    as it is), but only by ``replace_previous_run`` once every input of the new run has been checked. A run
    resumed from a checkpoint elsewhere is a new run for this directory.
    """
    output = check_writable_directory(config.output_dir)
    if probe_lock:  # the process that will hold the lock: a job's ranks probing at once took each other for a job
        check_not_running(output)
    if config.resume not in (None, checkpoints.RESUME_LATEST):
        # before the directory's own state is judged: its "pass --resume" advice would answer the wrong question
        requested_checkpoint(config.resume)
    inputs = {"--teacher": config.teacher, "--tokenizer": config.tokenizer, "--data": config.data}
    check_foreign_outputs(output, "fastmini.distill", config.overwrite_output_dir, inputs)
    if reads_below(config.data, output):
        if Path(config.data).expanduser().is_dir():
            raise UsageError(
                f"--output-dir {config.output_dir} is inside the --data directory {config.data}, which is read "
                "whole: the next run would read this run's outputs as text; choose a directory outside it (or a "
                "hidden folder in it, which the reader skips)"
            )
        raise UsageError(
            f"--output-dir {config.output_dir} is reached by the --data pattern {config.data}: the next run could "
            "read this run's outputs as text; choose a directory the pattern does not reach (or a hidden folder, "
            "which the pattern skips)"
        )
    existing = checkpoints.list_checkpoints(output / CHECKPOINTS_DIR)
    if (
        existing
        and not _continues_own_run(config, output)
        and not config.overwrite_output_dir
        and not _finished(output, existing)
    ):
        raise UsageError(
            f"--output-dir {config.output_dir} holds checkpoints of an unfinished run "
            f"(latest: {existing[-1][1].name}); pass --resume to continue it or --overwrite-output-dir to "
            "start afresh"
        )
    return output


def requested_checkpoint(requested: str) -> Path:
    """The checkpoint directory ``--resume PATH`` names, or a UsageError when it is none."""
    path = Path(requested).expanduser()
    if not (path / STATE_NAME).is_file():
        raise UsageError(f"--resume {requested}: not a checkpoint directory (no {STATE_NAME} in it)")
    return path


def _continues_own_run(config: DistillConfig, output: Path) -> bool:
    """--resume of the output directory's own checkpoints (``latest``, or a path inside its checkpoints/)."""
    if config.resume is None:
        return False
    if config.resume == checkpoints.RESUME_LATEST:
        return True
    return (output / CHECKPOINTS_DIR).resolve() in Path(config.resume).expanduser().resolve().parents


def _finished(output: Path, existing: list[tuple[int, Path]]) -> bool:
    """Whether metrics.json says a run ended at or after the latest checkpoint's step: read from the files'
    contents, not their times (a copy without preserved times, `cp -r`, reorders those). A run that starts
    training moves the directory's metrics.json aside (``replace_previous_run``), so it cannot vouch for the
    new checkpoints."""
    try:
        steps = json.loads((output / METRICS_NAME).read_text())["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(steps, int) and steps >= existing[-1][0]


def replace_previous_run(config: DistillConfig) -> Path:
    """Create the output directory and drop an earlier run's checkpoints (unless --resume continues them), and
    move its metrics.json aside to metrics.previous.json: until this run writes its own, nothing in the directory
    may vouch for the checkpoints it writes (_finished), were it stopped. The earlier run's model files stay
    until this run publishes its own.

    Called after the teacher, tokenizer, data, student and resume checkpoint have all been checked:
    a command that fails on any of them leaves the directory as it was (or absent)."""
    output = writable_directory(config.output_dir)
    hold_output_dir(output)  # before anything here changes: a second process is refused from now on
    existing = checkpoints.list_checkpoints(output / CHECKPOINTS_DIR)
    if existing and not _continues_own_run(config, output):
        log.info("replacing the %s run in %s", "finished" if _finished(output, existing) else "unfinished", output)
        shutil.rmtree(output / CHECKPOINTS_DIR)
    if (output / METRICS_NAME).is_file():
        (output / METRICS_NAME).replace(output / PREVIOUS_METRICS_NAME)
    return output


class DistillationRun:
    def __init__(self, config: DistillConfig, context: distributed.DistributedContext):
        self.config = config
        self.context = context
        self.device = context.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.autocast_dtype = precision.autocast_dtype(config.precision, self.device)
        self.teacher_dtype = self.autocast_dtype or torch.float32
        if config.graph_teacher and self.device.type != "cuda":
            raise UsageError(f"--graph-teacher records CUDA graphs: it needs a GPU (this run is on {self.device})")
        for flag, given in (("--low-precision-maps", config.low_precision_maps),
                            ("--low-precision-norms", config.low_precision_norms)):  # fmt: skip
            if given and self.autocast_dtype is None:  # an explicit switch only (None: the default)
                log.warning("%s changes nothing without bf16 autocast (this run computes in fp32)", flag)

        check_global_batch(config.batch_size, context.world_size, config.grad_accumulation)
        # Refuse an unfinished run's directory now, before the heavy work; write nothing yet.
        # Rank 0 checks first, probing the lock: a job's ranks probing at once took each other for another job.
        self.output = distributed.main_first(context, lambda: check_output_dir(config, probe_lock=context.is_main))
        self.checkpoint_root = self.output / CHECKPOINTS_DIR

        torch.manual_seed(config.seed)
        self.teacher = models.load_teacher(config, self.device, self.teacher_dtype)
        self.tokenizer = models.load_tokenizer(config, self.teacher)
        if self.teacher.head is None and config.output_weight > 0:
            missing = self.teacher.head_weights_missing
            log.warning(
                "the teacher (%s) has no masked-LM head%s: the output-KL term is off (weight %s ignored)",
                config.teacher,
                f" (its checkpoint lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                if missing
                else "",
                config.output_weight,
            )
        self.layers = resolve_layer_map(config.layer_map, self.teacher.num_layers, config.recursions)
        self._prepare_data()

        torch.manual_seed(config.seed)  # the student's initialisation depends on the seed only
        student = models.build_student(config, self.teacher, self.tokenizer.pad_token_id)
        low_precision_maps = config.low_precision_maps
        if low_precision_maps is None:
            low_precision_maps = low_precision_maps_by_default(self.autocast_dtype)
        student.set_low_precision_maps(low_precision_maps).set_low_precision_norms(config.low_precision_norms)
        models.check_attention_compatible(config, student, self.teacher)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(student)
        projection = models.hidden_projection(config, student, self.teacher)
        self.student_side = StudentSide(student, projection).to(self.device).train()
        self.optimizer = build_adamw(self.student_side, config.lr, config.weight_decay)
        self.scheduler = LinearWarmupDecay(self.optimizer, config.warmup_steps, self.total_steps)
        trained = self.student_side
        if context.is_distributed:
            # Without a loss on the logits (--mlm-weight 0 and no output KL: no teacher head or --output-weight 0)
            # the MLM head (and, with attention maps alone compared, the last recursion's adapters) get no gradient,
            # which DDP refuses unless told to look for such parameters every step; otherwise every parameter has one.
            trained = nn.parallel.DistributedDataParallel(
                self.student_side,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not logits_feed_a_loss(config.loss_weights, self.teacher),
            )
        if config.compile_student:  # training steps only: evaluation runs the module as it is
            log.info("--compile-student: the first training step compiles the student (about a minute)")
            trained = compiled_student_side(trained)
        elif self.device.type == "cuda" and not config.gradient_checkpointing:
            log.info("--compile-student took GPU steps 1.1-1.4x faster on an H200, after a minute's compile (README)")
        self.trained = trained
        graph_teacher = config.graph_teacher
        if graph_teacher is None:
            graph_teacher = graph_teacher_by_default(self.device, self.teacher)
        try:
            self.distiller = Distiller(
                trained, self.teacher, self.layers, config.loss_weights, config.temperature, self.autocast_dtype,
                graph_teacher="cuda" if graph_teacher else None,
            )  # fmt: skip
        except ValueError as error:  # a teacher whose forward cannot be recorded
            raise UsageError(f"--graph-teacher: {error}") from error
        self.start_step = 0
        self.metrics_before: dict[str, Any] | None = None
        self.elapsed_before = 0.0
        self.last_checkpoint: Path | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._maybe_resume()
        # Everything the command could get wrong has been checked: only now may an earlier run go.
        distributed.on_main(context, lambda: replace_previous_run(config))

    # ----------------------------------------------------------------------------------- data
    def _prepare_data(self) -> None:
        config = self.config
        documents = load_documents(
            config.data,
            dataset_config=config.data_config,
            split=config.data_split,
            text_field=config.text_field,
            text_unit=config.text_unit,
            cache_dir=config.cache_dir,
        )
        held_out = self._held_out_count(len(documents))
        train_documents = documents.select(range(len(documents) - held_out)) if held_out else documents
        eval_documents = documents.select(range(len(documents) - held_out, len(documents))) if held_out else None
        try:
            check_window_stride(self.tokenizer, config.window_length, config.window_stride)
        except ValueError as error:  # a stride that leaves no room once special tokens are added
            raise UsageError(f"--window-stride / --window-length: {error}") from error

        def windows_of(selected, what: str):
            return make_windows(
                selected,
                self.tokenizer,
                config.window_length,
                config.window_stride,
                config.max_windows,
                config.seed,
                num_proc=config.tokenize_workers,
                description=f"tokenising {what} into windows",
            )

        def tokenised():
            train = windows_of(train_documents, "training documents")
            return train, windows_of(eval_documents, "held-out documents") if held_out else None

        # Rank 0 tokenises first so that a datasets cache is written once, then read by the others.
        train_windows, eval_windows = distributed.main_first(self.context, tokenised)

        def masked(windows):
            return MaskedWindows(
                windows,
                self.tokenizer,
                len(self.tokenizer),  # random replacements are words the tokenizer has, as transformers' collator draws
                config.mask_probability,
                config.mask_fraction,
                config.random_fraction,
            )

        self.train_windows = masked(train_windows)
        self.batches = StepBatches(
            self.train_windows,
            config.batch_size,
            self.context.world_size,
            config.grad_accumulation,
            self.context.rank,
            config.seed,
        )
        if len(train_windows) == 0:
            raise UsageError(
                f"--data {config.data}: no training windows: every training document tokenises to special tokens "
                "only (characters the tokenizer drops, zero-width or control ones; or words it only knows as [UNK]), "
                "which nothing is learnt from"
            )
        if self.batches.steps_per_epoch == 0:
            raise UsageError(
                f"--data {config.data}: only {len(train_windows)} training windows, fewer than one global batch "
                f"(--batch-size {config.batch_size}); give more text or a smaller batch"
            )
        if config.max_steps is not None:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.batches.steps_per_epoch))
        self.eval_batches = (
            evaluation_batches(masked(eval_windows), config.eval_windows, config.eval_batch_size, config.seed)
            if eval_windows is not None
            else []
        )

    def _held_out_count(self, documents: int) -> int:
        """How many of the last documents are held out for evaluation; 0 turns evaluation off
        (``self.evaluation_off`` then says why)."""
        config = self.config
        self.evaluation_off: str | None = None
        if config.eval_windows == 0:
            self.evaluation_off = "--eval-windows 0"
        elif config.eval_documents == 0:
            self.evaluation_off = "--eval-documents 0"
        elif documents < 2:
            self.evaluation_off = f"--data {config.data} has one document, none left to hold out"
        if self.evaluation_off is not None:
            log.info("held-out evaluation is off (%s); every document is for training", self.evaluation_off)
            return 0
        return min(config.eval_documents, documents - 1)

    # --------------------------------------------------------------------------- checkpoints
    def _state(self, step: int, elapsed: float) -> dict[str, Any]:
        rng_states = [checkpoints.capture_rng_state()]
        if self.context.is_distributed:
            gathered: list[Any] = [None] * self.context.world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        projection = self.student_side.projection
        return {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states,
            "data_position": {**self.batches.position(step), "train_windows": len(self.train_windows)},
            "projection": projection.state_dict() if projection is not None else None,
            "metrics_before": self.metrics_before,
            "elapsed_seconds": elapsed,
            "world_size": self.context.world_size,
            "precision": precision.precision_name(self.autocast_dtype),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self, step: int, elapsed: float) -> None:
        state = self._state(step, elapsed)  # collective: every rank takes part

        def publish() -> None:
            final = self.checkpoint_root / checkpoints.checkpoint_name(step)
            checkpoints.remove_temporaries(self.checkpoint_root)
            with checkpoints.atomic_directory(final) as directory:
                self.student_side.student.save_pretrained(directory)
                checkpoints.save_state(directory / STATE_NAME, state)
                (directory / TRAIN_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
                faults.kill_if_armed("kill-in-checkpoint", step)
                faults.fail_if_armed("fail-in-checkpoint", step)
            checkpoints.prune(self.checkpoint_root, self.config.keep_last)

        distributed.on_main(self.context, publish)
        # On every rank, once rank 0 has published it: each rank's messages after a stop name it.
        self.last_checkpoint = self.checkpoint_root / checkpoints.checkpoint_name(step)

    def _find_resume_checkpoint(self) -> Path | None:
        requested = self.config.resume
        if requested == checkpoints.RESUME_LATEST:
            found = checkpoints.list_checkpoints(self.checkpoint_root)
            if not found:
                log.warning("--resume: no checkpoint in %s yet; starting a fresh run", self.checkpoint_root)
                return None
            return found[-1][1]
        return requested_checkpoint(requested)

    def _load_checkpoint_weights(self, path: Path) -> None:
        """The student's weights from a checkpoint: all of them (a tied decoder aside), or one UsageError."""
        from safetensors.torch import load_file

        student = self.student_side.student
        try:
            weights = load_file(str(path / SAFETENSORS_NAME), device=str(self.device))
            result = student.load_state_dict(weights, strict=False)
        except models.UNLOADABLE_WEIGHTS as error:  # missing, cut short, or of other shapes
            raise UsageError(f"--resume {path}: {SAFETENSORS_NAME} cannot be read ({error})") from error
        tied = tied_weight_keys(student)
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            problems = [f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []
            if result.unexpected_keys:
                problems.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
            raise UsageError(f"--resume {path}: {SAFETENSORS_NAME} is not this run's student ({'; '.join(problems)})")

    def _maybe_resume(self) -> None:
        if self.config.resume is None:
            return
        path = self._find_resume_checkpoint()
        if path is None:
            return
        try:
            state = checkpoints.load_state(path / STATE_NAME)
        except Exception as error:  # a truncated or foreign file
            raise UsageError(f"--resume {path}: {STATE_NAME} cannot be read ({error})") from error
        saved, current = state["config"], self.config.to_dict()
        changed = changed_options(without_split(saved), without_split(current))
        if changed:
            raise UsageError(f"--resume {path}: the checkpoint was written with other options: {'; '.join(changed)}")
        if state["data_position"]["train_windows"] != len(self.train_windows):
            raise UsageError(
                f"--resume {path}: the data gives {len(self.train_windows)} training windows, the checkpoint's run had "
                f"{state['data_position']['train_windows']}"
            )
        self._load_checkpoint_weights(path)
        if state["projection"] is not None:
            self.student_side.projection.load_state_dict(state["projection"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        context = self.context
        check_resumed_split(
            (state["world_size"], saved.get("grad_accumulation")),
            (context.world_size, self.config.grad_accumulation),
            self.config.batch_size,
            log,
        )
        precision.check_resumed_precision(state.get("precision"), self.autocast_dtype, self.config.precision, log)
        self._rng_to_restore = checkpoints.rng_state_of_rank(state["rng"], context.rank)
        self.start_step = state["step"]
        self.metrics_before = state["metrics_before"]
        self.elapsed_before = state["elapsed_seconds"]
        self.last_checkpoint = path
        log.info("resuming from %s (step %d of %d)", path, self.start_step, self.total_steps)

    # ---------------------------------------------------------------------------------- loop
    def _evaluate(self) -> dict[str, Any]:
        if not self.context.is_main:
            return {}
        return evaluate(self.student_side, self.teacher, self.layers, self.eval_batches, self.device)

    def _evaluation_summary(self) -> dict[str, Any]:
        if self.evaluation_off is not None:
            return {"enabled": False, "reason": self.evaluation_off}
        windows = sum(int(batch.input_ids.shape[0]) for batch in self.eval_batches)
        return {"enabled": True, "windows": windows}

    def _describe(self) -> None:
        if not self.context.is_main:
            return
        student = self.student_side.student
        parameters = sum(p.numel() for p in student.parameters())
        head = student.lm_head.decoder.weight.numel() + student.lm_head.decoder.bias.numel()
        c = student.config
        log.info(
            "teacher %s: %d layers, H=%d, %s; student: N=%d E=%d H=%d I=%d adapters=%s r=%d, %.1fM parameters "
            "(%.1fM without the vocabulary projection); layer map (teacher layers, 1-based) %s",
            self.config.teacher,
            self.teacher.num_layers,
            self.teacher.config.hidden_size,
            "with MLM head" if self.teacher.head is not None else "no MLM head",
            c.num_hidden_layers,
            c.embedding_size,
            c.hidden_size,
            c.intermediate_size,
            c.use_adapter,
            c.reduction_factor,
            parameters / 1e6,
            (parameters - head) / 1e6,
            list(self.layers),
        )
        log.info(
            "data %s: %d training windows of <= %d tokens (%d steps per epoch), %d held-out windows; %d steps of "
            "%d windows (%d process(es) x %d accumulation x %d), device %s, teacher %s",
            self.config.data,
            len(self.train_windows),
            self.config.window_length,
            self.batches.steps_per_epoch,
            sum(int(b.input_ids.shape[0]) for b in self.eval_batches),
            self.total_steps,
            self.config.batch_size,
            self.context.world_size,
            self.config.grad_accumulation,
            self.batches.micro_size,
            self.device,
            str(self.teacher_dtype).removeprefix("torch."),
        )

    def _last_good(self) -> str:
        if self.last_checkpoint:
            return f"the last good checkpoint is {self.last_checkpoint}"
        return "no checkpoint was written yet"

    def _step_counts(self, micro_batches: list) -> StepCounts:
        """What every micro-batch's terms divide by: the counts of the whole global batch (one collective)."""
        totals = step_totals(
            {"tokens": sum(b.num_tokens for b in micro_batches), "masked": sum(b.num_masked for b in micro_batches)},
            self.context,
            maxima={"padded_length": max(b.padded_length for b in micro_batches)},
        )
        return StepCounts(**totals)

    def _train_step(self, step: int) -> tuple[dict[str, float], int]:
        """One optimizer step; (the logged values, the global batch's real tokens)."""
        micro_batches = self.batches.micro_batches(step)
        counts = self._step_counts(micro_batches)
        shares = None
        for index, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            last = index == len(micro_batches) - 1
            sync = self.trained.no_sync() if self.context.is_distributed and not last else contextlib.nullcontext()
            with sync:
                terms = self.distiller(batch, counts)  # this micro-batch's share of the global batch's terms
                backward_share(terms.total, self.context)
            share = terms.as_vector()  # kept where it is: the host reads the step's terms once, below
            shares = share if shares is None else shares + share
        means = distributed.sum_over_processes(shares, self.context)  # the shares add up to the global means
        values = dict(zip(("loss", "mlm", "attention", "hidden", "output"), means.tolist(), strict=True))
        if faults.nan_if_armed(step + 1):
            values["loss"] = float("nan")
        values["grad_norm"], values["lr"] = checked_step(
            self.optimizer,
            self.scheduler,
            self.student_side.parameters(),
            self.config.max_grad_norm,
            values,
            lambda problem, details: (
                f"{problem} at step {step + 1} ({details}); stopped without updating the student; {self._last_good()}"
            ),
        )
        return values, counts.tokens

    def run(self) -> dict[str, Any]:
        config, context = self.config, self.context
        self._describe()
        if self.metrics_before is None:  # rank 0 evaluates the held-out windows, the others wait for it
            self.metrics_before = distributed.on_main(context, self._evaluate) or {}
            if self.metrics_before:
                log.info("held-out before: %s", _summary(self.metrics_before))
        resumed = bool(self.config.resume and self.start_step)
        run_log = RunLog(
            self.output,
            context.is_main,
            self.start_step if resumed else None,
            # a checkpoint elsewhere (<run>/checkpoints/step-N) continues that run's log
            None if not resumed or _continues_own_run(config, self.output) else self.last_checkpoint.parent.parent,
        )
        if self._rng_to_restore is not None:
            checkpoints.restore_rng_state(self._rng_to_restore)
        else:
            torch.manual_seed(config.seed + context.rank)  # dropout streams, independent of setup's draws
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc="distilling",
            unit="step",
            dynamic_ncols=True,
            disable=not (context.is_main and config.progress),
        )
        started = time.perf_counter()
        tokens_seen = 0
        step = self.start_step
        try:
            while step < self.total_steps:
                values, tokens = self._train_step(step)
                step += 1
                tokens_seen += tokens
                faults.kill_if_armed("kill-after-step", step)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{values['loss']:.3f}",
                    mlm=f"{values['mlm']:.3f}",
                    att=f"{values['attention']:.3f}",
                    hid=f"{values['hidden']:.3f}",
                    out=f"{values['output']:.3f}",
                    lr=f"{values['lr']:.1e}",
                    refresh=False,
                )
                if step % config.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - started
                    run_log.write("train", step, {**values, "tokens_per_second": tokens_seen / max(elapsed, 1e-9)})
                if config.save_every and step % config.save_every == 0:
                    self.save_checkpoint(step, self.elapsed_before + time.perf_counter() - started)
        except KeyboardInterrupt as interrupt:
            raise Interrupted(self._after_interrupt()) from interrupt
        finally:
            bar.close()
        train_seconds = time.perf_counter() - started

        def finish() -> dict[str, Any]:  # rank 0's: the held-out evaluation and the outputs
            after = self._evaluate()
            if after:
                log.info("held-out after:  %s", _summary(after))
            metrics = {
                "before": self.metrics_before or None,
                "after": after or None,
                "evaluation": self._evaluation_summary(),
                "train": {
                    "steps": step,
                    "resumed_from_step": self.start_step or None,
                    "seconds_this_session": round(train_seconds, 2),
                    "seconds_total": round(self.elapsed_before + train_seconds, 2),
                    "tokens_this_session": tokens_seen,  # every process's: counted over the global batch
                    "processes": context.world_size,
                    "device": str(self.device),
                    "precision": precision.precision_name(self.autocast_dtype),  # --precision auto, resolved
                },
                "layer_map": list(self.layers),
                "output_kl": self.distiller.use_output_kl,
            }
            if after:  # flat, as fine-tuning's: TensorBoard's eval/<metric> tags
                run_log.write("eval", step, after)
            self._save_outputs(metrics)
            return metrics

        try:
            return distributed.on_main(context, finish) or {}
        finally:
            run_log.close()

    def _after_interrupt(self) -> str:
        """What the user can do after Ctrl-C: resume from a checkpoint, or start again when there is none."""
        if self.last_checkpoint is not None:
            # Resumed from a checkpoint elsewhere and none of its own yet: a bare --resume here would start afresh.
            elsewhere = self.last_checkpoint if self.last_checkpoint.parent != self.checkpoint_root else None
            options = resume_options(self.config.output_dir, elsewhere)
            return f"continue from {self.last_checkpoint.name} with {options}"
        reason = "--save-every 0" if not self.config.save_every else f"none before step {self.config.save_every}"
        return f"no checkpoint was written ({reason}), so there is nothing to resume; run the command again"

    def _save_outputs(self, metrics: dict[str, Any]) -> None:
        staging = self.output / ".tmp-final"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        self.student_side.student.save_pretrained(staging)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Windowing set truncation to --window-length / --window-stride on the fast tokenizer; a user of
            # the saved one would silently get windows cut short.
            backend.no_truncation()
        checkpoints.save_tokenizer(self.tokenizer, staging, self.student_side.student.config.max_position_embeddings)
        (staging / TRAIN_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        publish_directory_contents(staging, self.output)
        # Last: metrics.json marks the run finished (_finished), so it goes in once the model it vouches for is
        # there (published in name order, it went in before model.safetensors).
        write_json_atomically(self.output / METRICS_NAME, metrics)
        (self.output / PREVIOUS_METRICS_NAME).unlink(missing_ok=True)  # this run's metrics.json replaces them
        log.info("wrote the student, tokenizer, %s and %s to %s", TRAIN_CONFIG_NAME, METRICS_NAME, self.output)


def _summary(metrics: dict[str, Any]) -> str:
    accuracy = metrics.get("mlm_accuracy")
    return (
        f"hidden cosine {metrics['hidden_cosine_mean']:.4f} (per layer {metrics['hidden_cosine_per_layer']}), "
        f"attention KL {metrics['attention_kl_sum']:.4f}, MLM accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} on {metrics['masked_tokens']} masked tokens"
    )
